"""Vocabulary extension for a new language (bigsci_jax.adapt.vocabulary and
python -m bigsci_jax.extend_vocab): every old token keeps its id and the model its old
rows, the new language costs fewer tokens, and a new row starts as the mean of the rows
of the pieces its token replaces."""

import json
import os

import jax
import numpy as np
import pytest

from bigsci_jax import corpus, evaluate, likelihood, tokenizer, vocab
from bigsci_jax import step as steps
from bigsci_jax.adapt import vocabulary
from bigsci_jax.config import ModelConfig
from bigsci_jax.extend_vocab import main as extend_main

NEW = "fr-FR"


@pytest.fixture(scope="module")
def documents():
  """{'en': [...], 'fr': [...]} handbook documents."""
  try:
    root = corpus.handbook_root()
  except corpus.CorpusError as e:
    pytest.skip(str(e))
  english = corpus.english_paragraphs(root)
  return {lang: [d["text"] for d in corpus.documents(root, locale, english)]
          for lang, locale in (("en", "en-US"), ("fr", NEW))}


def _tokens_per_byte(tok, docs):
  return sum(len(tok.encode(d)) for d in docs) / sum(len(d.encode()) for d in docs)


def _check_extension(files, documents, num_new):
  """Extend files with French; the checks both tokenizer kinds must pass; (old, new
  tokenizer, extension)."""
  old = tokenizer.from_files(files)
  extension = vocabulary.extend(files, documents["fr"][:-20], num_new)
  new = tokenizer.from_files(extension.files)
  assert len(extension.new_ids) == num_new
  assert extension.new_ids == tuple(range(new.vocab_size - num_new, new.vocab_size))
  assert new.vocab_size == old.vocab_size + num_new
  # Every old token keeps its id and spelling; the special tokens keep theirs.
  assert all(new.token_bytes(i) == old.token_bytes(i) for i in range(old.vocab_size))
  assert new.specials == old.specials
  assert (new.bos_id, new.eos_id, new.pad_id) == (old.bos_id, old.eos_id, old.pad_id)
  held_out = documents["fr"][-20:]
  for doc in held_out + documents["en"][-5:]:
    assert new.decode(new.encode(doc)) == doc
  before, after = _tokens_per_byte(old, held_out), _tokens_per_byte(new, held_out)
  assert after < 0.85 * before, (before, after)
  # English text was not what the tokens were learned on: it hardly changes.
  english = documents["en"][-20:]
  assert _tokens_per_byte(new, english) <= _tokens_per_byte(old, english) * 1.001
  used = {i for doc in held_out for i in new.encode(doc)} & set(extension.new_ids)
  assert len(used) > num_new // 2
  return old, new, extension


def test_a_unigram_vocabulary_gains_french_pieces_and_keeps_its_ids(documents):
  lines = [line for d in documents["en"] for line in d.split("\n") if line.strip()]
  files = {tokenizer.SPM_FILE: vocab.train_model(lines[:4000], 1000)}
  old, new, extension = _check_extension(files, documents, 200)
  # New pieces compete on the old pieces' score scale: a frequent French word is one
  # piece, and an English word the old model keeps whole stays whole.
  assert len(new.encode(" les")) == 1 and len(old.encode(" les")) > 1
  assert new.encode(" the") == old.encode(" the")
  # The extended model exports as a fast tokenizer that gives the same ids.
  from bigsci_jax.hf import tokenizer as hf_tokenizer
  fast = hf_tokenizer.fast_tokenizer(extension.files[tokenizer.SPM_FILE])
  for text in (documents["fr"][-1][:2000], documents["en"][-1][:2000]):
    assert fast.encode(text, add_special_tokens=False).ids == new.encode(text)


def test_a_byte_level_bpe_gains_french_merges_and_keeps_its_ids(documents):
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
  backend = Tokenizer(models.BPE())
  backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  backend.decoder = decoders.ByteLevel()
  backend.train_from_iterator(documents["en"], trainers.BpeTrainer(
      vocab_size=800, special_tokens=["<unk>", "<s>", "</s>", "<pad>"], show_progress=False,
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
  backend.add_special_tokens(["<|extra|>"])  # after the vocabulary, as Llama 3's are
  files = {"tokenizer.json": backend.to_str().encode(),
           "tokenizer_config.json": json.dumps({"bos_token": "<s>", "eos_token": "</s>"}).encode()}
  old, new, extension = _check_extension(files, documents, 200)
  assert old.specials["<|extra|>"] == new.specials["<|extra|>"] == 800
  assert extension.new_ids[0] == 801
  merges = json.loads(extension.files["tokenizer.json"])["model"]["merges"]
  assert merges[:len(merges) - 200] == json.loads(files["tokenizer.json"])["model"]["merges"]


def test_a_sentencepiece_style_bpe_gains_pieces_that_start_words(documents):
  """Llama 2's tokenizer.json: spaces normalized to U+2581, no pre-tokenizer, byte
  fallback; new pieces carry U+2581 only at their start, as SentencePiece's do."""
  from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
  backend = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>", fuse_unk=True))
  backend.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"),
                                             normalizers.Replace(" ", "\u2581")])
  backend.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(),
                                       decoders.Fuse(), decoders.Strip(" ", 1, 0)])
  backend.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="never")  # as spm trains
  byte_pieces = [f"<0x{i:02X}>" for i in range(256)]
  backend.train_from_iterator(documents["en"], trainers.BpeTrainer(
      vocab_size=1000, special_tokens=["<unk>", "<s>", "</s>", *byte_pieces], show_progress=False))
  backend.pre_tokenizer = None
  spec = json.loads(backend.to_str())
  spec["added_tokens"] = [t for t in spec["added_tokens"] if t["content"] not in byte_pieces]
  files = {"tokenizer.json": json.dumps(spec).encode(),
           "tokenizer_config.json": json.dumps({"bos_token": "<s>", "eos_token": "</s>",
                                                "unk_token": "<unk>"}).encode()}
  _, new, extension = _check_extension(files, documents, 200)
  texts = [new.token_text(i).replace(" ", "\u2581") for i in extension.new_ids]
  assert all("\u2581" not in t[1:] for t in texts), texts


def test_other_tokenizer_models_are_refused(documents):
  from tokenizers import Tokenizer, models
  backend = Tokenizer(models.WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]"))
  with pytest.raises(vocabulary.VocabularyError, match="WordLevel"):
    vocabulary.extend({"tokenizer.json": backend.to_str().encode()}, ["le chat"], 10)
  lines = [line for d in documents["en"] for line in d.split("\n") if line.strip()]
  files = {tokenizer.SPM_FILE: vocab.train_model(lines[:2000], 600)}
  with pytest.raises(vocabulary.VocabularyError, match="empty"):
    vocabulary.extend(files, ["", "  "], 10)


@pytest.mark.parametrize("tied", [True, False])
def test_new_rows_start_as_the_mean_of_the_pieces_they_replace(documents, tied):
  lines = [line for d in documents["en"] for line in d.split("\n") if line.strip()]
  files = {tokenizer.SPM_FILE: vocab.train_model(lines[:2000], 600)}
  old = tokenizer.from_files(files)
  extension = vocabulary.extend(files, documents["fr"][:20], 50)
  new = tokenizer.from_files(extension.files)
  cfg = ModelConfig(vocab_size=700, d_model=8, tie_embeddings=tied)  # 100 rows of padding
  rng = np.random.default_rng(0)
  embedding = rng.normal(size=(700, 8)).astype(np.float32)
  params = {"embed": {"embedding": embedding}, "other": {"kernel": np.ones(3, np.float32)}}
  if not tied:
    params["head"] = rng.normal(size=(8, 700)).astype(np.float32)
  out, fallbacks = vocabulary.extend_params(params, cfg, old, new, extension.new_ids, 768)
  assert fallbacks == 0  # unigram pieces are whole characters
  assert extension.new_ids == tuple(range(600, 650))
  tables = [(out["embed"]["embedding"], embedding)]
  if not tied:
    tables.append((out["head"].T, params["head"].T))
  assert out["other"] is params["other"]
  for table, before in tables:
    assert table.shape == (768, 8)
    np.testing.assert_array_equal(table[:600], before[:600])
    np.testing.assert_array_equal(table[650:700], before[650:700])  # padding kept
    np.testing.assert_allclose(table[700:], np.broadcast_to(before[:600].mean(0), (68, 8)),
                               rtol=1e-5)  # padding past the old table: the mean row
    for i in extension.new_ids:
      parts = old.encode(new.token_text(i), special_tokens=False)
      np.testing.assert_allclose(table[i], before[parts].mean(0), rtol=1e-5, atol=1e-6)


def _text_folder(folder, docs):
  for split, part in (("train", docs[:-4]), ("validation", docs[-4:])):
    os.makedirs(os.path.join(folder, split))
    with open(os.path.join(folder, split, "part0.txt"), "w", encoding="utf-8") as f:
      f.writelines(" ".join(d.split()) + "\n" for d in part)


def _logits(model_dir, ids):
  run, runtime, params, _ = evaluate.restore(model_dir, batch_size=1)
  rows = likelihood.token_rows([([], ids)], len(ids) + 1,
                               bos_id=tokenizer.from_dir(model_dir).bos_id)
  return np.asarray(runtime.model.apply({"params": params},
                                        **steps.model_inputs(run.model, rows)))[0]


def test_an_extended_run_keeps_its_old_logits(tmp_path, documents, handbook_data_dir, capsys):
  pytest.importorskip("seqio")
  import train
  run_dir, new_dir, texts = (str(tmp_path / name) for name in ("run", "new", "fr"))
  assert train.main([f"--model_dir={run_dir}", "--no_progress", "--gin.TRAIN_STEPS=2",
                     f"--gin.DataConfig.data_dir='{handbook_data_dir}'",
                     "--gin.DataConfig.languages=['en']", "--gin.DataConfig.vocab_size=1000",
                     "--gin.TrainConfig.eval_batches=1", "--gin.BATCH_SIZE=8",
                     "--gin.ModelConfig.max_len=128", "--gin.TrainConfig.checkpoint_every=2"]) == 0
  _text_folder(texts, documents["fr"][:30])
  capsys.readouterr()
  assert extend_main([f"--from_dir={run_dir}", f"--to_dir={new_dir}", f"--text_dir={texts}",
                      "--new_tokens=100", "--eval_docs=2"]) == 0
  result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  old, new = tokenizer.from_dir(run_dir), tokenizer.from_dir(new_dir)
  assert result["new_tokens"] == 100 and new.vocab_size == old.vocab_size + 100
  assert result["vocab_size_after"] % 128 == 0 and result["vocab_size_after"] >= new.vocab_size
  assert result["tokens_per_byte_after"] < result["tokens_per_byte_before"]
  assert np.isfinite(result["bpb_before"]) and np.isfinite(result["bpb_after"])
  run = evaluate.loop.read_run(new_dir)
  assert (run.model.vocab_size, run.data.vocab_size, run.data.vocab_path) == (
      result["vocab_size_after"], new.vocab_size, "")
  # The same old ids in: the same logits over the old vocabulary out (and over the
  # padding rows the new tokens did not take).
  ids = old.encode(documents["en"][0][:200])[:40]
  before, after = _logits(run_dir, ids), _logits(new_dir, ids)
  assert after.shape[-1] == result["vocab_size_after"] >= before.shape[-1]
  kept = np.r_[0:old.vocab_size, new.vocab_size:before.shape[-1]]
  np.testing.assert_allclose(after[:, kept], before[:, kept], atol=1e-5, rtol=1e-5)
  assert np.abs(after[:, old.vocab_size:new.vocab_size] - before[:, old.vocab_size:new.vocab_size]
                ).max() > 1e-2  # the new tokens' rows are not the padding they replaced
  # A second extension into the same folder is refused, nothing overwritten.
  assert extend_main([f"--from_dir={run_dir}", f"--to_dir={new_dir}", f"--text_dir={texts}"]) == 2
  assert "already holds a run" in capsys.readouterr().err
  assert extend_main([f"--from_dir={run_dir}", f"--to_dir={tmp_path / 'x'}",
                      f"--text_dir={tmp_path / 'missing'}"]) == 2
  assert "holds no .txt files" in capsys.readouterr().err
  assert not os.path.exists(tmp_path / "x")
  jax.clear_caches()
