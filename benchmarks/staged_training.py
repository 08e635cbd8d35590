"""Staged training on the handbook mixture at CPU scale: small -> width x2 -> continue,
against the larger model trained from scratch (Shen et al. 2022).

  python benchmarks/staged_training.py [--out benchmarks/staged] [--small_steps 250]
      [--steps 600] [--noise_std 2e-3]

Both runs evaluate every --eval_every steps on the same validation batches of the
14-language mixture. Compute is counted with bigsci_jax.flops (Chinchilla
convention): the small model's FLOPs up to the growth, the grown model's after.
The runs live in --work; loss_vs_compute.png and results.json go to --out; the last stdout line is
the JSON: compute each run needed to reach the from-scratch run's final eval loss
and the fraction saved.
"""

import argparse
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bigsci_jax import flops, growth, loop  # noqa: E402
from bigsci_jax.config import (BatchConfig, DataConfig, MeshConfig, ModelConfig,  # noqa: E402
                               OptimizerConfig, RunConfig, TrainConfig)
from bigsci_jax.growth_command import grow  # noqa: E402
from bigsci_jax.metrics import read_metrics  # noqa: E402


def _curve(model_dir, run, start_compute=0.0, start_step=0):
  """[(compute, eval loss)] from a run's eval lines; compute counted from its own steps."""
  per_step = flops.flops_per_token(run.model, run.batch.seq_len) * run.batch.batch_size \
      * run.batch.seq_len
  return [(start_compute + (r["step"] - start_step) * per_step, r["loss"])
          for r in read_metrics(model_dir, "eval")]


def _compute_to_reach(curve, target):
  """Compute at which the curve first reaches `target` (log-linear interpolation)."""
  for (c0, l0), (c1, l1) in zip(curve, curve[1:]):
    if l1 <= target < l0:
      return float(np.exp(np.interp(target, [l1, l0], [np.log(c1), np.log(c0)])))
    if l0 <= target:
      return float(c0)
  return None


def main(argv):
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--out", default="benchmarks/staged", help="results.json and the plot")
  p.add_argument("--work", default="/tmp/bigsci_staged", help="the three runs' model_dirs")
  p.add_argument("--steps", type=int, default=600, help="from-scratch run length")
  p.add_argument("--small_steps", type=int, default=250)
  p.add_argument("--noise_std", type=float, default=2e-3)
  p.add_argument("--eval_every", type=int, default=50)
  args = p.parse_args(argv)
  os.makedirs(args.out, exist_ok=True)

  small_model = ModelConfig(num_layers=2, d_model=64, num_heads=2, d_ff=256, vocab_size=8192,
                            max_len=512, dtype="float32")
  target_model = growth.grown_config(small_model, "width")

  def run_config(model, steps):
    return RunConfig(
        model=model, batch=BatchConfig(batch_size=16, seq_len=128), mesh=MeshConfig(1, 1, 1),
        optimizer=OptimizerConfig(learning_rate=3e-3, warmup_steps=30, weight_decay=0.0,
                                  decay_steps=args.steps),
        data=DataConfig(mixture="handbook_multilingual", vocab_size=8192),
        train=TrainConfig(train_steps=steps, eval_every=args.eval_every, eval_batches=4,
                          checkpoint_every=args.small_steps, log_every=10))

  scratch_run = run_config(target_model, args.steps)
  scratch_dir = os.path.join(args.work, "scratch")
  loop.train(scratch_run, scratch_dir, progress=False)
  small_run = run_config(small_model, args.small_steps)
  small_dir, grown_dir = os.path.join(args.work, "small"), os.path.join(args.work, "grown")
  loop.train(small_run, small_dir, progress=False)
  grown_steps = args.steps + args.small_steps
  if not os.path.exists(os.path.join(grown_dir, "checkpoints")):
    summary = grow(small_dir, grown_dir, "width", noise_std=args.noise_std, rewarm_steps=20,
                   overrides=[f"TrainConfig.train_steps={grown_steps}"], tolerance=0.05)
    with open(os.path.join(args.work, "growth.json"), "w") as f:
      json.dump(summary, f)
  else:
    summary = json.load(open(os.path.join(args.work, "growth.json")))
  grown_run = RunConfig.from_dict(json.load(open(os.path.join(grown_dir, "config.json"))))
  loop.train(grown_run, grown_dir, progress=False)

  scratch = _curve(scratch_dir, scratch_run)
  small = _curve(small_dir, small_run)
  small_compute = small[-1][0] if small else 0.0
  grown = [(small_compute, summary["loss_after"])] + _curve(
      grown_dir, grown_run, small_compute, summary["step_after"])
  staged = small + grown
  target = scratch[-1][1]
  c_scratch, c_staged = _compute_to_reach(scratch, target), _compute_to_reach(staged, target)
  result = {
      "target_loss": target, "compute_scratch": c_scratch, "compute_staged": c_staged,
      "saved_fraction": (1 - c_staged / c_scratch) if c_staged else None,
      "small_params": flops.param_counts(small_model).total,
      "target_params": flops.param_counts(target_model).total,
      "growth": summary, "scratch_curve": scratch, "staged_curve": staged,
  }
  with open(os.path.join(args.out, "results.json"), "w") as f:
    json.dump(result, f, indent=1)

  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(6, 4))
  ax.plot(*zip(*scratch), "o-", label=f"{target_model.d_model}-wide from scratch")
  ax.plot(*zip(*small), "s-", label=f"{small_model.d_model}-wide (stage 1)")
  ax.plot(*zip(*grown), "^-", label="grown x2 width (stage 2)")
  ax.axhline(target, color="gray", lw=0.5)
  ax.set_xscale("log")
  ax.set_xlabel("training FLOPs")
  ax.set_ylabel("validation loss (nats/token)")
  ax.set_title("staged training on handbook_multilingual (CPU)")
  ax.legend()
  fig.tight_layout()
  fig.savefig(os.path.join(args.out, "loss_vs_compute.png"), dpi=120)
  print(json.dumps({k: v for k, v in result.items() if not k.endswith("_curve")}))


if __name__ == "__main__":
  main(sys.argv[1:])
