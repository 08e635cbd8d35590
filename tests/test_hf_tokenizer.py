"""A run's SentencePiece vocabulary exported as a Hugging Face fast tokenizer gives the
same ids as the library's own tokenizer on held-out text of every handbook language."""

import json

import pytest

from bigsci_jax import corpus, vocab
from bigsci_jax.tokenizer import Tokenizer

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
      assert fast.encode(text).ids == ids, (lang, text[:80])
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
  assert auto.encode(text) == ours.encode(text)  # no BOS or EOS added
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
