"""seqio Vocabularies for the tokenizer files a run can use: a SentencePiece .model
(seqio's own SentencePieceVocabulary) or a Hugging Face tokenizer.json (an imported
model's; encoded by `tokenizers` through tf.numpy_function, so a dataset that uses it
runs in this process only).

  vocabulary, tok = vocabularies.load(path)  # seqio.Vocabulary, bigsci_jax.tokenizer.Tokenizer

Files are read with tf.io.gfile, so the path may be on any filesystem TensorFlow reads.
"""

import numpy as np
import seqio
import tensorflow as tf

from bigsci_jax import tokenizer as tokenizers
from bigsci_jax.corpus import CorpusError


class TokenizerJsonVocabulary(seqio.Vocabulary):
  """A seqio.Vocabulary over a bigsci_jax.tokenizer.HFTokenizer: text encodes without
  special tokens (as SentencePiece encodes it); EOS is the tokenizer's eos_token."""

  def __init__(self, tok):
    super().__init__()
    self.tok = tok

  @property
  def eos_id(self):
    return self.tok.eos_id

  @property
  def unk_id(self):
    return self.tok.unk_id

  @property
  def _base_vocab_size(self):
    return self.tok.vocab_size

  def _encode(self, s):
    return self.tok.encode(s, special_tokens=False)

  def _decode(self, ids):
    return self.tok.decode(ids)

  def _encode_tf(self, s):
    def encode(text):
      return np.array(self._encode(text.decode("utf-8")), np.int32)
    ids = tf.numpy_function(encode, [s], tf.int32, stateful=False)
    ids.set_shape([None])
    return ids

  def _decode_tf(self, ids):
    def decode(row):
      return np.array(self._decode(row.tolist()).encode("utf-8"), dtype=object)
    text = tf.numpy_function(decode, [ids], tf.string, stateful=False)
    text.set_shape([])
    return text

  def __eq__(self, other):
    return (isinstance(other, TokenizerJsonVocabulary)
            and self.tok.files() == other.tok.files())

  def __hash__(self):
    return hash(self.tok.files()["tokenizer.json"])


def check_exists(path):
  if not tf.io.gfile.exists(path):
    raise CorpusError(f"DataConfig.vocab_path={path} does not exist: point it at a "
                      f"SentencePiece .model file or a tokenizer.json, or leave it empty to "
                      f"train a vocabulary on the corpus.")


def read_files(path):
  """{run file name: bytes} of the tokenizer at `path` (a .model or a tokenizer.json
  with the configs beside it)."""
  check_exists(path)
  files = {}
  for name, file in tokenizers.names_beside(path).items():
    if tf.io.gfile.exists(file):
      with tf.io.gfile.GFile(file, "rb") as f:
        files[name] = f.read()
  return files


def load(path):
  """(seqio.Vocabulary, bigsci_jax.tokenizer.Tokenizer) of the tokenizer at `path`."""
  try:
    tok = tokenizers.from_files(read_files(path))
  except tokenizers.TokenizerError as e:
    raise CorpusError(f"DataConfig.vocab_path={path}: {e}") from None
  if isinstance(tok, tokenizers.SentencePieceTokenizer):
    return seqio.SentencePieceVocabulary(path), tok
  return TokenizerJsonVocabulary(tok), tok
