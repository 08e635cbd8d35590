"""scaling diagnose: effective model size on a fitted law, and on a downstream-score law."""

import csv
import json

import numpy as np
import pytest

import train
from bigsci_jax import flops, loop
from bigsci_jax.metrics import read_metrics
from bigsci_jax.scaling import diagnose
from bigsci_jax.scaling.__main__ import main as scaling_main

LAW = dict(E=1.69, A=406.4, B=410.7, alpha=0.34, beta=0.28)  # Hoffmann et al.'s fit


def _fit_file(tmp_path, law=LAW):
  path = tmp_path / "fit.json"
  path.write_text(json.dumps({"approach": "3", **law, "a": 0.45}))
  return str(path)


def _last_json(text):
  return json.loads(text.strip().splitlines()[-1])


@pytest.mark.parametrize("n,d", [(1.3e10, 2.6e11), (7e7, 1e9), (1.76e11, 3.5e11)])
def test_a_loss_made_at_three_tenths_of_n_reads_back_three_tenths(tmp_path, capsys, n, d):
  loss = diagnose.law_loss(LAW, 0.3 * n, d)
  assert scaling_main(["diagnose", "--fit", _fit_file(tmp_path), "--params", str(n),
                       "--tokens", str(d), "--loss", repr(loss)]) == 0
  out = capsys.readouterr().out
  result = _last_json(out)
  assert result["N_eff"] == pytest.approx(0.3 * n, rel=0.01)
  assert result["N_eff_ratio"] == pytest.approx(0.3, rel=0.01)
  assert result["loss_predicted"] == pytest.approx(diagnose.law_loss(LAW, n, d))
  # D_eff: the tokens that give the same loss at the model's own size
  assert diagnose.law_loss(LAW, n, result["D_eff"]) == pytest.approx(loss, rel=1e-9)
  assert result["D_eff"] < d
  assert "scores like a" in out and "below 0.5 of its size" in out


def test_a_healthy_run_is_not_flagged(capsys, tmp_path):
  n, d = 1e9, 2e10
  assert scaling_main(["diagnose", "--fit", _fit_file(tmp_path), "--params", str(n),
                       "--tokens", str(d), "--loss", repr(diagnose.law_loss(LAW, 0.8 * n, d))]) == 0
  out = capsys.readouterr().out
  assert _last_json(out)["N_eff_ratio"] == pytest.approx(0.8, rel=1e-6)
  assert "below 0.5" not in out


def test_a_loss_no_size_reaches_says_so(tmp_path, capsys):
  d = 1e10
  floor = LAW["E"] + LAW["B"] / d ** LAW["beta"]  # the loss of an infinite model at this D
  assert scaling_main(["diagnose", "--fit", _fit_file(tmp_path), "--params", "1e9",
                       "--tokens", str(d), "--loss", repr(floor - 0.01)]) == 0
  out = capsys.readouterr().out
  result = _last_json(out)
  assert result["N_eff"] is None and result["N_eff_ratio"] is None
  assert "below what any model size reaches" in out


def test_downstream_score_law_inverts(tmp_path, capsys):
  rng = np.random.default_rng(0)
  sizes = np.exp(np.linspace(np.log(1e8), np.log(1e10), 6))
  path = tmp_path / "runs.csv"
  with open(path, "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(["params", "tokens", "loss", "acc"])
    for n in sizes:
      w.writerow([n, 20 * n, 3.0, 0.1 + 0.04 * np.log(n) + 0.002 * rng.standard_normal()])
  n, true_eff = 5e9, 1.5e9
  assert scaling_main(["diagnose", "--fit", _fit_file(tmp_path), "--params", str(n), "--tokens",
                       "1e11", "--loss", "2.2", "--runs", str(path), "--metric", "acc",
                       "--metric_value", str(0.1 + 0.04 * np.log(true_eff))]) == 0
  metric = _last_json(capsys.readouterr().out)["metric"]
  assert metric["N_eff"] == pytest.approx(true_eff, rel=0.15)
  assert metric["N_eff_ratio"] == pytest.approx(true_eff / n, rel=0.15)
  assert not metric["extrapolated"]


def test_a_trained_model_dir_is_read_from_its_checkpoint_and_metrics(tmp_path, capsys):
  model_dir = str(tmp_path / "run")
  assert train.main([f"--model_dir={model_dir}", "--no_progress", "--gin.MIXTURE='synthetic'",
                     "--gin.ModelConfig.vocab_size=64", "--gin.TRAIN_STEPS=3", "--gin.BATCH_SIZE=4",
                     "--gin.SEQ_LEN=16", "--gin.ModelConfig.d_model=32", "--gin.ModelConfig.d_ff=64",
                     "--gin.TrainConfig.eval_batches=1"]) == 0
  capsys.readouterr()
  assert scaling_main(["diagnose", "--fit", _fit_file(tmp_path), "--model_dir", model_dir]) == 0
  result = _last_json(capsys.readouterr().out)
  run = loop.read_run(model_dir)
  assert result["N"] == flops.param_counts(run.model).total
  assert result["D"] == 3 * 4 * 16
  assert result["loss"] == read_metrics(model_dir, "eval")[-1]["loss"]


@pytest.mark.parametrize("case", ["missing_keys", "no_checkpoint", "no_metric_column", "partial"])
def test_bad_input_is_one_sentence(tmp_path, capsys, case):
  fit_path = _fit_file(tmp_path)
  args = ["diagnose", "--fit", fit_path, "--params", "1e9", "--tokens", "1e10", "--loss", "3"]
  if case == "missing_keys":
    (tmp_path / "fit.json").write_text(json.dumps({"a": 0.5, "b": 0.5, "k_n": 1.0}))
    expected = "lacks approach 3's key(s) E, A, B, alpha, beta"
  elif case == "no_checkpoint":
    (tmp_path / "run").mkdir()
    loop.write_atomic(str(tmp_path / "run" / "config.json"),
                      json.dumps(loop.RunConfig().to_dict()))
    args = ["diagnose", "--fit", fit_path, "--model_dir", str(tmp_path / "run")]
    expected = "has no checkpoint yet"
  elif case == "no_metric_column":
    (tmp_path / "runs.csv").write_text("params,tokens,loss\n1e8,1e9,3\n")
    args += ["--runs", str(tmp_path / "runs.csv"), "--metric", "acc", "--metric_value", "0.5"]
    expected = "has no numeric 'acc' column"
  else:
    args = args[:-2]
    expected = "missing --loss"
  assert scaling_main(args) == 2
  err = capsys.readouterr().err.strip()
  assert expected in err and len(err.splitlines()) == 1, err
