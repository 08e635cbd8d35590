"""The real corpus end to end: which languages are translated, the vocabulary's byte
accounting, and training on the handbook mixture with per-language evaluation."""

import dataclasses
import os

import jax
import numpy as np
import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
tf = pytest.importorskip("tensorflow")
tf.config.set_visible_devices([], "GPU")
tfds = pytest.importorskip("tensorflow_datasets")

import train  # noqa: E402
from bigsci_jax import held_out, loop, tokenizer, vocab  # noqa: E402
from bigsci_jax.config import (BatchConfig, DataConfig, ModelConfig, OptimizerConfig,  # noqa: E402
                               RunConfig, TrainConfig)
from bigsci_jax.corpus import CorpusError  # noqa: E402
from bigsci_jax.metrics import read_metrics  # noqa: E402
from bigsci_jax.tasks import handbook  # noqa: E402

LANGS = ("en", "fr", "ja")


def _docs(data_dir, lang, split):
  builder = tfds.builder(f"handbook/{lang}", data_dir=data_dir)
  return [x["text"].decode() for x in builder.as_dataset(split=split).as_numpy_iterator()]


def _run(data_dir, prefix_lm=False, steps=4):
  return RunConfig(
      model=ModelConfig(num_layers=1, d_model=32, num_heads=2, d_ff=64, vocab_size=4096,
                        max_len=64, dtype="float32", mask="prefix" if prefix_lm else "causal"),
      optimizer=OptimizerConfig(learning_rate=3e-3, warmup_steps=1),
      batch=BatchConfig(batch_size=8, seq_len=64),
      data=DataConfig(mixture="handbook_multilingual", languages=LANGS, data_dir=data_dir,
                      vocab_size=4000),
      train=TrainConfig(train_steps=steps, checkpoint_every=2, eval_batches=0, eval_every=0))


def test_fourteen_languages_are_really_translated(handbook_data_dir):
  langs = handbook.handbook_languages(handbook_data_dir)
  assert len(langs) == 14 and "zh_cn" in langs, langs
  assert not {"da", "sv", "zh_tw"} & set(langs)  # mostly untranslated English


def test_vocabulary_round_trips_and_spells_bytes_in_every_language(handbook_data_dir):
  import sentencepiece as spm
  prepared = handbook.prepare(DataConfig(mixture="handbook_multilingual",
                                         data_dir=handbook_data_dir, vocab_size=4000))
  assert len(prepared.tasks) == 14
  assert handbook.prepare(DataConfig(mixture="handbook_multilingual", data_dir=handbook_data_dir,
                                     vocab_size=4000)).vocab_path == prepared.vocab_path  # cached
  sp = spm.SentencePieceProcessor(model_file=prepared.vocab_path)
  with open(prepared.vocab_path, "rb") as f:
    lengths = tokenizer.from_files({tokenizer.SPM_FILE: f.read()}).byte_lengths()
  assert sp.pad_id() == 0 and sp.eos_id() == 1 and lengths[1] == 0
  for lang in prepared.tasks:
    for text in _docs(handbook_data_dir, lang, "validation")[:3]:
      ids = sp.encode(text)
      assert sp.decode(ids) == text, lang
      assert lengths[ids].sum() == len(text.encode()), lang
  unseen = "unseen: 🦜 ǅ"  # byte fallback
  assert sp.decode(sp.encode(unseen)) == unseen
  assert lengths[sp.encode(unseen)].sum() == len(unseen.encode())


def test_vocabulary_sample_follows_the_temperature(handbook_data_dir):
  handbook.prepare(DataConfig(mixture="handbook_fr", data_dir=handbook_data_dir, vocab_size=4000))
  texts = {lang: _docs(handbook_data_dir, lang, "train") for lang in ("en", "fr")}
  french_paragraphs = {p for d in texts["fr"] for p in d.split("\n")}
  for alpha, sizes, low, high in ((0.0, None, 0.4, 0.6), (1.0, {"en": 9.0, "fr": 1.0}, 0.05, 0.15)):
    sample = vocab.training_sample(texts, vocab.VocabConfig(alpha=alpha, sample_chars=50_000),
                                   sizes)
    french = sum(len(line) for line in sample if line in french_paragraphs)
    assert low < french / sum(map(len, sample)) < high, alpha


def test_unknown_language_and_missing_corpus_are_one_sentence(handbook_data_dir, monkeypatch,
                                                               tmp_path):
  with pytest.raises(CorpusError, match=r"unknown language 'xx'.*register_language"):
    handbook.prepare(DataConfig(mixture="handbook_xx", data_dir=handbook_data_dir))
  with pytest.raises(CorpusError, match=r"unknown language 'klingon'"):
    handbook.prepare(DataConfig(mixture="handbook_multilingual", languages=("en", "klingon"),
                                data_dir=handbook_data_dir))
  monkeypatch.setenv("BIGSCI_HANDBOOK_HTML", "/nonexistent")
  with pytest.raises(CorpusError, match="apt-get install -y debian-handbook"):
    handbook.prepare(DataConfig(mixture="handbook_en", data_dir=str(tmp_path / "data")))
  assert not (tmp_path / "data").exists()  # nothing half-prepared


def test_bits_per_byte_counts_every_byte_of_the_validation_split(handbook_data_dir):
  """The byte total behind bpb/<lang> is the UTF-8 length of that language's whole
  validation split, read straight from TFDS."""
  run = _run(handbook_data_dir)
  _, evals, token_bytes, _ = loop.make_data(run)
  assert set(evals) == set(LANGS)
  for lang in LANGS:
    batches, size = held_out.eval_micro_batches(evals[lang], run.batch.micro_batch_size, token_bytes)
    assert size == sum(len(d.encode()) for d in _docs(handbook_data_dir, lang, "validation"))
    assert all(b["decoder_target_tokens"].shape == (8, 64) for b in batches)


TASKS = ("next_sentence/fr", "cloze/en")


def _with_tasks(run, **train_fields):
  fields = {"eval_tasks": TASKS, "eval_task_limit": 8, **train_fields}
  return dataclasses.replace(run, train=dataclasses.replace(run.train, **fields))


def test_training_logs_per_language_eval_and_task_scores(handbook_data_dir, tmp_path):
  """Also TrainConfig.eval_tasks: the eval lines carry the tasks' scores, the same as
  `evaluate` gives for the final checkpoint."""
  run = _with_tasks(_run(handbook_data_dir, prefix_lm=True))
  model_dir = str(tmp_path / "straight")
  straight = loop.train(run, model_dir, progress=False)
  final = read_metrics(model_dir, "eval")[-1]
  scores = {k: v for k, v in final.items() if k.startswith(TASKS)}
  assert set(scores) == {"next_sentence/fr/acc", "next_sentence/fr/acc_norm", "cloze/en/acc",
                         "cloze/en/exact_match", "cloze/en/ppl"}
  from bigsci_jax import evaluate
  run_here, runtime, params, _ = evaluate.restore(model_dir)
  scorer = evaluate.make_scorer(model_dir, run_here, runtime, params)
  offline = {task: evaluate.score_task(task, scorer, limit=8) for task in TASKS}
  for key, value in scores.items():
    task, metric = key.rsplit("/", 1)
    assert value == pytest.approx(offline[task][metric], rel=1e-5), key
  vocabulary = loop.read_tokenizer(model_dir)  # the run keeps the vocabulary it read text with
  assert vocabulary.vocab_size == 4000
  assert vocabulary.decode(vocabulary.encode("Débian")) == "Débian"

  losses = [final[f"loss/{lang}"] for lang in LANGS]
  assert min(losses) < final["loss"] < max(losses)  # pooled over the languages' tokens
  for lang in LANGS:
    assert 0 < final[f"bpb/{lang}"] == straight[f"bpb/{lang}"]
  from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
  events = EventAccumulator(model_dir)
  events.Reload()
  assert [e.value for e in events.Scalars("eval/bpb/ja")] == pytest.approx([final["bpb/ja"]])


@pytest.mark.slow  # the default suite resumes exactly with synthetic rows (test_resume.py) and re-reads a seqio stream to its position (test_tasks.py)
def test_a_resumed_handbook_run_logs_what_an_uninterrupted_one_does(handbook_data_dir, tmp_path):
  """The seqio mixture through loop.train: a run stopped at step 2 and resumed logs the
  same losses, eval lines and task scores and ends with the same parameters."""
  run = _with_tasks(_run(handbook_data_dir, prefix_lm=True))
  straight = loop.train(run, str(tmp_path / "straight"), progress=False)
  resumed_dir = str(tmp_path / "resumed")
  loop.train(_with_tasks(run, train_steps=2, eval_tasks=()), resumed_dir, progress=False)
  resumed = loop.train(run, resumed_dir, progress=False)
  train_lines = [(r["step"], r["loss"]) for r in read_metrics(str(tmp_path / "straight"), "train")]
  assert [r["step"] for r in read_metrics(resumed_dir, "train")] == [1, 2, 3, 4]
  assert [(r["step"], r["loss"]) for r in read_metrics(resumed_dir, "train")] == train_lines
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(resumed["state"].params),
               jax.device_get(straight["state"].params))
  assert read_metrics(resumed_dir, "eval")[-1] == read_metrics(str(tmp_path / "straight"), "eval")[-1]


@pytest.mark.slow  # the README command at length; test_training_logs_per_language_eval_and_task_scores is the fast path
def test_default_command_prints_bits_per_byte_per_language(handbook_data_dir, tmp_path, capsys):
  """`python train.py` as the README runs it, shortened to 3 languages and 150 steps."""
  model_dir = str(tmp_path / "default")
  rc = train.main([f"--model_dir={model_dir}", "--no_progress", "--gin.TRAIN_STEPS=150",
                   f"--gin.DataConfig.data_dir='{handbook_data_dir}'",
                   "--gin.DataConfig.languages=['en', 'fr', 'ja']",
                   "--gin.DataConfig.vocab_size=4000", "--gin.TrainConfig.eval_every=75"])
  assert rc == 0
  out = capsys.readouterr().out.splitlines()
  assert out[-2].startswith("validation bits per UTF-8 byte: en ")
  rows = read_metrics(model_dir, "train")
  first, last = np.mean([r["loss"] for r in rows[:5]]), np.mean([r["loss"] for r in rows[-5:]])
  assert last <= 0.75 * first, (first, last)
  evals = read_metrics(model_dir, "eval")
  assert [r["step"] for r in evals] == [75, 150]
  for lang in LANGS:
    assert evals[1][f"bpb/{lang}"] < evals[0][f"bpb/{lang}"], lang


def test_train_py_without_the_corpus_says_how_to_install_it(tmp_path, capsys, monkeypatch):
  monkeypatch.setenv("BIGSCI_HANDBOOK_HTML", str(tmp_path / "no_handbook"))
  rc = train.main([f"--model_dir={tmp_path / 'run'}", "--no_progress",
                   f"--gin.DataConfig.data_dir='{tmp_path / 'data'}'"])
  err = capsys.readouterr().err.strip().splitlines()
  assert rc == 2 and err[-1].startswith("error: the Debian Administrator's Handbook was not found")
  assert "apt-get install -y debian-handbook" in err[-1]
  assert not (tmp_path / "run" / "config.gin").exists()
