"""A run's SentencePiece vocabulary as a Hugging Face fast tokenizer that gives the same ids.

The vocabularies vocab.py trains are unigram models with identity normalization, no
dummy prefix, spaces escaped as U+2581 and byte fallback. The fast tokenizer does the
same steps: spaces become U+2581, a unigram model with the pieces and scores finds the
most likely segmentation of the whole text (a character no piece covers becomes its
UTF-8 byte pieces), and decoding joins the pieces, turns byte pieces back into bytes
and U+2581 into spaces. SentencePiece never matches its control and byte pieces
against text; here the control pieces are special tokens (their strings encode to
their ids, as bigsci_jax.tokenizer encodes them) and the byte and special pieces score
far below any path through real pieces, so a literal "<0x41>" spells its characters (as
does "</s>" when special tokens are not matched).
The models this library trains read every sequence after the start token <pad> (id 0),
so the tokenizer's post-processor puts it first when special tokens are added
(`tokenizer(text)`, as Llama's tokenizer adds <s>; `add_special_tokens=False` gives the
text's ids alone).

  python -m bigsci_jax.hf tokenizer --model_dir=DIR --out=HF_DIR

writes tokenizer.json, tokenizer_config.json and special_tokens_map.json, which
`transformers.AutoTokenizer.from_pretrained(HF_DIR)` reads (the [hf] extra).
"""

import json
import os

from bigsci_jax.tokenizer import HF_FILES as FILES
from bigsci_jax.vocab import EOS_ID, PAD_ID, UNK_ID

SPACE = "\u2581"
# SentencePiece's piece types that the export treats apart (sentencepiece_model.proto).
UNKNOWN, CONTROL, BYTE = 2, 3, 6
UNREACHABLE = -1e4  # the score byte and special pieces get: never chosen over real pieces


class TokenizerExportError(ValueError):
  """The vocabulary cannot be expressed as a fast tokenizer that gives the same ids."""


def _model(model_proto):
  from sentencepiece import sentencepiece_model_pb2
  model = sentencepiece_model_pb2.ModelProto()
  model.ParseFromString(model_proto)
  trainer, normalizer = model.trainer_spec, model.normalizer_spec
  unsupported = [
      (trainer.model_type != trainer.UNIGRAM, f"model_type {trainer.model_type} (unigram is 1)"),
      (normalizer.name != "identity", f"normalization_rule_name={normalizer.name!r}"),
      (normalizer.add_dummy_prefix, "add_dummy_prefix=True"),
      (normalizer.remove_extra_whitespaces, "remove_extra_whitespaces=True"),
      (not normalizer.escape_whitespaces, "escape_whitespaces=False"),
      (trainer.treat_whitespace_as_suffix, "treat_whitespace_as_suffix=True"),
      (not trainer.byte_fallback, "byte_fallback=False"),
  ]
  reasons = [text for bad, text in unsupported if bad]
  if reasons:
    raise TokenizerExportError(
        f"the SentencePiece model was trained with {', '.join(reasons)}, which the export does "
        f"not reproduce; it converts the vocabularies bigsci_jax.vocab trains (unigram, identity "
        f"normalization, no dummy prefix, byte fallback).")
  return model


def fast_tokenizer(model_proto):
  """A tokenizers.Tokenizer giving the SentencePiece model's ids (model_proto: bytes of
  a vocab.model), with <pad>, </s> and <unk> as special tokens."""
  from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, processors
  model = _model(model_proto)
  vocab = [(p.piece, UNREACHABLE if p.type in (UNKNOWN, CONTROL, BYTE) else float(p.score))
           for p in model.pieces]
  unk = [i for i, p in enumerate(model.pieces) if p.type == UNKNOWN]
  tokenizer = Tokenizer(models.Unigram(vocab, unk_id=unk[0], byte_fallback=True))
  tokenizer.normalizer = normalizers.Replace(Regex(" "), SPACE)
  tokenizer.decoder = decoders.Sequence([decoders.Replace(SPACE, " "), decoders.ByteFallback(),
                                         decoders.Fuse()])
  tokenizer.add_special_tokens([AddedToken(model.pieces[i].piece, special=True, normalized=False)
                                for i in (PAD_ID, EOS_ID, UNK_ID)])
  start = model.pieces[PAD_ID].piece
  tokenizer.post_processor = processors.TemplateProcessing(
      single=f"{start} $A", pair=f"{start} $A $B:1", special_tokens=[(start, PAD_ID)])
  return tokenizer


def write(model_proto, out_dir, max_len):
  """tokenizer.json, tokenizer_config.json and special_tokens_map.json in out_dir; the
  paths written."""
  tokenizer = fast_tokenizer(model_proto)
  pad, eos, unk = (tokenizer.id_to_token(i) for i in (PAD_ID, EOS_ID, UNK_ID))
  specials = {"bos_token": pad, "eos_token": eos, "pad_token": pad, "unk_token": unk}
  config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": max_len,
            "clean_up_tokenization_spaces": False, "add_bos_token": True,
            "add_eos_token": False, "padding_side": "left", **specials}
  os.makedirs(out_dir, exist_ok=True)
  paths = [os.path.join(out_dir, name) for name in FILES]
  tmp = [p + ".tmp" for p in paths]
  tokenizer.save(tmp[0])
  for path, content in zip(tmp[1:], (config, specials)):
    with open(path, "w") as f:
      json.dump(content, f, indent=1, ensure_ascii=False)
      f.write("\n")
  for t, p in zip(tmp, paths):
    os.replace(t, p)
  return paths
