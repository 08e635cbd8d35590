"""`python -m bigsci_jax.growth`: grow a trained run's latest checkpoint into a new run.

  python -m bigsci_jax.growth --from_dir=SMALL --to_dir=BIG --op=width|depth
      [--depth_mode=interleave|append] [--noise_std=0] [--constant_op=C] [--rewarm_steps=W]
      [--set TrainConfig.train_steps=4000 ...] [--tolerance=1e-4] [--force]

Writes BIG/config.gin, BIG/config.json, BIG/vocab.model (the small run's) and
BIG/checkpoints/R: the grown training state (parameters, Adam moments, the small
run's data position), its step counter jumped to R = S_small / c (c: the
operator's constant from Kaplan's law unless given), the LR re-warming over W
steps. `python train.py --model_dir=BIG` then continues. The small and the grown
model are evaluated on the same batches first; the last stdout line is a JSON
object with `loss_before`, `loss_after`, `params_before`, `params_after`; a loss
change over the tolerance writes nothing unless --force.
"""

import argparse
import ast
import dataclasses
import json
import os
import sys

import jax

from bigsci_jax import flops, growth, held_out, loop, tokenizer
from bigsci_jax.config import ConfigError, RunConfig
from bigsci_jax.scaling import stages


class GrowthError(ValueError):
  """The growth cannot be done as asked; the message says why and what to do."""


def _override(run: RunConfig, assignments):
  """Apply 'Section.field=value' assignments (Python literals) to a RunConfig."""
  sections = {type(getattr(run, f.name)).__name__: f.name for f in dataclasses.fields(run)}
  for text in assignments:
    key, _, value = text.partition("=")
    section, _, field = key.strip().partition(".")
    if section not in sections or not value:
      raise ConfigError(f"--set {text!r} is not 'Section.field=value' with Section one of "
                        f"{', '.join(sections)}.")
    part = getattr(run, sections[section])
    try:
      parsed = ast.literal_eval(value.strip())
    except (ValueError, SyntaxError):
      parsed = value.strip()
    run = dataclasses.replace(run, **{sections[section]: dataclasses.replace(part, **{field: parsed})})
  return run


def grow(from_dir, to_dir, op, *, depth_mode="interleave", noise_std=0.0, constant_op=None,
         rewarm_steps=0, overrides=(), tolerance=1e-4, force=False, eval_batches=4, seed=0):
  """Grow from_dir's latest checkpoint into to_dir; returns the summary dict."""
  if op not in growth.OPS:
    raise GrowthError(f"--op={op!r} is not a growth operator; choose one of {', '.join(growth.OPS)}.")
  if os.path.exists(os.path.join(to_dir, "checkpoints")):
    raise GrowthError(f"{to_dir} already holds a run; pass an empty --to_dir.")
  small = loop.read_run(from_dir)
  before = loop.Runtime(small)
  state, data_state, _ = before.restore_latest(from_dir)
  state = jax.device_get(state)
  small_steps = int(state.step)
  if constant_op is None:
    constant_op = stages.kaplan_stage(flops.param_counts(small.model).non_embedding, op).constant
  jump = max(1, int(round(small_steps / constant_op)))

  grown, target_model = growth.grow_state(state, small.model, op, depth_mode=depth_mode,
                                          noise_std=noise_std, key=jax.random.key(seed))
  target = dataclasses.replace(
      small, model=target_model,
      optimizer=dataclasses.replace(small.optimizer, rewarm_start=jump if rewarm_steps else 0,
                                    rewarm_steps=rewarm_steps))
  target = _override(target, overrides)
  grown = growth.jump_to(grown, jump, target.batch.batch_size)
  if target.train.train_steps <= jump:
    raise GrowthError(f"the grown run starts at step {jump} (= {small_steps} / c={constant_op:.3g}); "
                      f"set --set TrainConfig.train_steps=... above it.")
  after = loop.Runtime(target)

  eval_rows = loop.make_data(small, model_dir=from_dir).evals
  local_micro = small.batch.micro_batch_size // jax.process_count()
  batches = [b for rows in eval_rows.values()
             for b in held_out.eval_micro_batches(rows, local_micro, None)[0][:eval_batches]]
  grown = jax.device_put(grown, after.shardings)
  result = {"op": op, "loss_before": before.loss(jax.device_put(state.params,
                                                                before.shardings.params), batches),
            "loss_after": after.loss(grown.params, batches),
            "params_before": flops.param_counts(small.model).total,
            "params_after": flops.param_counts(target.model).total,
            "step_before": small_steps, "step_after": jump, "constant_op": constant_op}
  change = abs(result["loss_after"] - result["loss_before"])
  if change > tolerance and not force:
    raise GrowthError(f"growing changed the validation loss by {change:.3g} (> --tolerance="
                      f"{tolerance:g}); nothing was written: lower --noise_std, or pass --force.")
  loop.write_run(to_dir, target, grown, jump, data_state, tokenizer.read_files(from_dir))
  return result


def main(argv):
  p = argparse.ArgumentParser(prog="python -m bigsci_jax.growth", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--from_dir", required=True)
  p.add_argument("--to_dir", required=True)
  p.add_argument("--op", required=True)
  p.add_argument("--depth_mode", default="interleave", choices=("interleave", "append"))
  p.add_argument("--noise_std", type=float, default=0.0,
                 help="symmetry breaker: N(0, s^2) on the off-diagonal blocks (width)")
  p.add_argument("--constant_op", type=float, default=None,
                 help="c in R = S_small / c (default: the operator's, from Kaplan's law)")
  p.add_argument("--rewarm_steps", type=int, default=0)
  p.add_argument("--set", action="append", default=[], dest="overrides",
                 help="target run override, e.g. TrainConfig.train_steps=4000")
  p.add_argument("--tolerance", type=float, default=1e-4)
  p.add_argument("--force", action="store_true")
  p.add_argument("--eval_batches", type=int, default=4)
  p.add_argument("--seed", type=int, default=0)
  args = p.parse_args(argv)
  try:
    result = grow(args.from_dir, args.to_dir, args.op, depth_mode=args.depth_mode,
                  noise_std=args.noise_std, constant_op=args.constant_op,
                  rewarm_steps=args.rewarm_steps, overrides=args.overrides,
                  tolerance=args.tolerance, force=args.force, eval_batches=args.eval_batches,
                  seed=args.seed)
  except (GrowthError, ConfigError, loop.RunNotFound) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(json.dumps(result))
  return 0
