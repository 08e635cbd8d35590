"""Hyperparameter laws (Porian et al. 2024, section 5): from a learning-rate x batch-size
sweep at several model sizes, the optimal learning rate and batch size as power laws
in N, in the form `plan` consumes (`HparamRule`)."""

import numpy as np

from bigsci_jax.scaling.fit import parabola_minimum, power_law
from bigsci_jax.scaling.table import Runs, TableError


def _vertex(values, losses):
  """argmin over log(values) of a parabola through the lowest loss and its neighbours,
  clipped to the tried range; the best tried value when the parabola opens downward."""
  order = np.argsort(values)
  values, losses = values[order], losses[order]
  best = int(np.argmin(losses))
  if len(values) < 3 or best in (0, len(values) - 1):
    return float(values[best])
  vertex = parabola_minimum(np.log(values[best - 1:best + 2]), losses[best - 1:best + 2])
  if vertex is None:
    return float(values[best])
  return float(np.exp(np.clip(vertex[0], np.log(values[0]), np.log(values[-1]))))


def fit_hparams(runs: Runs):
  """{"learning_rate": {...}, "batch_size": {...}, "per_size": [...]} from a sweep table
  with `learning_rate` and `batch_size` columns."""
  for column in ("learning_rate", "batch_size"):
    if column not in runs.extra:
      raise TableError(f"{runs.source} has no '{column}' column; fit-hparams needs a sweep over "
                       f"learning_rate and batch_size at several model sizes.")
  lr, batch = runs.extra["learning_rate"], runs.extra["batch_size"]
  per_size = []
  for n in np.unique(runs.params):
    rows = runs.params == n
    best = np.argmin(np.where(rows, runs.loss, np.inf))
    at_batch = rows & (batch == batch[best])   # the learning-rate curve at the best batch size
    at_lr = rows & (lr == lr[best])            # the batch-size curve at the best learning rate
    per_size.append({"params": float(n), "learning_rate": _vertex(lr[at_batch], runs.loss[at_batch]),
                     "batch_size": _vertex(batch[at_lr], runs.loss[at_lr]),
                     "loss": float(runs.loss[best])})
  if len(per_size) < 2:
    raise TableError(f"{runs.source} has one model size; hyperparameter laws need at least 2.")
  sizes = np.array([p["params"] for p in per_size])
  laws = {}
  for key in ("learning_rate", "batch_size"):
    exponent, coefficient, r2 = power_law(sizes, np.array([p[key] for p in per_size]))
    laws[key] = {"coefficient": coefficient, "exponent": exponent, "r2": r2}
  return {**laws, "per_size": per_size}
