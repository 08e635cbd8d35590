"""A multilingual SentencePiece vocabulary, trained once per input and cached.

Unigram model with byte fallback (every UTF-8 string encodes, nothing maps to
unk) and character coverage 0.9995, trained on a temperature-sampled sample of
each language's text so small languages are not drowned out. The cache key is a
hash of the sample and the settings; the model is written to a temporary name
and renamed, so an interrupted training leaves no half-written model.

No dummy-prefix space and identity normalisation: the pieces of a text spell
exactly its bytes, so token counts turn into UTF-8 byte counts (for bits per byte)
without decoding (bigsci_jax.tokenizer.Tokenizer.byte_lengths).
"""

import dataclasses
import hashlib
import io
import os

import numpy as np

from bigsci_jax.data import temperature_rates

PAD_ID, EOS_ID, UNK_ID = 0, 1, 2  # seqio's conventions
_FORMAT = 2  # bump when the trainer's settings change: part of the cache key


@dataclasses.dataclass(frozen=True)
class VocabConfig:
  vocab_size: int = 8192
  alpha: float = 0.3                 # sampling temperature for the training sample
  sample_chars: int = 2_000_000      # characters of training text, over all languages
  character_coverage: float = 0.9995
  seed: int = 0


def training_sample(texts_by_lang, cfg: VocabConfig, sizes=None):
  """Lines of text, each language contributing rate_l * sample_chars characters; the
  rates follow `sizes` ({lang: corpus size}), by default the texts' own lengths."""
  sizes = sizes or {lang: sum(len(t) for t in texts) for lang, texts in texts_by_lang.items()}
  rates = temperature_rates(sizes, cfg.alpha)
  rng = np.random.default_rng(cfg.seed)
  lines = []
  for lang in sorted(texts_by_lang):
    paragraphs = [p for t in texts_by_lang[lang] for p in t.split("\n") if p.strip()]
    budget, taken = rates[lang] * cfg.sample_chars, 0
    for i in rng.permutation(len(paragraphs)):
      if taken >= budget:
        break
      lines.append(paragraphs[i])
      taken += len(paragraphs[i])
  return lines


def train(texts_by_lang, cache_dir, cfg: VocabConfig = VocabConfig(), *, sizes=None,
          cached_only=False):
  """Path of a SentencePiece model for these texts (trained now, or from the cache).

  With cached_only, a model not in the cache is an error instead of being trained
  (processes other than the one that trains it)."""
  lines = training_sample(texts_by_lang, cfg, sizes)
  key = hashlib.sha256(repr((_FORMAT, dataclasses.astuple(cfg))).encode()
                       + "\n".join(lines).encode())
  path = os.path.join(cache_dir, f"spm_{cfg.vocab_size}_{key.hexdigest()[:16]}.model")
  if os.path.exists(path):
    return path
  if cached_only:
    raise FileNotFoundError(f"the vocabulary {path} trained by process 0 is not visible here: put "
                            f"DataConfig.data_dir on a filesystem every process shares, or set "
                            f"DataConfig.vocab_path to a SentencePiece model they can all read.")
  os.makedirs(cache_dir, exist_ok=True)
  tmp = path + ".tmp"
  with open(tmp, "wb") as f:
    f.write(train_model(lines, cfg.vocab_size, cfg.character_coverage, cfg.seed))
  os.replace(tmp, path)
  return path


def train_model(lines, vocab_size, character_coverage=0.9995, seed=0, hard_limit=True):
  """The bytes of a SentencePiece model trained on `lines` with this module's settings
  (unigram, byte fallback, identity normalization, no dummy prefix). hard_limit=False
  lets a small text yield fewer than vocab_size pieces instead of failing."""
  import sentencepiece as spm
  model = io.BytesIO()
  spm.set_random_generator_seed(seed)
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(lines), model_writer=model, model_type="unigram",
      vocab_size=vocab_size, character_coverage=character_coverage, byte_fallback=True,
      pad_id=PAD_ID, eos_id=EOS_ID, unk_id=UNK_ID, bos_id=-1, num_threads=os.cpu_count() or 1,
      input_sentence_size=len(lines) if len(lines) > 100 else 0,  # 0: all of them
      shuffle_input_sentence=False,
      normalization_rule_name="identity", remove_extra_whitespaces=False, add_dummy_prefix=False,
      split_digits=True, allow_whitespace_only_pieces=True, hard_vocab_limit=hard_limit,
      minloglevel=2)
  return model.getvalue()
