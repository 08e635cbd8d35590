"""A run's SentencePiece vocabulary exported as a Hugging Face fast tokenizer gives the
same ids as the library's own tokenizer on held-out text of every handbook language."""

import json

import numpy as np
import pytest

from bigsci_jax import corpus, vocab
from bigsci_jax import tokenizer as tokenizers
from bigsci_jax.tokenizer import SentencePieceTokenizer as Tokenizer

hf_tokenizer = pytest.importorskip("bigsci_jax.hf.tokenizer")
pytest.importorskip("tokenizers")


@pytest.fixture(scope="module")
def texts():
  """{lang: (train texts, held-out texts)}: a language's last two chapters held out."""
  try:
    root = corpus.handbook_root()
  except corpus.CorpusError as e:
    pytest.skip(str(e))
  out = {}
  for locale in corpus.locales(root):
    names = [c for c, _ in corpus.chapters(root, locale)]
    docs = list(corpus.documents(root, locale))
    held = set(n.removesuffix(".html") for n in names[-2:])
    out[docs[0]["lang"]] = ([d["text"] for d in docs if d["chapter"] not in held],
                            [d["text"] for d in docs if d["chapter"] in held])
  return out


@pytest.fixture(scope="module")
def model_proto(texts, tmp_path_factory):
  cfg = vocab.VocabConfig(vocab_size=2000, sample_chars=300_000)
  path = vocab.train({lang: train for lang, (train, _) in texts.items()},
                     str(tmp_path_factory.mktemp("vocab")), cfg)
  with open(path, "rb") as f:
    return f.read()


def test_same_ids_and_text_on_held_out_text_of_every_language(texts, model_proto):
  ours, fast = Tokenizer(model_proto), hf_tokenizer.fast_tokenizer(model_proto)
  assert len(texts) >= 14
  extra = ["a</s>b<pad>c<unk>", "  two  spaces\tand\n", "<0x41> is not a byte", "🦜 ünïcode 12345"]
  checked = 0
  for lang, (_, held_out) in sorted(texts.items()):
    assert held_out, lang
    for text in held_out + extra:
      ids = ours.encode(text)
      assert fast.encode(text, add_special_tokens=False).ids == ids, (lang, text[:80])
      assert fast.decode(ids, skip_special_tokens=False) == ours.decode(ids, special_tokens=True)
      checked += len(ids)
  assert checked > 100_000


def test_transformers_loads_the_written_directory(model_proto, tmp_path):
  transformers = pytest.importorskip("transformers")
  paths = hf_tokenizer.write(model_proto, str(tmp_path / "hf"), max_len=512)
  assert sorted(p.rsplit("/", 1)[1] for p in paths) == [
      "special_tokens_map.json", "tokenizer.json", "tokenizer_config.json"]
  assert not list((tmp_path / "hf").glob("*.tmp"))
  auto = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
  ours = Tokenizer(model_proto)
  assert (auto.eos_token_id, auto.pad_token_id, auto.bos_token_id, auto.unk_token_id) == (1, 0, 0, 2)
  assert auto.model_max_length == 512
  text = "Le paquet </s> est installé  deux fois\n"
  assert auto(text, add_special_tokens=False).input_ids == ours.encode(text)
  assert auto.encode(text) == [0] + ours.encode(text)  # the start token first, no EOS
  assert auto.decode(ours.encode(text)) == text
  config = json.loads((tmp_path / "hf" / "tokenizer_config.json").read_text())
  assert config["clean_up_tokenization_spaces"] is False


def test_a_vocabulary_it_cannot_reproduce_is_one_sentence(model_proto):
  from sentencepiece import sentencepiece_model_pb2
  model = sentencepiece_model_pb2.ModelProto()
  model.ParseFromString(model_proto)
  model.normalizer_spec.add_dummy_prefix = True
  with pytest.raises(hf_tokenizer.TokenizerExportError,
                     match=r"trained with add_dummy_prefix=True, which the export does not"):
    hf_tokenizer.fast_tokenizer(model.SerializeToString())


EXTRA = ["a</s>b<pad>c<unk>", "  two  spaces\tand\n", "<0x41> is not a byte", "🦜 ünïcode 12345"]


def test_the_library_reads_the_exported_tokenizer_json_as_it_reads_the_model(
    texts, model_proto, tmp_path):
  """An imported run's tokenizer.json behind the library's interface: the ids, texts, byte
  lengths, offsets and special tokens of the SentencePiece model it came from."""
  hf_tokenizer.write(model_proto, str(tmp_path), max_len=512)
  ours, theirs = Tokenizer(model_proto), tokenizers.from_dir(str(tmp_path))
  assert isinstance(theirs, tokenizers.HFTokenizer)
  assert ((theirs.bos_id, theirs.eos_id, theirs.pad_id, theirs.unk_id, theirs.vocab_size)
          == (ours.bos_id, ours.eos_id, ours.pad_id, ours.unk_id, ours.vocab_size) == (0, 1, 0, 2, 2000))
  assert (theirs.bos_token, theirs.eos_token) == ("<pad>", "</s>")
  np.testing.assert_array_equal(theirs.byte_lengths(), ours.byte_lengths())
  for lang, (_, held_out) in sorted(texts.items()):
    for text in held_out[:2] + EXTRA:
      ids = ours.encode(text)
      assert theirs.encode(text) == ids, (lang, text[:80])
      assert theirs.encode(text, special_tokens=False) == ours.encode(text, special_tokens=False)
      for special in (False, True):
        assert theirs.decode(ids, special) == ours.decode(ids, special), lang
      assert theirs.offsets(ids, 3) == ours.offsets(ids, 3)
      assert [theirs.token_text(i) for i in ids] == [ours.token_text(i) for i in ids]


def _byte_level_bpe(texts, folder, config):
  """A BLOOM-style byte-level BPE trained with `tokenizers` on the corpus, with `config` as
  its tokenizer_config.json."""
  from tokenizers import Tokenizer as Backend, decoders, models, pre_tokenizers, trainers
  backend = Backend(models.BPE())
  backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  backend.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  backend.train_from_iterator([t[:3000] for train, _ in texts.values() for t in train[:3]], trainer)
  folder.mkdir(exist_ok=True)
  backend.save(str(folder / "tokenizer.json"))
  (folder / "tokenizer_config.json").write_text(json.dumps(config))
  return tokenizers.from_dir(str(folder))


def test_a_byte_level_tokenizer_spells_bytes_and_takes_its_specials_from_its_config(
    texts, tmp_path):
  specials = {"bos_token": "<s>", "eos_token": {"content": "</s>"}, "pad_token": "<pad>",
              "unk_token": "<unk>"}
  tok = _byte_level_bpe(texts, tmp_path / "a", specials)
  assert (tok.unk_id, tok.bos_id, tok.eos_id, tok.pad_id) == (0, 1, 2, 3)
  lengths = tok.byte_lengths()
  for lang, (_, held_out) in sorted(texts.items()):
    text = held_out[0][:1500] + EXTRA[-1]
    ids = tok.encode(text)
    assert lengths[ids].sum() == len(text.encode()), lang  # bits per byte count every byte
    assert tok.decode(ids) == text, lang
    offsets = tok.offsets(ids)
    assert offsets == sorted(offsets) and offsets[-1] < len(text), lang
  assert tok.encode("a</s>b") == tok.encode("a") + [2] + tok.encode("b")
  assert 2 not in tok.encode("a</s>b", special_tokens=False)
  assert tok.decode(tok.encode("a</s>b"), special_tokens=True) == "a</s>b"
  assert tok.token_text(2) == "</s>"
  # No bos_token: sequences start from the eos_token (as the evaluation harness does).
  assert _byte_level_bpe(texts, tmp_path / "b", {"eos_token": "</s>"}).bos_id == 2
  with pytest.raises(tokenizers.TokenizerError, match="names no eos_token"):
    _byte_level_bpe(texts, tmp_path / "c", {"bos_token": "<s>"})
  with pytest.raises(tokenizers.TokenizerError, match=r"eos_token='</S>', which is not a token"):
    _byte_level_bpe(texts, tmp_path / "d", {"eos_token": "</S>"})
