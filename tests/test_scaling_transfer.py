"""scaling transfer: effective data transferred, D_T = k D_F^alpha N^beta, on synthetic runs."""

import csv
import json
import os

import numpy as np
import pytest

from bigsci_jax.scaling.__main__ import main as scaling_main

TARGETS = {"fr": dict(E=1.7, A=300.0, a=0.32, B=400.0, b=0.3),
           "sw": dict(E=2.1, A=150.0, a=0.3, B=250.0, b=0.26)}
PAIRS = {("en", "fr"): dict(k=1.9e4, alpha=0.18, beta=0.38),  # Hernandez et al.'s text -> code
         ("en", "sw"): dict(k=500.0, alpha=0.3, beta=0.35),
         ("de", "fr"): dict(k=60.0, alpha=0.45, beta=0.3)}
SIZES = (1e7, 3e7, 1e8)


def _loss(target, n, d):
  t = TARGETS[target]
  return t["E"] + t["A"] / n ** t["a"] + t["B"] / d ** t["b"]


def _write_runs(path, negative=False, noise=0.0, seed=0):
  rng = np.random.default_rng(seed)
  rows = []
  for target in TARGETS:
    for n in SIZES:
      for d in np.exp(np.linspace(np.log(1e6), np.log(1e10), 8)):
        rows.append(dict(target=target, source="", params=n, tokens=d, loss=_loss(target, n, d)))
  for (source, target), p in PAIRS.items():
    for n in SIZES:
      for d_f in np.exp(np.linspace(np.log(1e6), np.log(1e8), 5)):
        d_t = p["k"] * d_f ** p["alpha"] * n ** p["beta"]
        rows.append(dict(target=target, source=source, params=n, tokens=d_f,
                         loss=_loss(target, n, d_f + d_t)))
  if negative:  # a source that hurts: the mixed run is as good as half the target data
    for n in SIZES:
      for d_f in (1e6, 1e7, 1e8):
        rows.append(dict(target="sw", source="xx", params=n, tokens=d_f,
                         loss=_loss("sw", n, 0.5 * d_f)))
  with open(path, "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=["target", "source", "params", "tokens", "loss"])
    w.writeheader()
    for r in rows:
      r["loss"] *= 1 + noise * rng.standard_normal()
      w.writerow(r)
  return str(path)


def test_known_transfer_laws_are_recovered_within_10_percent(tmp_path, capsys):
  runs = _write_runs(tmp_path / "runs.csv", negative=True)
  assert scaling_main(["transfer", "--runs", runs, "--out", str(tmp_path / "out")]) == 0
  result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  for (source, target), p in PAIRS.items():
    fitted = result["pairs"][f"{source}->{target}"]
    for key in ("k", "alpha", "beta"):
      assert fitted[key] == pytest.approx(p[key], rel=0.1), (source, target, key, fitted)
  hurt = result["pairs"]["xx->sw"]
  assert hurt["negative"] == hurt["points"] == 9 and hurt["k"] is None
  assert result["sources"] == ["de", "en", "xx"] and result["targets"] == ["fr", "sw"]
  k = result["k"]
  assert k[0][1] is None and k[2][1] is None  # de -> sw never ran; xx -> sw did not transfer
  assert k[1][0] == pytest.approx(PAIRS[("en", "fr")]["k"], rel=0.1)
  assert os.path.getsize(result["plot"]) > 5000
  assert json.load(open(result["json"]))["k"] == k


def test_small_noise_keeps_the_exponents(tmp_path, capsys):
  runs = _write_runs(tmp_path / "runs.csv", noise=0.001, seed=3)
  assert scaling_main(["transfer", "--runs", runs]) == 0
  result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  fitted = result["pairs"]["en->fr"]
  assert fitted["alpha"] == pytest.approx(0.18, abs=0.05)
  assert fitted["beta"] == pytest.approx(0.38, abs=0.05)


@pytest.mark.parametrize("case", ["no_target_only", "no_source", "columns"])
def test_bad_input_is_one_sentence(tmp_path, capsys, case):
  path = tmp_path / "runs.csv"
  if case == "no_target_only":
    path.write_text("target,source,params,tokens,loss\nfr,en,1e7,1e6,3.0\n"
                    "fr,,1e8,1e6,3.0\nfr,,1e8,1e7,2.9\nfr,,1e8,1e8,2.8\n")
    expected = "no target-only runs of 'fr' at N=1e+07"
  elif case == "no_source":
    path.write_text("target,source,params,tokens,loss\nfr,,1e8,1e6,3.0\nfr,,1e8,1e7,2.9\n"
                    "fr,,1e8,1e8,2.8\n")
    expected = "has no runs with a source language"
  else:
    path.write_text("language,tokens,loss\nfr,1e6,3.0\n")
    expected = "needs columns target, source, params, tokens, loss"
  assert scaling_main(["transfer", "--runs", str(path)]) == 2
  err = capsys.readouterr().err.strip()
  assert expected in err and len(err.splitlines()) == 1, err
