"""Per-language data laws and the mixture rates they imply.

Each language's held-out loss against the tokens of that language seen in
training follows L_l(D) = E_l + B_l D^-beta_l. With a budget of T training tokens
and rates p_l (summing to 1), language l sees p_l T tokens. Two objectives:

  mean  minimise the mean over languages of L_l(p_l T);
  max   minimise the largest loss any language gives up by sharing the budget,
        L_l(p_l T) - L_l(T) = B_l ((p_l T)^-beta_l - T^-beta_l), which does not
        depend on the poorly determined E_l.

With the languages' available tokens n_l, p_l T <= epochs_max n_l (repeated data
is worth less: Muennighoff et al. 2023). Both objectives are convex in p and are
solved exactly by water-filling: each language's rate is a monotone function of
one multiplier (the marginal loss for `mean`, the loss given up for `max`),
clipped to its cap, and the multiplier is found by bisection so the rates sum to 1.
For `max` that is the leximin solution: capped languages give up what they must,
and the others share the rest equally.
"""

import csv
import dataclasses

import numpy as np
from scipy import optimize

from bigsci_jax.data import temperature_rates
from bigsci_jax.scaling.table import TableError

MIN_POINTS = 3


@dataclasses.dataclass(frozen=True)
class DataLaw:
  """L(D) = E + B D^-beta for one language."""
  E: float
  B: float
  beta: float

  def loss(self, tokens):
    return self.E + self.B * np.asarray(tokens, float) ** -self.beta


def read_language_runs(path, columns=("language", "tokens", "loss")):
  """{language: (tokens array, loss array)} from a CSV with those columns."""
  try:
    with open(path, newline="") as f:
      rows = list(csv.DictReader(f))
  except FileNotFoundError:
    raise TableError(f"runs table {path} does not exist; pass a CSV with columns "
                     f"{', '.join(columns)} (`scaling run` writes one).") from None
  if not rows or any(c not in rows[0] for c in columns):
    raise TableError(f"{path} needs columns {', '.join(columns)} and at least one row.")
  out = {}
  for line, row in enumerate(rows, start=2):
    values = []
    for c in columns[1:]:
      try:
        values.append(float(row[c]))
      except (TypeError, ValueError):
        raise TableError(f"{path}, line {line}: column '{c}' holds {row[c]!r}, which is not a "
                         f"number.") from None
      if not np.isfinite(values[-1]) or values[-1] <= 0:
        raise TableError(f"{path}, line {line}: column '{c}' is {row[c]}; it must be positive.")
    out.setdefault(row[columns[0]], []).append(values)
  return {lang: tuple(np.asarray(v, float).T) for lang, v in sorted(out.items())}


def fit_data_law(tokens, loss, language="?", source="<table>"):
  """Least squares of log L on log D for L = E + B D^-beta (E >= 0), started from the
  best of a grid of beta (for each, E and B are a linear fit)."""
  tokens, loss = np.asarray(tokens, float), np.asarray(loss, float)
  if len(np.unique(tokens)) < MIN_POINTS:
    raise TableError(f"{source}: language '{language}' has {len(np.unique(tokens))} distinct token "
                     f"count(s); its law L = E + B D^-beta needs at least {MIN_POINTS}.")
  scale = np.exp(np.mean(np.log(tokens)))  # fit in D / scale: B stays near the loss's size
  x = tokens / scale
  best = None
  for beta in np.linspace(0.02, 1.5, 75):
    design = np.stack([np.ones_like(x), x ** -beta], axis=1)
    (e, b), *_ = np.linalg.lstsq(design, loss, rcond=None)
    e, b = max(e, 0.0), max(b, 1e-12)
    err = np.sum((np.log(e + b * x ** -beta) - np.log(loss)) ** 2)
    if best is None or err < best[0]:
      best = (err, e, b, beta)
  _, e, b, beta = best

  def residual(theta):
    e, log_b, beta = theta
    return np.log(e + np.exp(log_b) * x ** -beta) - np.log(loss)

  res = optimize.least_squares(residual, [e, np.log(b), beta],
                               bounds=([0.0, -np.inf, 1e-4], [np.inf, np.inf, 5.0]))
  e, log_b, beta = res.x
  return DataLaw(E=float(e), B=float(np.exp(log_b) * scale ** beta), beta=float(beta))


def _bisect(total, lo, hi, iters=200):
  """The root in [lo, hi] (log scale) of the decreasing total(m) - 1."""
  lo, hi = np.log(lo), np.log(hi)
  for _ in range(iters):
    mid = 0.5 * (lo + hi)
    if total(np.exp(mid)) > 1.0:
      lo = mid
    else:
      hi = mid
  return np.exp(0.5 * (lo + hi))


def optimal_rates(laws, budget, objective="mean", caps=None):
  """{language: rate} minimising `objective` (module docstring) with rates <= caps."""
  langs = sorted(laws)
  cap = np.array([1.0 if caps is None else min(1.0, caps[l]) for l in langs])
  if cap.sum() < 1.0 - 1e-12:
    raise TableError(f"the languages' data cannot fill a budget of {budget:.3g} tokens: at most "
                     f"{cap.sum() * budget:.3g} tokens within the epoch cap; lower --budget, raise "
                     f"--epochs_max, or add data.")
  b = np.array([laws[l].B for l in langs])  # neither objective's rates depend on E
  beta = np.array([laws[l].beta for l in langs])

  if objective == "mean":
    # d/dp L_l(p T) = -beta B T^-beta p^-(beta+1) = -m  =>  p = (beta B T^-beta / m)^(1/(beta+1))
    def rates(m):
      return np.minimum(cap, (beta * b * budget ** -beta / m) ** (1.0 / (beta + 1.0)))
  elif objective == "max":
    # B ((p T)^-beta - T^-beta) = t  =>  p = (t / B + T^-beta)^(-1/beta) / T
    def rates(t):
      return np.minimum(cap, (t / b + budget ** -beta) ** (-1.0 / beta) / budget)
  else:
    raise ValueError(f"objective={objective!r} is not 'mean' or 'max'.")
  if cap.sum() <= 1.0 + 1e-12:
    p = cap
  else:
    with np.errstate(over="ignore", divide="ignore"):  # the bracket's ends overflow to the cap
      p = rates(_bisect(lambda m: rates(m).sum(), 1e-300, 1e300))
  p = p / p.sum()
  return {l: float(x) for l, x in zip(langs, p)}


def closest_temperature(rates, sizes):
  """The alpha whose temperature rates (proportional to size^alpha) come closest to
  `rates` in squared error, over alpha in [0, 2]."""
  langs = sorted(rates)
  target = np.array([rates[l] for l in langs])

  def distance(alpha):
    t = temperature_rates({l: sizes[l] for l in langs}, alpha)
    return float(np.sum((np.array([t[l] for l in langs]) - target) ** 2))

  res = optimize.minimize_scalar(distance, bounds=(0.0, 2.0), method="bounded",
                                 options={"xatol": 1e-6})
  return float(res.x), distance(res.x)


def gin_snippet(rates):
  """The binding that sets a multilingual mixture's rates (DataConfig.rates)."""
  body = ", ".join(f"{l!r}: {r:.6f}" for l, r in sorted(rates.items()))
  return f"DataConfig.rates = {{{body}}}\n"
