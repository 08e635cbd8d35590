"""Transfer between languages as effective data (Hernandez et al. 2021, "Scaling Laws for
Transfer").

Target-only runs give, per model size N, the target's law in its own tokens,
L_N(D) = E_N + B_N D^-beta_N. A run of the same size that also trains on a source
language and sees D_F target tokens reaches a loss L; the target-only law reaches
it with D_E tokens, and the effective data transferred is D_T = D_E - D_F. Per
(source, target) pair, D_T = k D_F^alpha N^beta is fitted by least squares in log
space. Points with D_T <= 0 (no or negative transfer) are counted and left out of
the fit.

The runs CSV has columns `target, source, params, tokens, loss`: `tokens` are the
target tokens D_F, `source` is empty (or 'none') for target-only runs.
"""

import csv

import numpy as np

from bigsci_jax.scaling.mixture import MIN_POINTS, fit_data_law
from bigsci_jax.scaling.table import TableError

COLUMNS = ("target", "source", "params", "tokens", "loss")
NO_SOURCE = ("", "none")


def read_transfer_runs(path):
  """The CSV's rows as dicts with float params, tokens, loss."""
  try:
    with open(path, newline="") as f:
      rows = list(csv.DictReader(f))
  except FileNotFoundError:
    raise TableError(f"runs table {path} does not exist; pass a CSV with columns "
                     f"{', '.join(COLUMNS)}.") from None
  if not rows or any(c not in rows[0] for c in COLUMNS):
    raise TableError(f"{path} needs columns {', '.join(COLUMNS)} (source empty for target-only "
                     f"runs) and at least one row.")
  out = []
  for line, row in enumerate(rows, start=2):
    parsed = {"target": row["target"], "source": (row["source"] or "").strip()}
    for c in ("params", "tokens", "loss"):
      try:
        parsed[c] = float(row[c])
      except (TypeError, ValueError):
        raise TableError(f"{path}, line {line}: column '{c}' holds {row[c]!r}, which is not a "
                         f"number.") from None
      if not np.isfinite(parsed[c]) or parsed[c] <= 0:
        raise TableError(f"{path}, line {line}: column '{c}' is {row[c]}; it must be positive.")
    out.append(parsed)
  return out


def target_laws(rows, source="<table>"):
  """{(target, N): DataLaw} from the target-only rows."""
  points = {}
  for r in rows:
    if r["source"].lower() in NO_SOURCE:
      points.setdefault((r["target"], r["params"]), []).append((r["tokens"], r["loss"]))
  return {key: fit_data_law(*np.asarray(p).T, language=f"{key[0]} (N={key[1]:.3g})", source=source)
          for key, p in points.items()}


def effective_data(law, loss):
  """Target-only tokens at which `law` reaches `loss` (inf when it never does)."""
  left = loss - law.E
  return (law.B / left) ** (1.0 / law.beta) if left > 0 else np.inf


def fit_pair(points):
  """D_T = k D_F^alpha N^beta over [(D_F, N, D_T)] with D_T > 0; beta is None when
  every point has the same N."""
  d_f, n, d_t = (np.asarray(x, float) for x in zip(*points))
  one_size = len(np.unique(n)) == 1
  columns = [np.ones_like(d_f), np.log(d_f)] + ([] if one_size else [np.log(n)])
  coef, *_ = np.linalg.lstsq(np.stack(columns, axis=1), np.log(d_t), rcond=None)
  return {"k": float(np.exp(coef[0])), "alpha": float(coef[1]),
          "beta": None if one_size else float(coef[2])}


def fit_transfer(rows, source="<table>"):
  """{(source, target): fit and counts} for every pair in the runs."""
  laws = target_laws(rows, source)
  pairs = {}
  for r in rows:
    if r["source"].lower() in NO_SOURCE:
      continue
    law = laws.get((r["target"], r["params"]))
    if law is None:
      raise TableError(f"{source}: no target-only runs of '{r['target']}' at N={r['params']:.6g} "
                       f"to measure the transfer from '{r['source']}' against; add at least "
                       f"{MIN_POINTS} of them at that size.")
    d_e = effective_data(law, r["loss"])
    pairs.setdefault((r["source"], r["target"]), []).append((r["tokens"], r["params"], d_e))
  if not pairs:
    raise TableError(f"{source} has no runs with a source language; add runs that train on a "
                     f"source besides the target.")
  results = {}
  for (src, tgt), points in sorted(pairs.items()):
    usable = [(d_f, n, d_e - d_f) for d_f, n, d_e in points if np.isfinite(d_e) and d_e > d_f]
    beyond = sum(1 for _, _, d_e in points if not np.isfinite(d_e))
    entry = {"points": len(points), "negative": len(points) - len(usable) - beyond,
             "beyond_target_law": beyond, "k": None, "alpha": None, "beta": None}
    if len(usable) >= MIN_POINTS:
      entry.update(fit_pair(usable))
    results[(src, tgt)] = entry
  return results


def k_matrix(results):
  """(sources, targets, k as a sources x targets array with NaN where not fitted)."""
  sources = sorted({s for s, _ in results})
  targets = sorted({t for _, t in results})
  k = np.full((len(sources), len(targets)), np.nan)
  for (s, t), entry in results.items():
    if entry["k"] is not None:
      k[sources.index(s), targets.index(t)] = entry["k"]
  return sources, targets, k
