"""Scaling-law fits: recovery of known laws, published data, bad input."""

import csv
import json
import os

import numpy as np
import pytest

from bigsci_jax.scaling import fit, table
from bigsci_jax.scaling.__main__ import main as scaling_main

SHARED = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                      "shared", "scaling-data")
TRUE = dict(E=1.69, A=406.4, B=410.7, alpha=0.34, beta=0.28)  # Hoffmann et al.'s own fit


def _law(n, d, p=TRUE):
  return p["E"] + p["A"] / n ** p["alpha"] + p["B"] / d ** p["beta"]


def _runs(n, d, loss, **extra):
  rows = [dict(params=a, tokens=b, loss=c, **{k: v[i] for k, v in extra.items()})
          for i, (a, b, c) in enumerate(zip(n, d, loss))]
  return table.from_rows(rows)


def _isoflop_table(budgets, sizes_per_budget=9, noise=0.0, seed=0):
  """Sizes log-spaced around each budget's true optimum, losses from the law."""
  rng = np.random.default_rng(seed)
  n, d, c = [], [], []
  for budget in budgets:
    n_opt = fit.optimum_approach3({**TRUE, "a": TRUE["beta"] / (TRUE["alpha"] + TRUE["beta"])},
                                  budget)["N"]
    for size in n_opt * np.exp(np.linspace(-1.5, 1.5, sizes_per_budget)):
      n.append(size), d.append(budget / (6 * size)), c.append(budget)
  n, d = np.array(n), np.array(d)
  loss = _law(n, d) * np.exp(noise * rng.standard_normal(len(n)))
  return _runs(n, d, loss, budget=c)


def test_approach3_recovers_known_law_inside_bootstrap_intervals():
  rng = np.random.default_rng(1)
  n = np.exp(rng.uniform(np.log(7e7), np.log(1.6e10), 300))
  d = np.exp(rng.uniform(np.log(5e9), np.log(5e11), 300))
  loss = _law(n, d) * np.exp(0.02 * rng.standard_normal(300))  # 2% multiplicative noise
  runs = _runs(n, d, loss)
  point = fit.fit_approach3(runs)
  ci = fit.bootstrap(fit.fit_approach3, runs, point, samples=100)
  for name, value in TRUE.items():
    lo, hi = ci[f"{name}_ci"]
    assert lo <= value <= hi, (name, value, lo, hi)
  a_true = TRUE["beta"] / (TRUE["alpha"] + TRUE["beta"])
  assert ci["a_ci"][0] <= a_true <= ci["a_ci"][1]


def test_approach2_recovers_known_exponent():
  runs = _isoflop_table([1e18 * 4 ** k for k in range(6)], noise=0.002)
  result = fit.fit_approach2(runs)
  a_true = TRUE["beta"] / (TRUE["alpha"] + TRUE["beta"])
  assert abs(result["a"] - a_true) <= 0.02 and abs(result["b"] - (1 - a_true)) <= 0.02
  assert result["budgets"] == 6


def test_approach1_recovers_known_exponent_from_training_curves():
  """Each model's curve: loss after D tokens, sampled along training."""
  runs_n, runs_d, run_ids = [], [], []
  for i, size in enumerate(np.exp(np.linspace(np.log(5e7), np.log(2e10), 14))):
    for tokens in np.exp(np.linspace(np.log(1e8), np.log(2e12), 60)):
      runs_n.append(size), runs_d.append(tokens), run_ids.append(f"m{i}")
  n, d = np.array(runs_n), np.array(runs_d)
  result = fit.fit_approach1(_runs(n, d, _law(n, d), run=run_ids))
  assert abs(result["a"] - TRUE["beta"] / (TRUE["alpha"] + TRUE["beta"])) <= 0.02


def test_kaplan_recovers_its_exponent():
  n = np.exp(np.linspace(np.log(1e6), np.log(1e9), 8))
  loss = (8.8e13 / n) ** 0.076
  result = fit.fit_kaplan(_runs(n, 1e12 * np.ones(8), loss))
  assert result["alpha_N"] == pytest.approx(0.076, rel=1e-3)
  assert result["N_c"] == pytest.approx(8.8e13, rel=1e-2)


@pytest.mark.skipif(not os.path.isdir(SHARED), reason="shared scaling data not present")
def test_approach3_reproduces_besiroglu_refit_of_chinchilla():
  with open(os.path.join(SHARED, "chinchilla", "svg_extracted_data.csv")) as f:
    rows = [{"params": r["Model Size"], "flops": r["Training FLOP"], "loss": r["loss"]}
            for r in csv.DictReader(f)]
  runs = table.from_rows(rows)
  runs = runs.take(runs.loss < np.sort(runs.loss)[-5])  # Epoch drops the 5 highest losses
  assert len(runs) == 240
  result = fit.fit_approach3(runs)
  published = dict(E=1.82, A=482, B=2085, alpha=0.348, beta=0.366, a=0.513)
  for name, value in published.items():
    assert result[name] == pytest.approx(value, rel=0.05 if name in "AB" else 0.01), name


def _porian(label_filter):
  with open(os.path.join(SHARED, "porian", "porian_isoflop_points.csv")) as f:
    points = list(csv.DictReader(f))
  with open(os.path.join(SHARED, "porian", "porian_fitted_exponents.csv")) as f:
    configs = [c for c in csv.DictReader(f) if label_filter(c)]
  keys = ("dataset", "hparams", "warmup", "decay", "param_count", "loss_split")
  for config in configs:
    rows = [{"params": p["n"], "tokens": p["t"], "flops": p["flops"], "loss": p["loss"],
             "budget": p["flops"]} for p in points if all(p[k] == config[k] for k in keys)]
    yield config, table.from_rows(rows)


@pytest.mark.skipif(not os.path.isdir(SHARED), reason="shared scaling data not present")
def test_approach2_matches_porian_exponents_and_shows_the_head_flops_effect():
  by_label = {}
  for config, runs in _porian(lambda c: c["dataset"] == "rw"):
    a = fit.fit_approach2(runs)["a"]
    assert abs(a - float(config["a_n_exponent"])) <= 0.035, (config["label"], a)
    by_label[config["label"]] = a
  # Porian et al.'s first cause: counting the head's FLOPs moves a from ~0.85 toward 0.7,
  # and with all three corrections it reaches Chinchilla's ~0.5.
  assert by_label["Reproducing Kaplan et al."] - by_label["Counting last layer FLOPs"] > 0.1
  assert abs(by_label["Optimizer tuning (no decay)"] - 0.5) < 0.02


def _write(tmp_path, header, rows):
  path = tmp_path / "runs.csv"
  with open(path, "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(header)
    w.writerows(rows)
  return str(path)


@pytest.mark.parametrize("header, rows, approach, message", [
    (["params", "tokens"], [[1e6, 1e9]], "3", "missing column(s) loss"),
    (["params", "tokens", "loss"], [[1e6, "lots", 3.0]], "3", "'lots', which is not a number"),
    (["params", "tokens", "loss"], [[1e6, 1e9, -3.0]], "3", "column 'loss' is -3; it must be positive"),
    (["params", "tokens", "loss", "budget"], [[1e6, 1e9, 3.0, 6e15], [2e6, 5e8, 2.9, 6e15]], "2",
     "has 2 model size(s); approach 2 needs at least 3 per budget"),
    # Bigger models worse at every data size (tiny data-starved runs): no law, no complex optimum.
    (["params", "tokens", "loss"], [[n, d, 5.0 + 0.3 * k - 0.2 * j] for k, n in enumerate((6e4, 2e5))
                                    for j, d in enumerate((2e4, 6e4, 2e5))], "3",
     "so loss does not fall with both model size and data"),
])
def test_bad_tables_stop_with_one_sentence(tmp_path, capsys, header, rows, approach, message):
  path = _write(tmp_path, header, rows)
  assert scaling_main(["fit", "--approach", approach, "--runs", path, "--bootstrap", "0"]) == 2
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1 and message in err, err


def test_cli_prints_json_with_intervals_and_prediction(tmp_path, capsys):
  runs = _isoflop_table([1e18 * 4 ** k for k in range(5)], noise=0.005)
  path = _write(tmp_path, ["params", "tokens", "loss", "budget"],
                zip(runs.params, runs.tokens, runs.loss, runs.extra["budget"]))
  out = tmp_path / "plots"
  assert scaling_main(["fit", "--approach", "2", "--runs", path, "--bootstrap", "50",
                       "--compute", "1e21", "--out", str(out)]) == 0
  result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert result["a_ci"][0] <= result["a"] <= result["a_ci"][1]
  assert result["optimal"][0]["N"] == pytest.approx(result["k_n"] * 1e21 ** result["a"])
  assert sorted(os.path.basename(p) for p in result["plots"]) == ["frontier_approach2.png",
                                                                   "isoflop.png"]
  for p in result["plots"]:
    with open(p, "rb") as f:
      assert f.read(8) == b"\x89PNG\r\n\x1a\n" and os.path.getsize(p) > 10_000


def test_approach3_optimum_matches_its_prefactors():
  runs = _isoflop_table([1e18 * 4 ** k for k in range(4)])
  result = fit.fit_approach3(runs)
  for c in (1e19, 1e23):
    opt = fit.optimum_approach3(result, c)
    assert opt["N"] == pytest.approx(result["k_n"] * c ** result["a"], rel=1e-9)
    assert opt["N"] * opt["D"] * 6 == pytest.approx(c, rel=1e-9)
    # N* minimises L(N, C / 6N): nudging N either way raises the predicted loss.
    loss = lambda n: result["E"] + result["A"] / n ** result["alpha"] + result["B"] / (c / 6 / n) ** result["beta"]
    assert loss(opt["N"]) < min(loss(opt["N"] * 1.05), loss(opt["N"] / 1.05))


def test_hyperparameter_laws_are_recovered_and_feed_the_plan(tmp_path, capsys):
  rows = []
  for n in (1e6, 4e6, 1.6e7, 6.4e7, 2.56e8):
    lr_opt, batch_opt = 0.3 * n ** -0.25, 2.0 * n ** 0.3
    for lr in lr_opt * np.exp(np.linspace(-1.2, 1.2, 7) + 0.1):
      for batch in batch_opt * np.exp(np.linspace(-1.0, 1.0, 5) - 0.05):
        loss = 3.0 * n ** -0.05 + 0.02 * np.log(lr / lr_opt) ** 2 + 0.01 * np.log(batch / batch_opt) ** 2
        rows.append([n, 1e9, loss, lr, batch])
  path = _write(tmp_path, ["params", "tokens", "loss", "learning_rate", "batch_size"], rows)
  laws = str(tmp_path / "laws.json")
  assert scaling_main(["fit-hparams", "--runs", path, "--out", laws]) == 0
  result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert result["learning_rate"]["exponent"] == pytest.approx(-0.25, abs=0.02)
  assert result["batch_size"]["exponent"] == pytest.approx(0.3, abs=0.02)
  assert result["learning_rate"]["coefficient"] == pytest.approx(0.3, rel=0.1)

  from bigsci_jax.config import BatchConfig, MeshConfig, ModelConfig, RunConfig
  base = tmp_path / "base.json"
  base.write_text(json.dumps(RunConfig(model=ModelConfig(vocab_size=256, dtype="float32"),
                                       batch=BatchConfig(batch_size=8, seq_len=64, micro_batch_size=1),
                                       mesh=MeshConfig(1, 1, 1)).to_dict()))
  out = tmp_path / "plan"
  assert scaling_main(["plan", "--budgets", "1e11", "--head_dim", "16", "--out", str(out),
                       "--base", str(base), "--hparams", laws]) == 0
  with open(out / "plan.csv") as f:
    planned = list(csv.DictReader(f))
  for row in planned:
    n = float(row["params_non_embedding"])
    expected_lr = result["learning_rate"]["coefficient"] * n ** result["learning_rate"]["exponent"]
    assert float(row["learning_rate"]) == pytest.approx(expected_lr, rel=1e-6)
    expected_batch = result["batch_size"]["coefficient"] * n ** result["batch_size"]["exponent"]
    assert int(row["batch_size"]) == max(1, round(expected_batch))


def test_fit_hparams_needs_its_columns(tmp_path, capsys):
  path = _write(tmp_path, ["params", "tokens", "loss"], [[1e6, 1e9, 3.0]])
  assert scaling_main(["fit-hparams", "--runs", path]) == 2
  assert "no 'learning_rate' column" in capsys.readouterr().err


def test_per_language_fits_tell_languages_apart(tmp_path, capsys):
  rng = np.random.default_rng(3)
  rows = []
  for lang, alpha in (("en", 0.34), ("fr", 0.25)):
    law = {**TRUE, "alpha": alpha}
    n = np.exp(rng.uniform(np.log(7e7), np.log(1.6e10), 150))
    d = np.exp(rng.uniform(np.log(5e9), np.log(5e11), 150))
    loss = _law(n, d, law) * np.exp(0.005 * rng.standard_normal(150))
    rows += [[a, b, c, lang] for a, b, c in zip(n, d, loss)]
  path = _write(tmp_path, ["params", "tokens", "loss", "lang"], rows)
  assert scaling_main(["fit", "--approach", "3", "--runs", path, "--by", "lang", "--bootstrap", "30",
                       "--out", str(tmp_path / "plots")]) == 0
  result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  en, fr = result["groups"]["en"], result["groups"]["fr"]
  assert en["alpha"] == pytest.approx(0.34, abs=0.03) and fr["alpha"] == pytest.approx(0.25, abs=0.03)
  assert en["alpha_ci"][0] > fr["alpha_ci"][1]  # the intervals separate the two languages
  assert os.path.getsize(result["plots"][0]) > 10_000
