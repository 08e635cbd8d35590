"""Scaling-law fits over a runs table: Chinchilla approaches 1, 2, 3 and Kaplan's laws.

Each fitter takes `Runs` and returns a dict of floats; `bootstrap` resamples runs
to give each quantity a 95% interval. Compute-optimal laws are N* = k_n C^a and
D* = k_d C^b.
"""

import itertools

import numpy as np
from scipy import optimize

from bigsci_jax.scaling.table import Runs, TableError

# Hoffmann et al. 2022, section D.2: initialisations for approach 3.
GRID_ALPHA = GRID_BETA = (0.0, 0.5, 1.0, 1.5, 2.0)
GRID_E = (-1.0, -0.5, 0.0, 0.5, 1.0)
GRID_A = GRID_B = (0.0, 5.0, 10.0, 15.0, 20.0, 25.0)


def power_law(x, y, weights=None):
  """Least squares of log y on log x: returns (exponent, prefactor, r2)."""
  lx, ly = np.log(x), np.log(y)
  w = np.ones_like(lx) if weights is None else np.asarray(weights, float)
  slope, intercept = np.polyfit(lx, ly, 1, w=np.sqrt(w))
  fitted = intercept + slope * lx
  mean = np.average(ly, weights=w)
  r2 = 1.0 - np.sum(w * (ly - fitted) ** 2) / max(np.sum(w * (ly - mean) ** 2), 1e-300)
  return float(slope), float(np.exp(intercept)), float(r2)


def parabola_minimum(x, y):
  """(x*, y*) at the vertex of the least-squares parabola through (x, y), or None when
  the parabola opens downward (no interior minimum)."""
  p = np.polyfit(x, y, 2)
  if p[0] <= 0:
    return None
  x_min = -p[1] / (2 * p[0])
  return float(x_min), float(np.polyval(p, x_min))


# ---- approach 3: L(N, D) = E + A / N^alpha + B / D^beta --------------------------------


def _huber_objective(theta, log_n, log_d, log_l, delta):
  """Sum of Huber losses of log-space residuals, and its gradient (Hoffmann et al. D.2)."""
  a, b, e, alpha, beta = theta
  terms = np.stack([a - alpha * log_n, b - beta * log_d, np.full_like(log_n, e)])
  top = terms.max(axis=0)
  weights = np.exp(terms - top)
  total = weights.sum(axis=0)
  residual = top + np.log(total) - log_l
  small = np.abs(residual) <= delta
  loss = np.where(small, 0.5 * residual ** 2, delta * (np.abs(residual) - 0.5 * delta)).sum()
  dr = np.clip(residual, -delta, delta)  # d huber / d residual
  w = weights / total
  grad = np.array([np.sum(dr * w[0]), np.sum(dr * w[1]), np.sum(dr * w[2]),
                   -np.sum(dr * w[0] * log_n), -np.sum(dr * w[1] * log_d)])
  return loss, grad


def _grid_starts(log_n, log_d, log_l, delta, keep):
  grid = np.array(list(itertools.product(GRID_A, GRID_B, GRID_E, GRID_ALPHA, GRID_BETA)))
  a, b, e, alpha, beta = (grid[:, i:i + 1] for i in range(5))
  pred = np.logaddexp(np.logaddexp(a - alpha * log_n, b - beta * log_d), e)
  r = np.abs(pred - log_l)
  objective = np.where(r <= delta, 0.5 * r ** 2, delta * (r - 0.5 * delta)).sum(axis=1)
  return grid[np.argsort(objective)[:keep]]


def fit_approach3(runs: Runs, delta=1e-3, starts=None, keep=16):
  """Huber fit of L(N, D) with L-BFGS from the best grid initialisations."""
  log_n, log_d, log_l = np.log(runs.params), np.log(runs.tokens), np.log(runs.loss)
  if starts is None:
    starts = _grid_starts(log_n, log_d, log_l, delta, keep)
  best = None
  for theta0 in starts:
    res = optimize.minimize(_huber_objective, theta0, args=(log_n, log_d, log_l, delta),
                            jac=True, method="L-BFGS-B",
                            options={"gtol": 1e-12, "ftol": 1e-15, "maxiter": 5000})
    if best is None or res.fun < best.fun:
      best = res
  a, b, e, alpha, beta = best.x
  if alpha <= 0 or beta <= 0:
    raise TableError(f"{runs.source}: the best L(N, D) fit has alpha={alpha:.3g}, beta={beta:.3g}, "
                     f"so loss does not fall with both model size and data in these runs; add runs "
                     f"over a wider range of sizes and budgets.")
  result = {"E": float(np.exp(e)), "A": float(np.exp(a)), "B": float(np.exp(b)),
            "alpha": float(alpha), "beta": float(beta),
            "a": float(beta / (alpha + beta)), "b": float(alpha / (alpha + beta)),
            "huber_loss": float(best.fun), "_theta": best.x}
  one = optimum_approach3(result, 1.0)  # N* = k_n C^a, D* = k_d C^b under C = 6 N D
  result.update(k_n=one["N"], k_d=one["D"])
  return result


def optimum_approach3(fit, flops, flops_per_param_token=6.0):
  """Compute-optimal N*, D*, L* under C = k N D for an approach-3 fit (Hoffmann eq. 4)."""
  alpha, beta, A, B = fit["alpha"], fit["beta"], fit["A"], fit["B"]
  g = (alpha * A / (beta * B)) ** (1.0 / (alpha + beta))
  n = g * (flops / flops_per_param_token) ** fit["a"]
  d = (flops / flops_per_param_token) / n
  return {"N": float(n), "D": float(d), "L": float(fit["E"] + A / n ** alpha + B / d ** beta)}


# ---- approach 2: isoFLOP parabolas ------------------------------------------------------


def budgets(runs: Runs):
  """Group index per run: the `budget` column, else equal FLOPs (to 0.1%)."""
  key = runs.extra.get("budget")
  if key is None or np.isnan(key).any():
    key = np.round(np.log(runs.flops) / np.log(1.001))
  values, group = np.unique(key, return_inverse=True)
  return values, group


def fit_approach2(runs: Runs, min_sizes=3, neighbours=2):
  """Per budget, a parabola in log N (and log D) through the losses near the lowest one;
  power laws of the parabolas' minima.

  `neighbours` sizes on each side of the lowest loss enter the parabola (Hoffmann et
  al. fit whole isoFLOP curves, which are not parabolas far from the minimum). A
  budget whose lowest loss is at its smallest or largest size has no interior
  minimum and is left out.
  """
  _, group = budgets(runs)
  c_star, n_star, d_star, l_star = [], [], [], []
  for g in np.unique(group):
    rows = np.where(group == g)[0]
    sizes = np.unique(runs.params[rows])
    if len(sizes) < min_sizes:
      raise TableError(f"{runs.source}: the budget of {runs.flops[rows][0]:.3g} FLOPs has "
                       f"{len(sizes)} model size(s); approach 2 needs at least {min_sizes} per budget.")
    rows = rows[np.argsort(runs.params[rows])]
    lowest = int(np.argmin(runs.loss[rows]))
    if lowest in (0, len(rows) - 1):
      continue
    rows = rows[max(0, lowest - neighbours):lowest + neighbours + 1]
    log_n, log_d, loss = np.log(runs.params[rows]), np.log(runs.tokens[rows]), runs.loss[rows]
    if len(np.unique(log_n)) < 3:
      continue  # a bootstrap resample can repeat sizes: no parabola through two points
    best_n, best_d = parabola_minimum(log_n, loss), parabola_minimum(log_d, loss)
    if best_n is None or best_d is None:
      continue  # no interior minimum: the budget's sizes do not bracket the optimum
    c_star.append(float(np.exp(np.mean(np.log(runs.flops[rows])))))
    n_star.append(float(np.exp(best_n[0])))
    d_star.append(float(np.exp(best_d[0])))
    l_star.append(best_n[1])
  if len(c_star) < 2:
    raise TableError(f"{runs.source}: fewer than 2 budgets have a loss minimum inside their "
                     f"range of sizes; add sizes on both sides of each budget's optimum.")
  c, n, d, l = map(np.asarray, (c_star, n_star, d_star, l_star))
  a, k_n, r2_n = power_law(c, n)
  b, k_d, r2_d = power_law(c, d)
  l_exp, k_l, _ = power_law(c, l)
  return {"a": a, "b": b, "k_n": k_n, "k_d": k_d, "r2_n": r2_n, "r2_d": r2_d,
          "loss_exponent": l_exp, "k_l": k_l, "budgets": len(c),
          "_optima": {"flops": c.tolist(), "N": n.tolist(), "D": d.tolist(), "L": l.tolist()}}


# ---- approach 1: lower envelope of training curves ---------------------------------------


def fit_approach1(runs: Runs, points=100):
  """Envelope of loss-vs-FLOPs curves (one per `run`, else per size) -> N*(C), D*(C)."""
  curve_key = runs.extra.get("run", runs.params.astype(str))
  curves = []
  for key in np.unique(curve_key):
    rows = np.where(curve_key == key)[0]
    rows = rows[np.argsort(runs.flops[rows])]
    if len(rows) >= 2:
      curves.append(rows)
  if len(curves) < 2:
    raise TableError(f"{runs.source}: approach 1 needs training curves (several rows per run, "
                     f"with a `run` or distinct `params` column) for at least 2 models.")
  lo, hi = runs.flops.min(), runs.flops.max()
  grid = np.exp(np.linspace(np.log(lo), np.log(hi), points))
  best_loss = np.full(points, np.inf)
  best_n, best_d = np.zeros(points), np.zeros(points)
  for rows in curves:
    lc = np.log(runs.flops[rows])
    inside = (np.log(grid) >= lc[0]) & (np.log(grid) <= lc[-1])
    loss = np.exp(np.interp(np.log(grid), lc, np.log(runs.loss[rows])))
    tokens = np.exp(np.interp(np.log(grid), lc, np.log(runs.tokens[rows])))
    better = inside & (loss < best_loss)
    best_loss[better], best_n[better], best_d[better] = loss[better], runs.params[rows[0]], tokens[better]
  found = np.isfinite(best_loss)
  # Where the smallest or largest model wins, the true optimum may lie outside the
  # sizes trained: those FLOP counts would flatten the frontier.
  sizes = [runs.params[rows[0]] for rows in curves]
  found &= (best_n > min(sizes)) & (best_n < max(sizes))
  if len(np.unique(best_n[found])) < 2:
    raise TableError(f"{runs.source}: fewer than 2 models other than the smallest and largest "
                     f"are ever best; approach 1 needs sizes on both sides of the optimum.")
  a, k_n, r2_n = power_law(grid[found], best_n[found])
  b, k_d, r2_d = power_law(grid[found], best_d[found])
  return {"a": a, "b": b, "k_n": k_n, "k_d": k_d, "r2_n": r2_n, "r2_d": r2_d}


# ---- Kaplan et al. 2020: L(N) and L(C) ---------------------------------------------------


def _saturating_power_law(x, y, irreducible):
  """y = k x^-p (+ E): least squares on log y."""
  p, k, r2 = power_law(x, y)
  if not irreducible:
    return {"exponent": -p, "coefficient": k, "E": 0.0, "r2": r2}

  def residual(theta):
    log_k, exponent, log_e = theta
    return np.log(np.exp(log_e) + np.exp(log_k - exponent * np.log(x))) - np.log(y)

  res = optimize.least_squares(residual, [np.log(k), -p, np.log(0.5 * y.min())])
  log_k, exponent, log_e = res.x
  return {"exponent": float(exponent), "coefficient": float(np.exp(log_k)),
          "E": float(np.exp(log_e)), "r2": r2}


def fit_kaplan(runs: Runs, irreducible=False):
  """L(N) over each size's best loss, L(C) over the compute frontier."""
  sizes = np.unique(runs.params)
  if len(sizes) < 3:
    raise TableError(f"{runs.source}: the Kaplan fit needs at least 3 model sizes, found {len(sizes)}.")
  best = np.array([runs.loss[runs.params == n].min() for n in sizes])
  law_n = _saturating_power_law(sizes, best, irreducible)
  order = np.argsort(runs.flops)
  frontier = runs.loss[order] <= np.minimum.accumulate(runs.loss[order])
  law_c = _saturating_power_law(runs.flops[order][frontier], runs.loss[order][frontier], irreducible)
  return {"alpha_N": law_n["exponent"], "N_c": law_n["coefficient"] ** (1 / law_n["exponent"]),
          "E_N": law_n["E"], "alpha_C": law_c["exponent"],
          "C_c": law_c["coefficient"] ** (1 / law_c["exponent"]), "E_C": law_c["E"]}


# ---- FLOP counting conventions (Porian et al.'s first cause) -----------------------------


def recounted(runs: Runs, convention):
  """The runs with C (and, for kaplan, N = non-embedding parameters) counted as
  `convention` counts them, from the table's `flops_<convention>` column; None
  when the table has no such column (`scaling run` writes all three)."""
  flops_column = runs.extra.get(f"flops_{convention}")
  if flops_column is None:
    return None
  params = runs.extra.get("params_non_embedding") if convention == "kaplan" else None
  return Runs(runs.params if params is None else params, runs.tokens, runs.loss, flops_column,
              runs.extra, runs.source)


def by_counting(fitter, runs: Runs, keys=("a", "b")):
  """{convention: {key: value}} for every FLOP count the table carries."""
  results = {}
  for convention in ("kaplan", "chinchilla", "porian"):
    variant = recounted(runs, convention)
    if variant is not None:
      fitted = fitter(variant)
      results[convention] = {k: fitted[k] for k in keys}
  return results


# ---- bootstrap ---------------------------------------------------------------------------

FITTERS = {"1": fit_approach1, "2": fit_approach2, "3": fit_approach3, "kaplan": fit_kaplan}


def bootstrap(fitter, runs: Runs, point, samples=200, seed=0, **kwargs):
  """2.5 / 97.5 percentiles of every float in `point` over fits to resampled runs.

  Runs are resampled with replacement (within each budget for approach 2, so every
  budget keeps its count); a resample the fitter rejects is drawn again.
  """
  rng = np.random.default_rng(seed)
  if fitter is fit_approach3:
    kwargs.setdefault("starts", [point["_theta"]])
  _, group = budgets(runs) if fitter is fit_approach2 else (None, np.zeros(len(runs), int))
  keys = [k for k, v in point.items() if isinstance(v, float)]
  draws, attempts = [], 0
  while len(draws) < samples and attempts < 5 * samples:
    attempts += 1
    index = np.concatenate([rng.choice(np.where(group == g)[0], size=np.sum(group == g))
                            for g in np.unique(group)])
    try:
      fit = fitter(runs.take(index), **kwargs)
    except TableError:
      continue
    draws.append([fit[k] for k in keys])
  if not draws:
    raise TableError(f"{runs.source}: no bootstrap resample of these {len(runs)} runs could be "
                     f"fitted; add runs, or pass --bootstrap 0.")
  draws = np.asarray(draws)
  return {f"{k}_ci": [float(np.percentile(draws[:, i], 2.5)), float(np.percentile(draws[:, i], 97.5))]
          for i, k in enumerate(keys)}
