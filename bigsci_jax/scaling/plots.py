"""PNG plots of scaling fits: isoFLOP curves with their minima, the N*(C) frontier
with its bootstrap band, and approach 3's residuals. matplotlib is imported here
only, with the Agg backend (no display needed)."""

import os

import numpy as np

from bigsci_jax.scaling import fit
from bigsci_jax.scaling.table import Runs


def _pyplot():
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  return plt


def _save(fig, path):
  tmp = path + ".tmp.png"
  fig.savefig(tmp, dpi=120, bbox_inches="tight")
  os.replace(tmp, path)


def isoflop(runs: Runs, result, path):
  """Loss against N for each budget, with approach 2's parabola minima."""
  plt = _pyplot()
  fig, ax = plt.subplots(figsize=(6, 4))
  values, group = fit.budgets(runs)
  colors = plt.cm.viridis(np.linspace(0, 1, len(values)))
  for g, color in zip(range(len(values)), colors):
    rows = np.where(group == g)[0]
    rows = rows[np.argsort(runs.params[rows])]
    ax.plot(runs.params[rows], runs.loss[rows], "o-", color=color, ms=3, lw=1,
            label=f"{np.exp(np.mean(np.log(runs.flops[rows]))):.1e}")
  optima = result["_optima"]
  ax.plot(optima["N"], optima["L"], "k*", ms=9, label="fitted minima")
  ax.set(xscale="log", xlabel="parameters N", ylabel="loss", title="isoFLOP curves (approach 2)")
  ax.legend(fontsize=6, title="FLOPs", title_fontsize=7)
  _save(fig, path)
  plt.close(fig)


def frontier(result, ci, path, label="approach"):
  """N*(C) = k_n C^a with the interval of a (at the fitted prefactor's pivot)."""
  plt = _pyplot()
  fig, ax = plt.subplots(figsize=(6, 4))
  optima = result.get("_optima")
  lo, hi = (min(optima["flops"]), max(optima["flops"])) if optima else (1e18, 1e22)
  c = np.exp(np.linspace(np.log(lo) - 1, np.log(hi) + 3, 50))
  pivot = np.exp(np.mean(np.log([lo, hi])))
  n_pivot = result["k_n"] * pivot ** result["a"]
  ax.plot(c, result["k_n"] * c ** result["a"], "b-", label=f"N* ∝ C^{result['a']:.3f}")
  if ci and "a_ci" in ci:
    a_lo, a_hi = ci["a_ci"]
    band = [n_pivot * (c / pivot) ** a for a in (a_lo, a_hi)]
    ax.fill_between(c, np.minimum(*band), np.maximum(*band), color="b", alpha=0.15,
                    label=f"95% interval [{a_lo:.3f}, {a_hi:.3f}]")
  if optima:
    ax.plot(optima["flops"], optima["N"], "ko", ms=4, label="per-budget optima")
  ax.set(xscale="log", yscale="log", xlabel="compute C (FLOPs)", ylabel="N*",
         title=f"compute-optimal frontier ({label})")
  ax.legend(fontsize=7)
  _save(fig, path)
  plt.close(fig)


def residuals(runs: Runs, result, path):
  """Approach 3: log residuals of L(N, D) against N, coloured by tokens."""
  plt = _pyplot()
  predicted = result["E"] + result["A"] / runs.params ** result["alpha"] + \
      result["B"] / runs.tokens ** result["beta"]
  fig, ax = plt.subplots(figsize=(6, 4))
  points = ax.scatter(runs.params, np.log(runs.loss) - np.log(predicted), c=np.log10(runs.tokens),
                      s=8, cmap="viridis")
  fig.colorbar(points, label="log10 tokens")
  ax.axhline(0, color="k", lw=0.8)
  ax.set(xscale="log", xlabel="parameters N", ylabel="log L - log L(N, D)",
         title="approach 3 residuals")
  _save(fig, path)
  plt.close(fig)


EXPONENTS = ("alpha", "beta", "a", "alpha_N", "alpha_C")


def group_exponents(groups, by, out_dir):
  """Bar chart of each group's exponents with their intervals ("how languages scale")."""
  plt = _pyplot()
  keys = [k for k in EXPONENTS if all(k in g for g in groups.values())]
  names = list(groups)
  fig, ax = plt.subplots(figsize=(max(5, 0.8 * len(names) * len(keys)), 4))
  width = 0.8 / max(len(keys), 1)
  for i, key in enumerate(keys):
    values = np.array([groups[n][key] for n in names])
    x = np.arange(len(names)) + i * width
    errors = None
    if all(f"{key}_ci" in groups[n] for n in names):
      ci = np.array([groups[n][f"{key}_ci"] for n in names])
      errors = np.abs(np.stack([values - ci[:, 0], ci[:, 1] - values]))
    ax.bar(x, values, width, yerr=errors, capsize=3, label=key)
  ax.set_xticks(np.arange(len(names)) + width * (len(keys) - 1) / 2, names)
  ax.set(xlabel=by, ylabel="exponent", title=f"scaling exponents by {by}")
  ax.legend(fontsize=7)
  os.makedirs(out_dir, exist_ok=True)
  path = os.path.join(out_dir, f"exponents_by_{by}.png")
  _save(fig, path)
  plt.close(fig)
  return [path]


def write_all(approach, runs, result, ci, out_dir):
  """The plots that belong to `approach`; returns their paths."""
  os.makedirs(out_dir, exist_ok=True)
  paths = []
  if approach == "2":
    paths.append(os.path.join(out_dir, "isoflop.png"))
    isoflop(runs, result, paths[-1])
  if approach in ("1", "2", "3"):
    paths.append(os.path.join(out_dir, f"frontier_approach{approach}.png"))
    frontier(result, ci, paths[-1], label=f"approach {approach}")
  if approach == "3":
    paths.append(os.path.join(out_dir, "residuals.png"))
    residuals(runs, result, paths[-1])
  return paths


def heatmap(matrix, rows, columns, path, title, row_label, column_label, value_label):
  """A rows x columns matrix of positive values on a log colour scale, each cell labelled
  (blank where NaN)."""
  from matplotlib.colors import LogNorm
  plt = _pyplot()
  fig, ax = plt.subplots(figsize=(1.2 * len(columns) + 2, 1.0 * len(rows) + 1.5))
  finite = matrix[np.isfinite(matrix)]
  norm = LogNorm(finite.min(), finite.max()) if finite.size and finite.min() > 0 else None
  image = ax.imshow(np.ma.masked_invalid(matrix), cmap="viridis", norm=norm)
  fig.colorbar(image, label=value_label)
  for (i, j), value in np.ndenumerate(matrix):
    if np.isfinite(value):
      bright = norm is not None and norm(value) > 0.6  # viridis is yellow at the top
      ax.text(j, i, f"{value:.2g}", ha="center", va="center", color="k" if bright else "w",
              fontsize=8)
  ax.set_xticks(range(len(columns)), columns)
  ax.set_yticks(range(len(rows)), rows)
  ax.set(xlabel=column_label, ylabel=row_label, title=title)
  _save(fig, path)
  plt.close(fig)
  return path
