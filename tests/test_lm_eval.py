"""The lm-evaluation-harness adapter scores local tasks exactly like the built-in
evaluator: multiple choice, cloze log-likelihood, generation and rolling
log-likelihood, in process (simple_evaluate) and through python -m bigsci_jax.lm_eval."""

import glob
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("lm_eval")
os.environ.update(HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1")

import lm_eval  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

from bigsci_jax import evaluate, likelihood, mc_tasks  # noqa: E402
from bigsci_jax.lm_eval import BigsciLM  # noqa: E402
from test_mc_tasks import Bytes, _tiny  # noqa: E402


def _jsonl(path, rows):
  with open(path, "w") as f:
    f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def _task(task_dir, name, rows, body):
  """A harness task over a local JSON dataset (no network)."""
  data = os.path.join(task_dir, f"{name}.jsonl")
  _jsonl(data, rows)
  with open(os.path.join(task_dir, f"{name}.yaml"), "w") as f:
    f.write(f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
            f"    test: {data}\ntest_split: test\n{body}")


MULTIPLE_CHOICE = """output_type: multiple_choice
doc_to_text: context
doc_to_choice: choices
doc_to_target: answer
target_delimiter: " "
metric_list:
  - metric: acc
  - metric: acc_bytes
"""
CLOZE = """output_type: loglikelihood
doc_to_text: context
doc_to_target: "{{' ' + word}}"
metric_list:
  - metric: perplexity
    aggregation: perplexity
    higher_is_better: false
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""
GENERATION = """output_type: generate_until
doc_to_text: context
doc_to_target: word
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 8
  do_sample: false
filter_list:
  - name: first_word
    filter:
      - function: regex
        regex_pattern: "^\\\\s*(\\\\w+)"
      - function: take_first
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
"""
ROLLING = """output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: text
metric_list:
  - metric: bits_per_byte
"""


def _mc_rows(items):
  return [{"context": i.context, "choices": list(i.choices), "answer": i.answer} for i in items]


def test_simple_evaluate_with_the_adapter_matches_the_builtin_scores(tmp_path, monkeypatch):
  monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
  model, params = _tiny("prefix", max_len=256, seed=1)
  scorer = likelihood.Scorer(model, params, Bytes(), seq_len=256, batch_size=8)
  mc = mc_tasks.next_sentence_items("en", limit=24)
  cloze = mc_tasks.cloze_items("fr", limit=12)
  texts = [i.context for i in cloze[:6]]
  _task(tmp_path, "bj_mc", _mc_rows(mc), MULTIPLE_CHOICE)
  cloze_rows = [{"context": i.context, "word": i.word} for i in cloze]
  _task(tmp_path, "bj_cloze", cloze_rows, CLOZE)
  _task(tmp_path, "bj_gen", cloze_rows, GENERATION)
  _task(tmp_path, "bj_roll", [{"text": t} for t in texts], ROLLING)
  out = lm_eval.simple_evaluate(model=BigsciLM.from_scorer(scorer),
                                tasks=["bj_mc", "bj_cloze", "bj_gen", "bj_roll"],
                                task_manager=TaskManager(include_path=str(tmp_path)),
                                log_samples=True, bootstrap_iters=0)
  results, samples = out["results"], out["samples"]

  builtin = mc_tasks.score(mc, lambda requests: scorer.loglikelihood(requests)[0])
  assert results["bj_mc"]["acc,none"] == builtin["acc"]
  assert results["bj_mc"]["acc_bytes,none"] == builtin["acc_norm"]

  builtin = mc_tasks.score_cloze(cloze, scorer)
  assert results["bj_cloze"]["perplexity,none"] == pytest.approx(builtin["ppl"], rel=1e-9)
  assert results["bj_cloze"]["acc,none"] == builtin["acc"]
  assert results["bj_gen"]["exact_match,first_word"] == builtin["exact_match"]
  generations = scorer.generate_until([i.context for i in cloze], ("\n",), 8)
  harness = {s["doc_id"]: s["filtered_resps"][0] for s in samples["bj_gen"]}
  assert [harness[i] for i in range(len(cloze))] == [
      mc_tasks.first_word(g) or "[invalid]" for g in generations]

  rolling = scorer.loglikelihood_rolling(texts)
  size = sum(len(t.encode()) for t in texts)
  assert results["bj_roll"]["bits_per_byte,none"] == pytest.approx(
      -rolling.sum() / size / math.log(2), rel=1e-9)


@pytest.mark.slow  # the adapter agrees with the builtin scorer fast in test_simple_evaluate_with_the_adapter_matches_the_builtin_scores
def test_lm_eval_command_and_builtin_evaluator_agree_on_a_trained_run(tmp_path,
                                                                      handbook_data_dir):
  """python -m bigsci_jax.lm_eval on a prefix-LM checkpoint, 8 devices sharing the batch."""
  pytest.importorskip("seqio")
  import train
  model_dir = str(tmp_path / "run")
  assert train.main([f"--model_dir={model_dir}", "--no_progress", "--gin.TRAIN_STEPS=4",
                     f"--gin.DataConfig.data_dir='{handbook_data_dir}'",
                     "--gin.DataConfig.languages=['en', 'fr', 'ja']",
                     "--gin.DataConfig.vocab_size=4000", "--gin.TrainConfig.eval_batches=2",
                     "--gin.ModelConfig.mask='prefix'", "--gin.BATCH_SIZE=8",
                     "--gin.TrainConfig.checkpoint_every=4"]) == 0
  items = mc_tasks.next_sentence_items("fr", limit=16)
  _task(tmp_path, "bj_next_sentence_fr", _mc_rows(items), MULTIPLE_CHOICE)
  env = dict(os.environ, HF_HOME=str(tmp_path / "hf"), JAX_PLATFORMS="cpu")
  proc = subprocess.run(
      [sys.executable, "-m", "bigsci_jax.lm_eval", "--model", "bigsci_jax", "--model_args",
       f"model_dir={model_dir}", "--tasks", "bj_next_sentence_fr", "--include_path",
       str(tmp_path), "--batch_size", "8", "--output_path", str(tmp_path / "out")],
      env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  (path,) = glob.glob(str(tmp_path / "out" / "**" / "results_*.json"), recursive=True)
  harness = json.load(open(path))["results"]["bj_next_sentence_fr"]
  builtin = evaluate.evaluate_dir(model_dir, ["next_sentence/fr"], limit=16)["tasks"][
      "next_sentence/fr"]
  assert harness["acc,none"] == builtin["acc"]
  assert harness["acc_bytes,none"] == builtin["acc_norm"]
  assert harness["acc_stderr,none"] == pytest.approx(builtin["acc_stderr"], rel=1e-9)

  # The run's real vocabulary: byte fallback spells text it never saw.
  run, runtime, params, _ = evaluate.restore(model_dir)
  scorer = evaluate.make_scorer(model_dir, run, runtime, params)
  odd = "🦜 ǂʼ ᚠᛇ"
  assert scorer.tokenizer.decode(scorer.tokenizer.encode(odd)) == odd
  values, _ = scorer.loglikelihood([("Debian", " " + odd)])
  assert np.isfinite(values).all() and values[0] < 0

  bad = subprocess.run([sys.executable, "-m", "bigsci_jax.lm_eval", "--model", "bigsci_jax",
                        "--model_args", f"model_dir={tmp_path / 'nothing'}", "--tasks",
                        "bj_next_sentence_fr", "--include_path", str(tmp_path)],
                       env=env, capture_output=True, text=True, timeout=300)
  assert bad.returncode == 2 and "holds no run" in bad.stderr


def test_prompt_tuning_reads_a_harness_task_as_the_harness_asks_it(tmp_path, monkeypatch):
  """Training and evaluation items of a local multiple-choice YAML task: the harness's
  own contexts, choices and answers (a target given as text or as an index)."""
  from bigsci_jax import prompt_tune
  monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
  train_rows = [{"context": f"Q{i}: which?", "choices": ["alpha", "beta", "gamma"],
                 "answer": i % 3} for i in range(5)]
  test_rows = [{"context": "Q: which one?", "choices": ["x", "y"], "answer": 1}]
  _jsonl(tmp_path / "bj_train.jsonl", train_rows)
  _jsonl(tmp_path / "bj_test.jsonl", test_rows)
  as_text = MULTIPLE_CHOICE.replace("doc_to_target: answer",
                                    'doc_to_target: "{{choices[answer]}}"')
  (tmp_path / "bj_tune.yaml").write_text(
      f"task: bj_tune\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
      f"    train: {tmp_path / 'bj_train.jsonl'}\n    test: {tmp_path / 'bj_test.jsonl'}\n"
      f"training_split: train\ntest_split: test\ndescription: \"Pick one.\\n\"\n{as_text}")
  local = TaskManager(include_path=str(tmp_path), include_defaults=False)  # no index of all
  train = prompt_tune.lm_eval_items("bj_tune", "train", 100, str(tmp_path), local)
  assert [(i.context, i.choices, i.answer, i.delimiter) for i in train] == [
      (f"Pick one.\nQ{k}: which?", ("alpha", "beta", "gamma"), k % 3, " ") for k in range(5)]
  (test,) = prompt_tune.lm_eval_items("bj_tune", "eval", 100, str(tmp_path), local)
  assert test == mc_tasks.Item("Pick one.\nQ: which one?", ("x", "y"), 1)
  with pytest.raises(evaluate.EvaluationError, match="unknown task 'bj_nothing'"):
    prompt_tune.lm_eval_items("bj_nothing", "train", 10, str(tmp_path), local)
