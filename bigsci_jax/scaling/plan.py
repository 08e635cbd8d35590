"""Sweep plans: for each FLOP budget, a ladder of model shapes around the expected
optimum, each with its token count and hyperparameters.

A plan folder holds `plan.csv` (one row per run), `configs/<run>.json` (the whole
RunConfig, what `scaling run` trains) and `gin/<run>.gin` (the same run for
`python train.py --gin_file=...`).
"""

import csv
import dataclasses
import json
import math
import os

import numpy as np

from bigsci_jax import flops
from bigsci_jax.config import ConfigError, RunConfig, to_gin


@dataclasses.dataclass(frozen=True)
class ShapeRule:
  """Model shapes along one line: d_model = aspect * num_layers, rounded to head_dim."""
  aspect: int = 32          # d_model / num_layers (Porian et al.'s grid: 32)
  head_dim: int = 64
  ffn_ratio: float = 4.0    # d_ff / d_model (GLU activations: use 8/3)
  max_layers: int = 64

  def shapes(self):
    seen = set()
    for layers in range(1, self.max_layers + 1):
      d = max(self.head_dim, self.head_dim * round(self.aspect * layers / self.head_dim))
      if (layers, d) not in seen:
        seen.add((layers, d))
        yield dict(num_layers=layers, d_model=d, num_heads=d // self.head_dim,
                   d_ff=int(64 * math.ceil(self.ffn_ratio * d / 64)))


@dataclasses.dataclass(frozen=True)
class HparamRule:
  """value = coefficient * N^exponent (exponent 0: a constant), clipped to [lo, hi]."""
  coefficient: float
  exponent: float = 0.0
  lo: float = 0.0
  hi: float = math.inf

  def __call__(self, params):
    return float(np.clip(self.coefficient * params ** self.exponent, self.lo, self.hi))


@dataclasses.dataclass(frozen=True)
class PlanSpec:
  budgets: tuple                    # FLOPs
  sizes_per_budget: int = 4
  spread: float = 4.0               # sizes span N0 / spread .. N0 * spread
  tokens_per_param: float = 20.0    # centres each budget at N0 = sqrt(C / (6 * this))
  convention: str = "chinchilla"    # FLOP counting for tokens = C / flops_per_token
  learning_rate: HparamRule = HparamRule(3e-3)
  batch_size: HparamRule = HparamRule(16)   # sequences; rounded to the base micro-batch
  b2: HparamRule = HparamRule(0.95)
  warmup_tokens_per_param: float = 1.0      # Porian et al.: warm up for N tokens
  min_steps: int = 20


def _model(base: RunConfig, shape):
  return dataclasses.replace(base.model, **shape, num_kv_heads=None, head_dim=None,
                             alibi_slopes=None)


def _candidates(base: RunConfig, rule: ShapeRule):
  """[(parameter counts, ModelConfig)] along the shape rule, and their non-embedding sizes."""
  candidates = [(flops.param_counts(model), model)
                for model in (_model(base, shape) for shape in rule.shapes())]
  return candidates, np.array([counts.non_embedding for counts, _ in candidates], float)


def _nearest(sizes, targets):
  """Indices of the ladder's sizes nearest (in log) to each target, sorted, without repeats."""
  return sorted({int(np.argmin(np.abs(np.log(sizes) - np.log(t)))) for t in targets})


def _planned_run(base: RunConfig, spec: PlanSpec, counts, model, tokens, budget, name):
  """(name, RunConfig, row) of `model` trained on about `tokens` tokens (whole steps)."""
  seq, micro = base.batch.seq_len, base.batch.micro_batch_size
  n = counts.non_embedding
  per_token = flops.flops_per_token(model, seq, spec.convention)
  batch = max(micro, micro * round(spec.batch_size(n) / micro))
  steps = int(round(tokens / (batch * seq)))
  if steps < spec.min_steps:
    raise ConfigError(
        f"the {n:.3g}-parameter model gets only {steps} steps of {batch} x {seq} tokens at "
        f"{budget:.3g} FLOPs (at least {spec.min_steps} needed); raise the budget or the tokens, "
        f"or use smaller models (ShapeRule.aspect) or batches.")
  lr = spec.learning_rate(n)
  warmup = min(steps // 2, int(math.ceil(spec.warmup_tokens_per_param * n / (batch * seq))))
  run = dataclasses.replace(
      base, model=model,
      batch=dataclasses.replace(base.batch, batch_size=batch, warmup_start=None),
      optimizer=dataclasses.replace(base.optimizer, learning_rate=lr, warmup_steps=warmup,
                                    b2=spec.b2(n), decay_steps=None),
      train=dataclasses.replace(base.train, train_steps=steps,
                                checkpoint_every=max(1, steps // 2), eval_every=0))
  tokens = steps * batch * seq
  row = dict(run=name, budget=budget, params=counts.total, params_non_embedding=n,
             tokens=tokens, flops=tokens * per_token,
             **{f"flops_{c}": tokens * flops.flops_per_token(model, seq, c)
                for c in flops.CONVENTIONS},
             num_layers=model.num_layers,
             d_model=model.d_model, num_heads=model.num_heads, d_ff=model.d_ff,
             batch_size=batch, train_steps=steps, learning_rate=lr, warmup_steps=warmup,
             b2=spec.b2(n))
  return name, run, row


def make_plan(base: RunConfig, spec: PlanSpec, rule: ShapeRule):
  """A list of (name, RunConfig, row dict) for every run of the sweep: for each budget,
  the ladder's sizes around its expected optimum, each spending the budget."""
  candidates, sizes = _candidates(base, rule)
  plan = []
  for budget in spec.budgets:
    n0 = math.sqrt(budget / (6 * spec.tokens_per_param))
    targets = n0 * np.exp(np.linspace(-math.log(spec.spread), math.log(spec.spread),
                                      spec.sizes_per_budget))
    for index in _nearest(sizes, targets):
      counts, model = candidates[index]
      per_token = flops.flops_per_token(model, base.batch.seq_len, spec.convention)
      name = f"c{budget:.2e}_n{counts.non_embedding:.3g}".replace("+", "")
      plan.append(_planned_run(base, spec, counts, model, budget / per_token, budget, name))
  return plan


def make_grid(base: RunConfig, spec: PlanSpec, rule: ShapeRule, params, ratios):
  """A (model size x data) grid for approach 3: the ladder's sizes nearest to `params`
  (non-embedding), each trained on ratio x N tokens for every ratio. Its `budget` is
  each run's own compute. With decay='wsd', a size's runs are one trunk and cooldown
  branches (sweep.branch_runs)."""
  candidates, sizes = _candidates(base, rule)
  plan = []
  for index in _nearest(sizes, params):
    counts, model = candidates[index]
    n = counts.non_embedding
    per_token = flops.flops_per_token(model, base.batch.seq_len, spec.convention)
    for ratio in sorted(ratios):
      name = f"n{n:.3g}_r{ratio:g}".replace("+", "")
      plan.append(_planned_run(base, spec, counts, model, ratio * n, ratio * n * per_token, name))
  return plan


def write_plan(plan, out_dir):
  os.makedirs(os.path.join(out_dir, "configs"), exist_ok=True)
  os.makedirs(os.path.join(out_dir, "gin"), exist_ok=True)
  for name, run, _ in plan:
    with open(os.path.join(out_dir, "configs", f"{name}.json"), "w") as f:
      json.dump(run.to_dict(), f, indent=1)
    with open(os.path.join(out_dir, "gin", f"{name}.gin"), "w") as f:
      f.write(to_gin(run))
  tmp = os.path.join(out_dir, "plan.csv.tmp")
  with open(tmp, "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=list(plan[0][2]))
    writer.writeheader()
    writer.writerows(row for _, _, row in plan)
  os.replace(tmp, os.path.join(out_dir, "plan.csv"))
