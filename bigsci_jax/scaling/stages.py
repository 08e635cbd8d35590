"""When to grow a model, and what it saves: the stage scheduler of Shen et al. 2022
("Staged Training for Transformer Language Models", §4), on Kaplan et al. 2020's
L(N, S) or on measured training curves.

Kaplan et al. (eqs. 1.6, 5.6, table 2): L(N, S_min) = (N_c/N)^a_N + (S_c/S_min)^a_S,
critical batch B_crit(L) = B*/L^(1/a_B) tokens, compute C = 6 N B_crit S_min. A
small model is grown when the slope of log L against log C along its curve
flattens past the operator's threshold (width -0.0475, depth -0.0575; a model
is trained to its optimality point at -0.052). The operator's constant c: the
small model's S_g steps reach the loss the target model reaches in S_g / c.
Width x2 multiplies non-embedding parameters by 4, depth x2 by 2.
"""

import dataclasses

import numpy as np
from scipy import optimize

N_C, ALPHA_N, S_C, ALPHA_S, B_STAR, ALPHA_B = 8.8e13, 0.076, 2.1e3, 0.76, 2.1e8, 0.21
THRESHOLDS = {"width": -0.0475, "depth": -0.0575, "optimality": -0.052}
PARAM_FACTOR = {"width": 4.0, "depth": 2.0}


def kaplan_loss(n, steps):
  return (N_C / n) ** ALPHA_N + (S_C / steps) ** ALPHA_S


def kaplan_compute(n, steps):
  """6 N B_crit(L) S: FLOPs to reach `steps` at the critical batch size."""
  return 6.0 * n * B_STAR / kaplan_loss(n, steps) ** (1.0 / ALPHA_B) * steps


def kaplan_slope(n, steps, h=1e-4):
  """d log L / d log C along the model's curve at `steps`."""
  lo, hi = steps * np.exp(-h), steps * np.exp(h)
  return ((np.log(kaplan_loss(n, hi)) - np.log(kaplan_loss(n, lo)))
          / (np.log(kaplan_compute(n, hi)) - np.log(kaplan_compute(n, lo))))


def _steps_at_slope(n, slope):
  return float(np.exp(optimize.brentq(lambda s: kaplan_slope(n, np.exp(s)) - slope,
                                      np.log(1.0), np.log(1e15))))


def _steps_at_loss(n, loss):
  return float(np.exp(optimize.brentq(lambda s: kaplan_loss(n, np.exp(s)) - loss,
                                      np.log(1e-6), np.log(1e18))))


@dataclasses.dataclass(frozen=True)
class Stage:
  op: str
  params: float             # non-embedding parameters of the small model
  growth_steps: float       # S_g: when its slope reaches the operator's threshold
  growth_loss: float
  constant: float           # c: the target reaches growth_loss in S_g / c steps
  compute_saving: float     # (C_target(L_g) - C_small(S_g)) / C_target(optimality)


def kaplan_stage(params, op):
  """The stage boundary of growing a `params`-parameter model with `op`, on Kaplan's law."""
  if op not in PARAM_FACTOR:
    raise ValueError(f"unknown growth operator {op!r}; choose one of {', '.join(PARAM_FACTOR)}.")
  target = PARAM_FACTOR[op] * params
  growth_steps = _steps_at_slope(params, THRESHOLDS[op])
  loss = float(kaplan_loss(params, growth_steps))
  target_steps = _steps_at_loss(target, loss)
  optimal = kaplan_compute(target, _steps_at_slope(target, THRESHOLDS["optimality"]))
  saving = (kaplan_compute(target, target_steps) - kaplan_compute(params, growth_steps)) / optimal
  return Stage(op, float(params), growth_steps, loss, growth_steps / target_steps, float(saving))


def measured_growth_step(flops, loss, op, window=0.5):
  """Index of the logged point where a measured curve's slope d log L / d log C first
  flattens past the operator's threshold, or None. The slope is fitted by least
  squares over a `window` of log-compute (natural log) ending at each point and
  belongs to the window's middle, which is the point returned."""
  log_c, log_l = np.log(np.asarray(flops, float)), np.log(np.asarray(loss, float))
  for i in range(len(log_c)):
    inside = (log_c >= log_c[i] - window) & (log_c <= log_c[i])
    if inside.sum() < 5 or log_c[i] - log_c[inside].min() < 0.8 * window:
      continue
    slope = np.polyfit(log_c[inside], log_l[inside], 1)[0]
    if slope > THRESHOLDS[op]:
      return int(np.argmin(np.abs(log_c - (log_c[i] - window / 2))))
  return None
