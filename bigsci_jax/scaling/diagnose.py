"""Effective model size: what a run's loss (or downstream score) is worth on a law
fitted to smaller runs.

The BigScience 13B run scored "more in line with a 2.7-6B model"; on approach 3's
law L(N, D) = E + A / N^alpha + B / D^beta the effective size N_eff is the N at
which the law, at the run's own D, gives the run's loss, and D_eff the D at which
it does so at the run's own N. Both have closed forms. A loss below what any N can
reach at that D (L <= E + B / D^beta) has no N_eff.

For a downstream score, `metric_law` fits score = c0 + c1 ln(N) (or ln(C)) over
reference runs of the same family, and `invert_metric` reads the size off it.
"""

import dataclasses
import json
import math
from typing import Optional

import numpy as np

from bigsci_jax.scaling.table import Runs, TableError, read_json

LAW_KEYS = ("E", "A", "B", "alpha", "beta")
FLAG_RATIO = 0.5  # below this N_eff / N, the run is flagged


def read_fit(path):
  """Approach 3's fitted law from a JSON file (the `fit --approach 3` output, or any
  object with E, A, B, alpha, beta)."""
  law = read_json(path, "fit file", "write one with `python -m bigsci_jax.scaling fit "
                  "--approach 3 --runs CSV --out DIR` (DIR/fit_approach3.json)")
  missing = [k for k in LAW_KEYS if not isinstance(law, dict) or not isinstance(law.get(k), (int, float))]
  if missing:
    raise TableError(f"fit file {path} lacks approach 3's key(s) {', '.join(missing)}; pass the "
                     f"output of `scaling fit --approach 3`, which has {', '.join(LAW_KEYS)}.")
  return {k: float(law[k]) for k in LAW_KEYS}


def law_loss(law, n, d):
  return law["E"] + law["A"] / n ** law["alpha"] + law["B"] / d ** law["beta"]


@dataclasses.dataclass(frozen=True)
class EffectiveSize:
  N: float
  D: float
  loss: float
  loss_predicted: float
  N_eff: Optional[float]       # None: no N reaches the loss at this D
  N_eff_ratio: Optional[float]
  D_eff: Optional[float]       # None: no D reaches the loss at this N

  def sentence(self):
    """One line for people."""
    if self.N_eff is None:
      return (f"a loss of {self.loss:.4g} is below what any model size reaches with "
              f"{self.D:.3g} tokens on this law; the law does not describe this run (a different "
              f"data distribution or tokenizer?), so there is no effective size.")
    text = (f"loss {self.loss:.4g} vs {self.loss_predicted:.4g} predicted for N={_size(self.N)}, "
            f"D={self.D:.3g}: scores like a {_size(self.N_eff)} model "
            f"({self.N_eff_ratio:.2f} of its size)")
    if self.N_eff_ratio < FLAG_RATIO:
      text += (f"; below {FLAG_RATIO} of its size, so training went wrong somewhere (data, "
               f"hyperparameters, instability) or the law was fitted on another setup")
    return text + "."


def _size(n):
  for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
    if n >= scale:
      return f"{n / scale:.3g}{unit}"
  return f"{n:.3g}"


def effective_size(law, n, d, loss) -> EffectiveSize:
  """N_eff and D_eff of a run with N parameters trained on D tokens to `loss`."""
  left_for_n = loss - law["E"] - law["B"] / d ** law["beta"]
  left_for_d = loss - law["E"] - law["A"] / n ** law["alpha"]
  n_eff = (law["A"] / left_for_n) ** (1 / law["alpha"]) if left_for_n > 0 else None
  d_eff = (law["B"] / left_for_d) ** (1 / law["beta"]) if left_for_d > 0 else None
  return EffectiveSize(N=float(n), D=float(d), loss=float(loss),
                       loss_predicted=float(law_loss(law, n, d)),
                       N_eff=None if n_eff is None else float(n_eff),
                       N_eff_ratio=None if n_eff is None else float(n_eff / n),
                       D_eff=None if d_eff is None else float(d_eff))


# ---- downstream scores ---------------------------------------------------------------


def metric_law(runs: Runs, metric, against="params"):
  """score = c0 + c1 ln(x) over the reference runs, x = params or flops."""
  if metric not in runs.extra or runs.extra[metric].dtype.kind != "f":
    raise TableError(f"{runs.source} has no numeric '{metric}' column; name a column of "
                     f"downstream scores with --metric.")
  x = runs.params if against == "params" else runs.flops
  score = runs.extra[metric]
  keep = np.isfinite(score)
  if len(np.unique(x[keep])) < 3:
    raise TableError(f"{runs.source}: '{metric}' is known for {len(np.unique(x[keep]))} "
                     f"distinct {against}; the score law needs at least 3 reference runs.")
  slope, intercept = np.polyfit(np.log(x[keep]), score[keep], 1)
  fitted = intercept + slope * np.log(x[keep])
  spread = np.sum((score[keep] - score[keep].mean()) ** 2)
  r2 = 1 - np.sum((score[keep] - fitted) ** 2) / spread if spread > 0 else 0.0
  if abs(slope) * np.ptp(np.log(x[keep])) < 1e-9 * max(1.0, abs(intercept)):
    raise TableError(f"{runs.source}: '{metric}' does not change with {against} over the "
                     f"reference runs, so it cannot tell sizes apart.")
  return {"metric": metric, "against": against, "c0": float(intercept), "c1": float(slope),
          "r2": float(r2), "x_min": float(x[keep].min()), "x_max": float(x[keep].max())}


def invert_metric(law, score):
  """(x at which the score law gives `score`, whether that lies outside the references)."""
  x = math.exp((score - law["c0"]) / law["c1"])
  return x, not law["x_min"] <= x <= law["x_max"]


# ---- a trained run -------------------------------------------------------------------


def run_point(model_dir):
  """{N, D, loss, step, scores} of model_dir's latest checkpoint: N = all parameters (the
  `params` column `scaling run` writes), D = tokens seen, loss = the eval loss logged at
  that step (eval_results.json's, when `evaluate` ran on it), scores = eval_results.json's
  downstream scores."""
  import os

  from bigsci_jax import checkpoint, flops, loop
  from bigsci_jax.evaluate import _rows
  from bigsci_jax.metrics import read_metrics
  try:
    run = loop.read_run(model_dir)
  except loop.RunNotFound as e:
    raise TableError(str(e)) from None
  ckpts = checkpoint.Checkpoints(os.path.join(model_dir, "checkpoints"), every=1, keep=1)
  try:
    step = ckpts.latest_step()
  finally:
    ckpts.close()
  if step is None:
    raise TableError(f"{model_dir} has no checkpoint yet; train it first (train.py "
                           f"--model_dir={model_dir}) or pass --params, --tokens and --loss.")
  train = [r for r in read_metrics(model_dir, "train") if r["step"] <= step]
  evals = [r for r in read_metrics(model_dir, "eval") if r["step"] == step]
  results, scores = None, {}
  path = os.path.join(model_dir, "eval_results.json")
  if os.path.exists(path):
    with open(path) as f:
      results = json.load(f)
    if results.get("step") not in (None, step):
      results = None  # evaluated an older checkpoint
  if results is not None:
    scores = _rows(results)
  loss = results["loss"] if results else (evals[-1]["loss"] if evals else None)
  if not train or loss is None:
    raise TableError(f"{model_dir} logged no training step or no evaluation at its "
                           f"checkpoint step {step}; run `python -m bigsci_jax.evaluate "
                           f"--model_dir={model_dir}` or pass --params, --tokens and --loss.")
  return {"N": float(flops.param_counts(run.model).total), "D": float(train[-1]["tokens_seen"]),
          "loss": float(loss), "step": step, "scores": scores}
