"""scaling mixture: per-language data laws -> mixture rates, against a brute-force optimum."""

import csv
import json

import gin
import numpy as np
import pytest

from bigsci_jax.config import DataConfig
from bigsci_jax.data import temperature_rates
from bigsci_jax.scaling import mixture
from bigsci_jax.scaling.__main__ import main as scaling_main

# Small-model-like laws: 3.3 -> 2.1 nats over the two decades of data measured.
TRUE = {"en": mixture.DataLaw(1.6, 300.0, 0.28), "fr": mixture.DataLaw(1.8, 900.0, 0.34),
        "sw": mixture.DataLaw(2.2, 120.0, 0.22)}
BUDGET = 1e10


def _write_runs(path, seed=0, points=7, noise=0.005, laws=TRUE):
  rng = np.random.default_rng(seed)
  with open(path, "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(["language", "tokens", "loss"])
    for lang, law in laws.items():
      for d in np.exp(np.linspace(np.log(1e8), np.log(1e10), points)):  # two decades
        w.writerow([lang, f"{d:.6g}", f"{law.loss(d) * (1 + noise * rng.standard_normal()):.6f}"])
  return str(path)


def brute_force(objective, caps=None, step=1e-3):
  """The true optimum over a grid of the simplex, from the true laws."""
  langs = sorted(TRUE)
  grid = np.arange(step, 1.0, step)
  p1, p2 = (a.ravel() for a in np.meshgrid(grid, grid))
  p = np.stack([p1, p2, 1.0 - p1 - p2])
  ok = p[2] > step / 2
  if caps:
    ok &= np.all(p <= np.array([caps[l] for l in langs])[:, None] + 1e-12, axis=0)
  p = p[:, ok]
  losses = np.stack([TRUE[l].loss(p[i] * BUDGET) for i, l in enumerate(langs)])
  if objective == "mean":
    score = losses.mean(axis=0)
  else:
    score = (losses - np.array([TRUE[l].loss(BUDGET) for l in langs])[:, None]).max(axis=0)
  best = p[:, np.argmin(score)]
  return dict(zip(langs, best))


def _last_json(text):
  return json.loads(text.strip().splitlines()[-1])


@pytest.mark.parametrize("objective", ["mean", "max"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_fitted_rates_are_within_003_of_the_true_optimum(tmp_path, capsys, objective, seed):
  runs = _write_runs(tmp_path / "runs.csv", seed)
  assert scaling_main(["mixture", "--runs", runs, "--budget", str(BUDGET),
                       "--objective", objective]) == 0
  result = _last_json(capsys.readouterr().out)
  truth = brute_force(objective)
  assert sum(result["rates"].values()) == pytest.approx(1.0)
  for lang in TRUE:
    assert abs(result["rates"][lang] - truth[lang]) < 0.03, (lang, result["rates"], truth)
    true_loss = TRUE[lang].loss(result["rates"][lang] * BUDGET)
    assert result["predicted_loss"][lang] == pytest.approx(true_loss, rel=0.01)


@pytest.mark.parametrize("objective", ["mean", "max"])
def test_exact_laws_give_the_brute_force_optimum(objective):
  rates = mixture.optimal_rates(TRUE, BUDGET, objective)
  truth = brute_force(objective)
  for lang in TRUE:
    assert rates[lang] == pytest.approx(truth[lang], abs=2e-3)
  if objective == "max":  # the optimum gives up the same loss in every language
    gaps = [TRUE[l].loss(rates[l] * BUDGET) - TRUE[l].loss(BUDGET) for l in TRUE]
    assert max(gaps) - min(gaps) < 1e-9


def test_the_epoch_cap_binds_when_a_language_is_small(tmp_path, capsys):
  runs = _write_runs(tmp_path / "runs.csv")
  sizes = {"en": 1e11, "fr": 1e11, "sw": 4e8}  # sw: 4 epochs = 1.6e9 tokens = 0.16 of the budget
  (tmp_path / "sizes.json").write_text(json.dumps(sizes))
  for objective in ("mean", "max"):
    assert scaling_main(["mixture", "--runs", runs, "--budget", str(BUDGET), "--sizes",
                         str(tmp_path / "sizes.json"), "--epochs_max", "4",
                         "--objective", objective]) == 0
    out = capsys.readouterr().out
    rates = _last_json(out)["rates"]
    assert rates["sw"] == pytest.approx(4 * 4e8 / BUDGET, rel=1e-6), rates
    assert "(epoch cap)" in out and sum(rates.values()) == pytest.approx(1.0)
    if objective == "mean":
      truth = brute_force("mean", caps={k: 4 * v / BUDGET for k, v in sizes.items()})
      for lang in TRUE:
        assert abs(rates[lang] - truth[lang]) < 0.03


def test_the_closest_temperature_and_the_gin_snippet(tmp_path):
  sizes = {"en": 5e9, "fr": 1e9, "sw": 3e7}
  alpha, distance = mixture.closest_temperature(temperature_rates(sizes, 0.37), sizes)
  assert alpha == pytest.approx(0.37, abs=1e-3) and distance < 1e-12
  rates = mixture.optimal_rates(TRUE, BUDGET, "mean")
  gin.clear_config()
  gin.external_configurable(DataConfig)
  try:
    gin.parse_config(mixture.gin_snippet(rates))
    bound = gin.get_configurable(DataConfig)().rates
  finally:
    gin.clear_config()
  assert bound.keys() == rates.keys()
  assert all(abs(bound[k] - rates[k]) < 1e-6 for k in rates)


@pytest.mark.parametrize("case", ["two_points", "budget_too_big", "missing_size", "not_a_number"])
def test_bad_input_is_one_sentence(tmp_path, capsys, case):
  runs = _write_runs(tmp_path / "runs.csv")
  args = ["mixture", "--runs", runs, "--budget", str(BUDGET)]
  if case == "two_points":
    _write_runs(tmp_path / "runs.csv", points=2)
    expected = "has 2 distinct token count(s)"
  elif case == "budget_too_big":
    (tmp_path / "sizes.json").write_text(json.dumps({"en": 1e8, "fr": 1e8, "sw": 1e8}))
    args += ["--sizes", str(tmp_path / "sizes.json")]
    expected = "cannot fill a budget of 1e+10 tokens"
  elif case == "missing_size":
    (tmp_path / "sizes.json").write_text(json.dumps({"en": 1e10}))
    args += ["--sizes", str(tmp_path / "sizes.json")]
    expected = "has no size for fr, sw"
  else:
    text = (tmp_path / "runs.csv").read_text().replace("language,tokens,loss\n",
                                                       "language,tokens,loss\nen,lots,3.0\n")
    (tmp_path / "runs.csv").write_text(text)
    expected = "line 2: column 'tokens' holds 'lots'"
  assert scaling_main(args) == 2
  err = capsys.readouterr().err.strip()
  assert expected in err and len(err.splitlines()) == 1, err

