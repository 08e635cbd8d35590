"""A run's vocabulary extended with a new language's tokens, and its embeddings with rows
for them.

A tokenizer trained without a language splits its words into many short pieces (often
single bytes): every document costs more tokens, and so more compute and context, and
the model has to assemble each word from fragments. Extension appends tokens learned on
the new language's text, keeping every existing token at its id, so the trained rows keep
their meaning (BLOOM+1, Yong et al. 2022, compares this with adapting without new tokens):

- a SentencePiece unigram model (a run trained here): a unigram model is trained on the
  new text with the settings of bigsci_jax.vocab, and its most probable pieces that the
  vocabulary lacks are appended. Unigram scores are log-probabilities in their own
  corpus; the new ones are shifted by the median difference between the two models'
  scores of the pieces they share, so new and old pieces compete on one scale.
- a byte-pair-encoding tokenizer.json (BLOOM, Llama): BPE is trained on the new text
  through the tokenizer's own normalizer and pre-tokenizer; its merges are appended in
  their order when they make a token the vocabulary lacks out of two it has. Appended
  merges rank after every existing merge, so a word the old merges already cut
  differently may not reach a new token (extend_vocab reports how many the text uses).
  A SentencePiece-style BPE (Llama 2: spaces normalized to U+2581, no pre-tokenizer) learns
  within words, U+2581 only at a piece's start, as SentencePiece trained it.
  Ids continue after the largest id the tokenizer has (added special tokens included).

Embedding rows (and the output head's, when untied) of a new token start as the mean of
the rows of its old tokenization (the token's own text cut by the old tokenizer), so
it means at first what the pieces it replaces meant; a token whose bytes are not text
on their own, and padding rows past the old table, start as the mean row (Hewitt 2021).
The old rows are kept bit for bit.
"""

import dataclasses
import json

import numpy as np

from bigsci_jax import tokenizer as tokenizers
from bigsci_jax import vocab

# SentencePiece's piece types (sentencepiece_model.proto) and model type.
NORMAL, UNIGRAM = 1, 1
SPACE = "\u2581"  # SentencePiece's escaped space


class VocabularyError(ValueError):
  """The vocabulary cannot be extended as asked; the message says why and what to do."""


@dataclasses.dataclass(frozen=True)
class Extension:
  files: dict      # the extended tokenizer's files ({name: bytes})
  new_ids: tuple   # the appended tokens' ids, in order


def extend(files, texts, num_new, seed=0):
  """files ({name: bytes} of a run's tokenizer) with up to num_new tokens learned from
  texts (strings, one document each) appended; an Extension."""
  if num_new < 1:
    raise VocabularyError(f"--new_tokens={num_new} adds nothing; ask for at least 1 token.")
  if not any(t.strip() for t in texts):
    raise VocabularyError("the new language's text is empty; give a folder with its documents.")
  if tokenizers.SPM_FILE in files:
    return _extend_unigram(files[tokenizers.SPM_FILE], texts, num_new, seed)
  spec = json.loads(files["tokenizer.json"])
  kind = spec["model"].get("type")
  if kind != "BPE":
    raise VocabularyError(f"tokenizer.json holds a {kind} model; extension handles byte-pair "
                          f"encoding (BLOOM, Llama, GPT-2) and SentencePiece unigram vocab.model "
                          f"files.")
  return _extend_bpe(files, spec, texts, num_new)


def _extend_unigram(model_proto, texts, num_new, seed):
  from sentencepiece import sentencepiece_model_pb2
  old = sentencepiece_model_pb2.ModelProto()
  old.ParseFromString(model_proto)
  if old.trainer_spec.model_type != UNIGRAM:
    raise VocabularyError(f"the vocab.model is not a unigram model (type "
                          f"{old.trainer_spec.model_type}); extension appends unigram pieces.")
  lines = [chunk for text in texts for chunk in _chunks(text)]
  known = {p.piece: p for p in old.pieces}
  size = 259 + len(set("".join(lines))) + 2 * num_new
  for _ in range(4):  # more pieces while too few are new and the text has more to give
    learned = sentencepiece_model_pb2.ModelProto()
    learned.ParseFromString(vocab.train_model(lines, size, seed=seed, hard_limit=False))
    ours = [(p.piece, p.score) for p in learned.pieces if p.type == NORMAL]
    fresh = [(score, piece) for piece, score in ours if piece not in known]
    if len(fresh) >= num_new or len(learned.pieces) < size:
      break
    size += 2 * (num_new - len(fresh))
  gaps = [known[piece].score - score for piece, score in ours
          if piece in known and known[piece].type == NORMAL]
  offset = float(np.median(gaps)) if gaps else 0.0
  fresh = sorted(fresh, key=lambda x: -x[0])[:num_new]
  start = len(old.pieces)
  for score, piece in fresh:
    old.pieces.add(piece=piece, score=score + offset, type=NORMAL)
  old.trainer_spec.vocab_size = len(old.pieces)
  return Extension({tokenizers.SPM_FILE: old.SerializeToString()},
                   tuple(range(start, len(old.pieces))))


def _chunks(text, size=2000):
  """text in pieces of at most about `size` characters, cut at spaces (SentencePiece's
  trainer skips sentences over 4192 bytes)."""
  pieces, start = [], 0
  while len(text) - start > size:
    cut = text.rfind(" ", start + 1, start + size)
    cut = cut if cut > start else start + size
    pieces.append(text[start:cut])
    start = cut
  pieces.append(text[start:])
  return [p for p in pieces if p.strip()]


def _extend_bpe(files, spec, texts, num_new):
  from tokenizers import Tokenizer, pre_tokenizers, trainers
  model = spec["model"]
  if model.get("continuing_subword_prefix") or model.get("end_of_word_suffix"):
    raise VocabularyError("the BPE model marks word-internal pieces (continuing_subword_prefix "
                          "or end_of_word_suffix); extension handles plain BPE (BLOOM, Llama, "
                          "GPT-2).")
  learner_spec = dict(spec, model=dict(model, vocab={}, merges=[]), added_tokens=[],
                      post_processor=None)
  learner = Tokenizer.from_str(json.dumps(learner_spec))
  if learner.pre_tokenizer is None and learner.normalizer is not None and (
      SPACE in learner.normalizer.normalize_str("a b")):
    # SentencePiece-style BPE (Llama 2): words are not split before the model, but
    # SentencePiece learned pieces within words, U+2581 only at their start; learn so.
    learner.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="never")
  byte_level = "ByteLevel" in tokenizers.spec_types(spec.get("pre_tokenizer"))
  alphabet = pre_tokenizers.ByteLevel.alphabet() if byte_level else []
  size = (len(alphabet) or len(set("".join(texts)))) + 4 * num_new
  learner.train_from_iterator(texts, trainers.BpeTrainer(
      vocab_size=size, initial_alphabet=alphabet, show_progress=False))
  learned = json.loads(learner.to_str())["model"]["merges"]
  merges = list(model["merges"])
  pairs = not merges or isinstance(merges[0], list)  # the file's own spelling of a merge
  # Added tokens the model's vocabulary lacks (Llama 3's specials after its 128000 pieces)
  # get their ids from the vocabulary's size when the file is read: put them in it, so
  # they keep their ids once the new tokens are appended after them.
  vocab_map = {**{t["content"]: t["id"] for t in spec.get("added_tokens", ())}, **model["vocab"]}
  start = next_id = max(vocab_map.values(), default=-1) + 1
  for merge in learned:
    left, right = merge if isinstance(merge, list) else merge.split(" ", 1)
    token = left + right
    if token in vocab_map or left not in vocab_map or right not in vocab_map:
      continue
    vocab_map[token] = next_id
    next_id += 1
    merges.append([left, right] if pairs else f"{left} {right}")
    if next_id - start == num_new:
      break
  out = dict(spec, model=dict(model, vocab=vocab_map, merges=merges))
  extended = dict(files, **{"tokenizer.json": json.dumps(out, ensure_ascii=False).encode()})
  return Extension(extended, tuple(range(start, next_id)))


def new_rows(table_VxD, old_tok, new_tok, new_ids, vocab_size):
  """float32 [vocab_size, D]: table_VxD's rows kept, each new id's row the mean of the
  rows of its old tokenization, every other added row the mean row; also the number of
  new ids that took the mean row (bytes that are not text on their own)."""
  table_VxD = np.asarray(table_VxD, np.float32)
  mean_D = table_VxD[:old_tok.vocab_size].mean(axis=0)
  out_VxD = np.empty((vocab_size, table_VxD.shape[1]), np.float32)
  kept = min(vocab_size, table_VxD.shape[0])
  out_VxD[:kept] = table_VxD[:kept]
  out_VxD[kept:] = mean_D
  fallbacks = 0
  for i in new_ids:
    try:
      parts = old_tok.encode(new_tok.token_bytes(i).decode("utf-8"), special_tokens=False)
    except UnicodeDecodeError:
      parts = []
    fallbacks += not parts
    out_VxD[i] = table_VxD[parts].mean(axis=0) if parts else mean_D
  return out_VxD, fallbacks


def extend_params(params, model_cfg, old_tok, new_tok, new_ids, vocab_size):
  """(params with the embedding table, and the untied output head, at vocab_size rows
  (new_rows), the number of new ids that took the mean row)."""
  params, embedding = dict(params), np.asarray(params["embed"]["embedding"])
  table, fallbacks = new_rows(embedding, old_tok, new_tok, new_ids, vocab_size)
  params["embed"] = dict(params["embed"], embedding=table.astype(embedding.dtype))
  if not model_cfg.tie_embeddings:
    head = np.asarray(params["head"])
    params["head"] = new_rows(head.T, old_tok, new_tok, new_ids,
                              vocab_size)[0].T.astype(head.dtype)
  return params, fallbacks
