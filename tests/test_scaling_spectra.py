"""scaling spectra: power-law tails of weight spectra (weightwatcher's alpha), without torch."""

import json
import os

import numpy as np
import pytest

import train
from bigsci_jax.scaling import spectra
from bigsci_jax.scaling.__main__ import main as scaling_main


def _pareto(alpha, n, rng):
  """n draws with density proportional to x^-alpha on [1, inf)."""
  return rng.pareto(alpha - 1.0, n) + 1.0


@pytest.mark.parametrize("alpha", [2.2, 3.0, 4.0, 5.0])
def test_a_pareto_spectrum_gives_its_exponent_back(alpha):
  values = _pareto(alpha, 2048, np.random.default_rng(int(alpha * 10)))
  fitted, xmin, distance, tail = spectra.fit_tail(values)
  assert abs(fitted - alpha) <= 0.25, (fitted, xmin, tail)
  assert tail >= spectra.MIN_TAIL and distance < 0.05


def test_a_matrix_built_from_a_pareto_spectrum_and_a_gaussian_one():
  rng = np.random.default_rng(0)
  n, alpha = 2048, 3.5
  u, _ = np.linalg.qr(rng.standard_normal((n, n)))
  v, _ = np.linalg.qr(rng.standard_normal((n, n)))
  lam = _pareto(alpha, n, rng)
  w = (u * np.sqrt(lam)) @ v.T  # U diag(sqrt(lambda)) V^T: W^T W has eigenvalues lambda
  values = spectra.eigenvalues(w)
  np.testing.assert_allclose(values, np.sort(lam), rtol=1e-8)
  fitted = spectra.fit_tail(values)[0]
  assert abs(fitted - alpha) <= 0.25
  gaussian = spectra.fit_tail(spectra.eigenvalues(rng.standard_normal((n, n))))[0]
  assert not spectra.HEALTHY[0] <= gaussian <= spectra.HEALTHY[1], gaussian  # random: alpha > 6


def test_the_command_reads_every_matrix_of_a_scanned_checkpoint(tmp_path, capsys):
  model_dir = str(tmp_path / "run")
  assert train.main([f"--model_dir={model_dir}", "--no_progress", "--gin.MIXTURE='synthetic'",
                     "--gin.ModelConfig.vocab_size=64", "--gin.TRAIN_STEPS=2", "--gin.BATCH_SIZE=4",
                     "--gin.SEQ_LEN=16", "--gin.ModelConfig.d_model=64", "--gin.ModelConfig.d_ff=128",
                     "--gin.ModelConfig.num_layers=3", "--gin.ModelConfig.num_heads=4",
                     "--gin.TrainConfig.eval_batches=1"]) == 0
  capsys.readouterr()
  assert scaling_main(["spectra", "--model_dir", model_dir, "--min_tail", "16"]) == 0
  captured = capsys.readouterr()
  result = json.loads(captured.out.strip().splitlines()[-1])
  names = [m["name"] for m in result["matrices"]]
  # 3 layers x (query, key, value, out, mlp in, mlp out), unstacked, and the embedding
  for layer in range(3):
    assert sum(n.endswith(f"[{layer}]") for n in names) == 6, names
  assert any(m["layer"] == -1 and "embed" in m["kind"] for m in result["matrices"])
  assert all(m["eigenvalues"] == 64 for m in result["matrices"])
  assert os.path.getsize(result["plot"]) > 5000
  for m in result["matrices"]:
    assert spectra.ALPHA_RANGE[0] <= m["alpha"] <= spectra.ALPHA_RANGE[1] and m["tail"] >= 16
  flagged = [m["name"] for m in result["matrices"]
             if not spectra.HEALTHY[0] <= m["alpha"] <= spectra.HEALTHY[1]]
  assert result["outside"] == flagged and (("outside [2, 6]" in captured.err) == bool(flagged))
  assert scaling_main(["spectra", "--model_dir", model_dir, "--min_tail", "4", "--per_head",
                       "--out", str(tmp_path / "heads")]) == 0
  heads = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["matrices"]
  query = [m for m in heads if m["kind"].endswith("query") and m["layer"] == 0]
  assert len(query) == 4 and all(m["shape"] == [64, 16] for m in query)


def test_a_model_dir_without_a_checkpoint_is_one_sentence(tmp_path, capsys):
  assert scaling_main(["spectra", "--model_dir", str(tmp_path)]) == 2
  err = capsys.readouterr().err.strip()
  assert "no config.json" in err and len(err.splitlines()) == 1
