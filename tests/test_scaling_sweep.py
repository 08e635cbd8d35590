"""Plan -> run -> fit -> plot, end to end on CPU with the synthetic source and the handbook."""

import csv
import json
import os

import numpy as np
import pytest

from bigsci_jax.config import (BatchConfig, DataConfig, MeshConfig, ModelConfig, RunConfig,
                               TrainConfig, to_gin)
from bigsci_jax.metrics import read_metrics
from bigsci_jax.scaling import flops_per_token, plan
from bigsci_jax.scaling.__main__ import main as scaling_main

BASE = RunConfig(model=ModelConfig(vocab_size=256, max_len=512, dtype="float32"),
                 batch=BatchConfig(batch_size=8, seq_len=64), mesh=MeshConfig(1, 1, 1),
                 data=DataConfig(mean_doc_len=32), train=TrainConfig(eval_batches=2))


def _base_file(tmp_path):
  path = tmp_path / "base.json"
  path.write_text(json.dumps(BASE.to_dict()))
  return str(path)


def _last_json(capsys):
  return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def _sweep(tmp_path, capsys, budgets, sizes, aspect=32, more=()):
  """(plan folder, runs.csv rows, the run command's summary)."""
  out = str(tmp_path / "plan")
  assert scaling_main(["plan", "--budgets", *map(str, budgets), "--sizes_per_budget", str(sizes),
                       "--spread", "3", "--head_dim", "16", "--aspect", str(aspect),
                       "--batch_size", "8", "--out", out,
                       "--base", _base_file(tmp_path), *more]) == 0
  planned = _last_json(capsys)
  assert scaling_main(["run", "--plan", out, "--no_progress"]) == 0
  summary = _last_json(capsys)
  assert summary["runs"] == planned["runs"]
  with open(os.path.join(out, "runs.csv")) as f:
    return out, list(csv.DictReader(f)), summary


def test_plan_budgets_are_spent_as_planned():
  spec = plan.PlanSpec(budgets=(3e10, 1e11), sizes_per_budget=3, spread=3.0, batch_size=plan.HparamRule(8))
  runs = plan.make_plan(BASE, spec, plan.ShapeRule(head_dim=16))
  for _, run, row in runs:
    spent = run.train.train_steps * run.batch.batch_size * 64 * flops_per_token(run.model, 64)
    assert abs(spent - row["budget"]) / row["budget"] < 0.01  # rounding to whole steps only
    assert run.optimizer.warmup_steps == min(run.train.train_steps // 2,
                                             -(-row["params_non_embedding"] // (8 * 64)))
  assert to_gin(runs[0][1]).count("\n") == sum(len(vars(getattr(runs[0][1], p)))
                                                    for p in vars(runs[0][1]))


def test_tiny_sweep_runs_resumes_fits_and_plots(tmp_path, capsys):
  """A 'wsd' plan: the 296-step run of the smallest model is a cooldown branch of its
  988-step run from step 237 (scaling/sweep.py; test_train checks that a branch ends
  where the run trained alone ends); the other model's runs differ in warmup and train
  apart."""
  out, rows, summary = _sweep(tmp_path, capsys, (3e10, 1e11), 3, more=("--decay", "wsd"))
  assert len(rows) == 4 and all(np.isfinite(float(r["loss"])) for r in rows)
  (branch,) = [r for r in rows if int(r["tokens_trained"]) < int(r["tokens"])]
  saved = json.load(open(os.path.join(out, "runs", branch["run"], "config.json")))["train"]
  trunk = os.path.basename(saved["branch_from"])
  assert saved["branch_step"] == 237 and trunk.startswith("c1.00e11_") and trunk[9:] == branch["run"][9:]
  assert int(branch["tokens_trained"]) == (296 - 237) * 8 * 64
  assert summary["tokens_planned"] - summary["tokens_trained"] == 237 * 8 * 64
  # More compute for the same model gives a lower loss.
  by_model = {}
  for r in rows:
    by_model.setdefault(r["params"], []).append((float(r["budget"]), float(r["loss"])))
  for points in by_model.values():
    points.sort()
    assert points[-1][1] < points[0][1]
  # curves.csv: every logged step, its FLOP columns following the tokens seen.
  with open(os.path.join(out, "curves.csv")) as f:
    curves = list(csv.DictReader(f))
  for r in rows:
    mine = [c for c in curves if c["run"] == r["run"]]
    assert [int(c["step"]) for c in mine] == list(range(1, len(mine) + 1))
    for key in ("tokens", "flops", "flops_kaplan", "flops_porian"):
      assert float(mine[-1][key]) == pytest.approx(float(r[key]), rel=1e-3), key
    assert float(mine[0]["flops"]) == pytest.approx(float(r["flops"]) / len(mine), rel=1e-3)
  # Running the plan again trains nothing: every run is already finished.
  metrics = os.path.join(out, "runs", rows[0]["run"], "metrics.jsonl")
  before = os.path.getmtime(metrics)
  assert scaling_main(["run", "--plan", out, "--no_progress"]) == 0
  assert os.path.getmtime(metrics) == before
  capsys.readouterr()
  assert scaling_main(["fit", "--approach", "3", "--runs", os.path.join(out, "runs.csv"),
                       "--bootstrap", "20", "--out", os.path.join(out, "fit")]) == 0
  result = _last_json(capsys)
  assert {"E", "A", "B", "alpha", "beta", "a", "b", "a_ci"} <= set(result)
  # Porian et al.'s first cause: the same runs under Kaplan's count (non-embedding N,
  # no head FLOPs) and Porian's give different exponents, and both are reported.
  assert set(result["counting"]) == {"kaplan", "chinchilla", "porian"}
  assert abs(result["counting"]["kaplan"]["a"] - result["counting"]["porian"]["a"]) > 0.01
  assert all(os.path.getsize(p) > 10_000 for p in result["plots"])


def test_a_wsd_grid_trains_each_size_once_plus_cooldowns(tmp_path, capsys):
  """plan-grid: a size x 4, 8, 16 tokens per parameter; with --decay wsd the 16x run is
  the trunk and the others are branches from their cooldown starts (20%): 104 + 5 + 10
  of the 182 planned steps are trained. More data, lower loss."""
  out = str(tmp_path / "grid")
  assert scaling_main(["plan-grid", "--params", "3e3", "--tokens_per_param", "4", "8", "16",
                       "--head_dim", "16", "--aspect", "8", "--batch_size", "8", "--decay", "wsd",
                       "--out", out, "--base", _base_file(tmp_path)]) == 0
  assert _last_json(capsys)["runs"] == 3
  assert scaling_main(["run", "--plan", out, "--no_progress"]) == 0
  summary = _last_json(capsys)
  assert summary["tokens_planned"] == 182 * 8 * 64 and summary["tokens_trained"] == 119 * 8 * 64
  with open(os.path.join(out, "runs.csv")) as f:
    rows = list(csv.DictReader(f))
  for size in {r["params"] for r in rows}:
    mine = sorted((r for r in rows if r["params"] == size), key=lambda r: float(r["tokens"]))
    n = float(mine[0]["params_non_embedding"])
    assert [round(float(r["tokens"]) / n) for r in mine] == [4, 8, 16]
    assert [int(r["tokens_trained"]) < int(r["tokens"]) for r in mine] == [True, True, False]
    losses = [float(r["loss"]) for r in mine]
    assert losses[0] > losses[1] > losses[2], losses


def test_budget_too_small_for_the_smallest_model_is_one_sentence(tmp_path, capsys):
  rc = scaling_main(["plan", "--budgets", "1e6", "--out", str(tmp_path / "p"),
                     "--base", _base_file(tmp_path)])
  err = capsys.readouterr().err.strip()
  assert rc == 2 and len(err.splitlines()) == 1 and "raise the budget" in err, err


@pytest.mark.slow
def test_three_budget_sweep_with_three_sizes_each(tmp_path, capsys):
  out, rows, _ = _sweep(tmp_path, capsys, (3e10, 1e11, 3e11), 3, aspect=16)
  assert len(rows) >= 8  # neighbouring targets can round to the same shape
  capsys.readouterr()
  rc = scaling_main(["fit", "--approach", "3", "--runs", os.path.join(out, "runs.csv"),
                     "--bootstrap", "50", "--out", os.path.join(out, "fit"), "--compute", "1e12"])
  assert rc == 0 and _last_json(capsys)["optimal"][0]["N"] > 0


def _handbook_base(tmp_path, data_dir):
  base = RunConfig(model=ModelConfig(vocab_size=1024, max_len=512, dtype="float32"),
                   batch=BatchConfig(batch_size=8, seq_len=64), mesh=MeshConfig(1, 1, 1),
                   data=DataConfig(mixture="handbook_multilingual", languages=("en", "fr"),
                                   data_dir=data_dir, vocab_size=1000),
                   train=TrainConfig(eval_batches=2))
  path = tmp_path / "handbook_base.json"
  path.write_text(json.dumps(base.to_dict()))
  return str(path)


def _per_language_sweep(tmp_path, capsys, data_dir, budgets, sizes):
  pytest.importorskip("seqio")
  out = str(tmp_path / "plan")
  assert scaling_main(["plan", "--budgets", *map(str, budgets), "--sizes_per_budget", str(sizes),
                       "--spread", "3", "--head_dim", "16", "--batch_size", "8", "--out", out,
                       "--base", _handbook_base(tmp_path, data_dir)]) == 0
  capsys.readouterr()
  assert scaling_main(["run", "--plan", out, "--no_progress"]) == 0
  by_lang_csv = _last_json(capsys)["runs_by_lang_csv"]
  with open(by_lang_csv) as f:
    by_lang = list(csv.DictReader(f))
  with open(os.path.join(out, "runs.csv")) as f:
    runs = list(csv.DictReader(f))
  assert sorted((r["run"], r["lang"]) for r in by_lang) == sorted(
      (r["run"], lang) for r in runs for lang in ("en", "fr"))
  for r in by_lang:  # each row is that run's final per-language evaluation
    final = read_metrics(os.path.join(out, "runs", r["run"]), "eval")[-1]
    assert float(r["loss"]) == pytest.approx(final[f"loss/{r['lang']}"])
    assert float(r["bpb"]) == pytest.approx(final[f"bpb/{r['lang']}"]) and float(r["bpb"]) > 0
  return out, by_lang_csv


@pytest.mark.slow  # the sweep mechanics are fast in test_tiny_sweep_runs_resumes_fits_and_plots
def test_sweep_on_the_handbook_writes_per_language_rows(tmp_path, capsys, handbook_data_dir):
  _per_language_sweep(tmp_path, capsys, handbook_data_dir, (3e10,), 2)


@pytest.mark.slow
def test_per_language_laws_from_a_handbook_sweep(tmp_path, capsys, handbook_data_dir):
  out, by_lang_csv = _per_language_sweep(tmp_path, capsys, handbook_data_dir,
                                         (1e11, 3e11, 1e12), 3)
  assert scaling_main(["fit", "--approach", "3", "--runs", by_lang_csv, "--by", "lang",
                       "--bootstrap", "20", "--out", os.path.join(out, "fit")]) == 0
  result = _last_json(capsys)
  assert set(result["groups"]) == {"en", "fr"}
  assert all(g["alpha"] > 0 and g["beta"] > 0 for g in result["groups"].values())
  assert os.path.getsize(result["plots"][0]) > 10_000
