"""A run's tokenizer as the library and clients of the model see it: the SentencePiece
model of a run trained here (vocab.model) or the Hugging Face `tokenizer.json` of an
imported one, behind one interface.

SentencePiece alone spells "</s>" as the pieces of '<', '/', 's', '>'; clients that
find the end-of-sequence id by tokenizing its string (the evaluation harness does)
need it to be one token. Here the strings of the special tokens encode to their own
ids wherever they appear in a text, as Hugging Face tokenizers treat them; every other
text encodes as the backend encodes it (never adding tokens of its own).

`bos_id` is the token every sequence starts from: the model's inputs are its targets
shifted right behind it, in training, scoring and generation alike. A run trained here
starts from <pad> (id 0, seqio's decoder start); a Hugging Face tokenizer names its
`bos_token` in tokenizer_config.json (its `eos_token` when it has none, as the
evaluation harness does).

A tokenizer is built from its files ({name: bytes}), the form a run keeps them in:
`from_files`, `from_dir`; `files` gives them back.
"""

import codecs
import json
import os
import re

import numpy as np

from bigsci_jax.vocab import EOS_ID, PAD_ID, UNK_ID

SPM_FILE = "vocab.model"
HF_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


class TokenizerError(ValueError):
  """Tokenizer files are missing or unusable; the message says what to do."""


class Tokenizer:
  """encode / decode with special tokens, token strings, byte lengths and character
  offsets. A backend gives `_encode(text)` and `_decode(ids)` over text without special
  tokens, `vocab_size`, `specials` ({string: id}), the special ids and `_bytes` (the
  UTF-8 bytes each id spells; b'' for special tokens)."""

  vocab_size: int
  specials: dict
  bos_id: int
  eos_id: int
  pad_id: int
  unk_id: int | None
  _bytes: list

  def _finish(self):
    self._special_ids = frozenset(self.specials.values())
    # Longest first, so a special token that contains another one wins.
    self._special_re = re.compile("(" + "|".join(
        map(re.escape, sorted(self.specials, key=len, reverse=True))) + ")")
    names = {i: s for s, i in self.specials.items()}
    self.bos_token, self.eos_token = names.get(self.bos_id), names.get(self.eos_id)
    self.pad_token = names.get(self.pad_id)
    self.unk_token = names.get(self.unk_id) if self.unk_id is not None else None

  def encode(self, text, special_tokens=True):
    """Token ids of text; with special_tokens, '</s>' etc. become their ids."""
    if not special_tokens or not self.specials:
      return self._encode(text)
    ids = []
    for i, part in enumerate(self._special_re.split(text)):
      if i % 2:
        ids.append(self.specials[part])
      elif part:
        ids += self._encode(part)
    return ids

  def decode(self, ids, special_tokens=False):
    """The text of ids; special ids are left out, or spelled with special_tokens."""
    out, run = [], []
    for i in ids:
      i = int(i)
      if i < 0 or i >= self.vocab_size:
        raise ValueError(f"token id {i} is outside the vocabulary of {self.vocab_size}.")
      if i in self._special_ids:
        out.append(self._decode(run) if run else "")
        run = []
        if special_tokens:
          out.append(self.token_text(i))
      else:
        run.append(i)
    out.append(self._decode(run) if run else "")
    return "".join(out)

  def is_special(self, i):
    return i in self._special_ids

  def token_bytes(self, i):
    """The UTF-8 bytes token i spells (b'' for special tokens and for ids past the
    vocabulary, which a model's padded embedding table has)."""
    return b"" if i >= self.vocab_size else self._bytes[i]

  def byte_lengths(self):
    """int64 [vocab_size]: len(token_bytes(i)), so sum(byte_lengths()[ids]) is the byte
    length of the text ids encode (bits per byte)."""
    return np.array([len(b) for b in self._bytes], np.int64)

  def token_text(self, i):
    """A token as log-probability listings show it: its text, the special token's
    string, or 'bytes:\\xNN' for a byte that is not a character on its own."""
    if i >= self.vocab_size:
      return f"<unused:{i}>"
    if i in self._special_ids:
      return self._special_text(i)
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


class SentencePieceTokenizer(Tokenizer):
  """A SentencePiece model with byte fallback (what bigsci_jax.vocab trains): <pad>,
  </s> and <unk> are the special tokens, <pad> also the start."""

  def __init__(self, model_proto):
    import sentencepiece as spm
    self.model_proto = model_proto
    self.sp = spm.SentencePieceProcessor(model_proto=model_proto)
    self.vocab_size = self.sp.get_piece_size()
    self.pad_id, self.eos_id, self.unk_id = PAD_ID, EOS_ID, UNK_ID
    self.bos_id = self.pad_id
    self.specials = {self.sp.id_to_piece(i): i for i in (PAD_ID, EOS_ID, UNK_ID)}
    self._bytes = [_piece_bytes(self.sp, i) for i in range(self.vocab_size)]
    self._finish()

  def _encode(self, text):
    return self.sp.encode(text)

  def _decode(self, ids):
    return self.sp.decode(ids)

  def _special_text(self, i):
    return self.sp.id_to_piece(i)

  def files(self):
    return {SPM_FILE: self.model_proto}


def decode_until_eos(tok, ids):
  """The text of ids up to tok's first EOS (a generation's text); tok: anything with
  eos_id and decode."""
  ids = list(ids)
  return tok.decode(ids[:ids.index(tok.eos_id)] if tok.eos_id in ids else ids)


def _piece_bytes(sp, i):
  """The UTF-8 bytes piece i of a SentencePieceProcessor spells: its byte for a byte
  piece, nothing for control and unknown pieces, else its text (U+2581 is a space)."""
  if sp.is_byte(i):
    return bytes([int(sp.id_to_piece(i)[3:5], 16)])
  if sp.is_control(i) or sp.is_unknown(i):
    return b""
  return sp.id_to_piece(i).replace("\u2581", " ").encode()


def _byte_level_chars():
  """{char: byte} of byte-level BPE (GPT-2, BLOOM, Llama 3): printable Latin-1 bytes
  stand for themselves, the other 68 bytes for the characters from U+0100 on."""
  kept = [*range(33, 127), *range(161, 173), *range(174, 256)]
  table = {chr(b): b for b in kept}
  extra = 0
  for b in range(256):
    if b not in table.values():
      table[chr(256 + extra)] = b
      extra += 1
  return table


def spec_types(spec):
  """The type names in a tokenizer.json component spec (a decoder, pre-tokenizer or
  normalizer), Sequence members included."""
  if not spec:
    return set()
  types = {spec.get("type")}
  for key in ("decoders", "pretokenizers", "normalizers"):
    for inner in spec.get(key) or ():
      types |= spec_types(inner)
  return types


class HFTokenizer(Tokenizer):
  """A Hugging Face fast tokenizer (tokenizer.json) with the special tokens that
  tokenizer_config.json names: its added tokens marked special are the special tokens."""

  def __init__(self, files):
    from tokenizers import Tokenizer as Backend
    self._files = dict(files)
    self.tk = Backend.from_str(files["tokenizer.json"].decode("utf-8"))
    self.tk.encode_special_tokens = True  # only Tokenizer.encode matches special strings
    self.vocab_size = self.tk.get_vocab_size(with_added_tokens=True)
    added = self.tk.get_added_tokens_decoder()
    self.specials = {t.content: i for i, t in added.items() if t.special}
    names = _special_names(files)
    ids = {}
    for key, name in names.items():
      i = self.tk.token_to_id(name) if name is not None else None
      if name is not None and i is None:
        raise TokenizerError(f"tokenizer_config.json names {key}={name!r}, which is not a token "
                             f"of tokenizer.json; fix the file or leave the entry out.")
      ids[key] = i
      if i is not None:
        self.specials.setdefault(name, i)
    if ids["eos_token"] is None:
      raise TokenizerError("the tokenizer names no eos_token (tokenizer_config.json or "
                           "special_tokens_map.json); add one, e.g. \"eos_token\": \"</s>\".")
    self.eos_id = ids["eos_token"]
    self.bos_id = ids["bos_token"] if ids["bos_token"] is not None else self.eos_id
    self.pad_id = ids["pad_token"] if ids["pad_token"] is not None else self.eos_id
    self.unk_id = ids["unk_token"]
    self._bytes = self._token_bytes(json.loads(files["tokenizer.json"])["decoder"])
    self._finish()

  def _token_bytes(self, decoder_spec):
    types = spec_types(decoder_spec)
    byte_level = _byte_level_chars() if "ByteLevel" in types else None
    out = []
    for i in range(self.vocab_size):
      token = self.tk.id_to_token(i)
      if token is None or token in self.specials:
        out.append(b"")
      elif byte_level is not None:
        out.append(bytes(byte_level[c] for c in token if c in byte_level))
      elif "ByteFallback" in types and re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", token):
        out.append(bytes([int(token[3:5], 16)]))
      else:
        out.append(token.replace("\u2581", " ").encode())
    return out

  def _encode(self, text):
    return self.tk.encode(text, add_special_tokens=False).ids

  def _decode(self, ids):
    return self.tk.decode(ids, skip_special_tokens=False)

  def _special_text(self, i):
    return self.tk.id_to_token(i)

  def files(self):
    return dict(self._files)


def _special_names(files):
  """{bos_token, eos_token, pad_token, unk_token: string or None} from
  tokenizer_config.json, then special_tokens_map.json (entries may be dicts)."""
  names = dict.fromkeys(("bos_token", "eos_token", "pad_token", "unk_token"))
  for name in ("special_tokens_map.json", "tokenizer_config.json"):
    if name in files:
      try:
        config = json.loads(files[name])
      except json.JSONDecodeError as e:
        raise TokenizerError(f"{name} is not valid JSON ({e}); fix or remove it.") from None
      for key in names:
        value = config.get(key)
        if isinstance(value, dict):
          value = value.get("content")
        if value is not None:
          names[key] = value
  return names


def from_files(files):
  """The tokenizer of {file name: bytes}: vocab.model, or tokenizer.json with its
  optional configs."""
  if SPM_FILE in files:
    return SentencePieceTokenizer(files[SPM_FILE])
  if "tokenizer.json" in files:
    return HFTokenizer(files)
  raise TokenizerError(f"no {SPM_FILE} or tokenizer.json among {', '.join(sorted(files))}.")


def names_beside(path):
  """The tokenizer files that go with `path` (a vocab.model or a tokenizer.json): the
  file itself and, for tokenizer.json, the config files in its folder."""
  if os.path.basename(path) == "tokenizer.json":
    folder = os.path.dirname(path)
    return {name: os.path.join(folder, name) for name in HF_FILES}
  if path.endswith(".json"):
    raise TokenizerError(f"{path} is not a tokenizer.json; give a SentencePiece .model file or "
                         f"a Hugging Face tokenizer.json.")
  return {SPM_FILE: path}


def find(folder):
  """The path of the tokenizer a run keeps in `folder` (its vocab.model, else its
  tokenizer.json), or None when it has none (synthetic data)."""
  for path in (os.path.join(folder, SPM_FILE), os.path.join(folder, "tokenizer.json")):
    if os.path.exists(path):
      return path
  return None


def read_files(location):
  """{name: bytes} of the tokenizer files (not parsed) a run keeps in the folder
  `location`, or of the vocab.model / tokenizer.json at that path; None when there are
  none."""
  path = location if os.path.isfile(location) else find(location)
  if path is None:
    return None
  files = {}
  for name, file in names_beside(path).items():
    if os.path.exists(file):
      with open(file, "rb") as f:
        files[name] = f.read()
  return files


def from_dir(folder):
  """The tokenizer a run keeps in `folder`, or None when it has none (synthetic data)."""
  files = read_files(folder)
  return from_files(files) if files else None
