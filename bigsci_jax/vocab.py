"""A multilingual SentencePiece vocabulary, trained once per input and cached.

Unigram model with byte fallback (every UTF-8 string encodes, nothing maps to
unk) and character coverage 0.9995, trained on a temperature-sampled sample of
each language's text so small languages are not drowned out. The cache key is a
hash of the sample and the settings; the model is written to a temporary name
and renamed, so an interrupted training leaves no half-written model.
"""

import dataclasses
import hashlib
import io
import os

import numpy as np

from bigsci_jax.data import temperature_rates

PAD_ID, EOS_ID, UNK_ID = 0, 1, 2  # seqio's conventions


@dataclasses.dataclass(frozen=True)
class VocabConfig:
  vocab_size: int = 8192
  alpha: float = 0.3                 # sampling temperature for the training sample
  sample_chars: int = 2_000_000      # characters of training text, over all languages
  character_coverage: float = 0.9995
  seed: int = 0


def training_sample(texts_by_lang, cfg: VocabConfig):
  """Lines of text, each language contributing rate_l * sample_chars characters."""
  sizes = {lang: sum(len(t) for t in texts) for lang, texts in texts_by_lang.items()}
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


def train(texts_by_lang, cache_dir, cfg: VocabConfig = VocabConfig()):
  """Path of a SentencePiece model for these texts (trained now, or from the cache)."""
  import sentencepiece as spm
  lines = training_sample(texts_by_lang, cfg)
  key = hashlib.sha256(repr(dataclasses.astuple(cfg)).encode() + "\n".join(lines).encode())
  path = os.path.join(cache_dir, f"spm_{cfg.vocab_size}_{key.hexdigest()[:16]}.model")
  if os.path.exists(path):
    return path
  os.makedirs(cache_dir, exist_ok=True)
  model = io.BytesIO()
  spm.set_random_generator_seed(cfg.seed)
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(lines), model_writer=model, model_type="unigram",
      vocab_size=cfg.vocab_size, character_coverage=cfg.character_coverage, byte_fallback=True,
      pad_id=PAD_ID, eos_id=EOS_ID, unk_id=UNK_ID, bos_id=-1, num_threads=os.cpu_count() or 1,
      input_sentence_size=len(lines), shuffle_input_sentence=False,
      normalization_rule_name="identity", remove_extra_whitespaces=False,
      split_digits=True, allow_whitespace_only_pieces=True, minloglevel=2)
  tmp = path + ".tmp"
  with open(tmp, "wb") as f:
    f.write(model.getvalue())
  os.replace(tmp, path)
  return path
