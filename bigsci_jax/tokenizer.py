"""A run's SentencePiece vocabulary as clients of the model see it.

SentencePiece alone spells "</s>" as the pieces of '<', '/', 's', '>'; clients that
find the end-of-sequence id by tokenizing its string (the evaluation harness does)
need it to be one token. Here the strings of the control pieces (<pad>, </s>,
<unk>) encode to their own ids wherever they appear in a text, as Hugging Face
tokenizers treat special tokens; every other text encodes as SentencePiece
encodes it. Sequences start from <pad> (id 0, seqio's decoder start), which is
therefore also the beginning-of-sequence token.
"""

import codecs
import re

from bigsci_jax.vocab import EOS_ID, PAD_ID, UNK_ID, piece_bytes


class Tokenizer:
  """encode / decode with special tokens, token strings and character offsets."""

  def __init__(self, model_proto):
    import sentencepiece as spm
    self.sp = spm.SentencePieceProcessor(model_proto=model_proto)
    self.vocab_size = self.sp.get_piece_size()
    self.specials = {self.sp.id_to_piece(i): i for i in (PAD_ID, EOS_ID, UNK_ID)}
    self._special_re = re.compile("(" + "|".join(map(re.escape, self.specials)) + ")")
    self.pad_token, self.eos_token = self.sp.id_to_piece(PAD_ID), self.sp.id_to_piece(EOS_ID)
    self.bos_token, self.unk_token = self.pad_token, self.sp.id_to_piece(UNK_ID)

  @classmethod
  def from_file(cls, path):
    with open(path, "rb") as f:
      return cls(f.read())

  def encode(self, text, special_tokens=True):
    """Token ids of text; with special_tokens, '</s>' etc. become their ids."""
    if not special_tokens:
      return self.sp.encode(text)
    ids = []
    for i, part in enumerate(self._special_re.split(text)):
      if i % 2:
        ids.append(self.specials[part])
      elif part:
        ids += self.sp.encode(part)
    return ids

  def decode(self, ids, special_tokens=False):
    """The text of ids; special ids are left out, or spelled with special_tokens."""
    out, run = [], []
    for i in ids:
      if i < 0 or i >= self.vocab_size:
        raise ValueError(f"token id {i} is outside the vocabulary of {self.vocab_size}.")
      if i in (PAD_ID, EOS_ID, UNK_ID):
        out.append(self.sp.decode(run))
        run = []
        if special_tokens:
          out.append(self.sp.id_to_piece(i))
      else:
        run.append(i)
    out.append(self.sp.decode(run))
    return "".join(out)

  def token_bytes(self, i):
    """The UTF-8 bytes token i spells (b'' for special tokens and for ids past the
    vocabulary, which a model's padded embedding table has)."""
    return b"" if i >= self.vocab_size else piece_bytes(self.sp, i)

  def token_text(self, i):
    """A token as log-probability listings show it: its text, the special token's
    string, or 'bytes:\\xNN' for a byte that is not a character on its own."""
    if i in (PAD_ID, EOS_ID, UNK_ID):
      return self.sp.id_to_piece(i)
    if i >= self.vocab_size:
      return f"<unused:{i}>"
    raw = self.token_bytes(i)
    try:
      return raw.decode()
    except UnicodeDecodeError:
      return "bytes:" + "".join(f"\\x{b:02x}" for b in raw)

  def offsets(self, ids, start=0):
    """The character offset (from `start`) at which each token's text begins in the
    decoded text; a byte that completes a character later counts from that character."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    offsets, chars = [], start
    for i in ids:
      offsets.append(chars)
      chars += len(decoder.decode(self.token_bytes(int(i))))
    return offsets
