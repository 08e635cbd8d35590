"""Overhead of the gradient noise scale (TrainConfig.gns_every) on the train step, averaged
over a run as the training loop runs it.

  python benchmarks/noise_scale.py [--gin_file=models/125m.gin] --seq_len=256 --micro_batch=8 \
      --accumulation=4 --gns_every=1 [--steps=40] [--results=benchmarks/RESULTS.md]

Every gns_every-th step samples the noise scale: with gradient accumulation from its
micro-batch gradients (one extra squared norm per micro-batch, skipped by a conditional on
the other steps); without it (--accumulation=1), that step runs as two half batches, as
the loop does. The same synthetic
batches run with the noise scale off and on, interleaved in blocks so machine noise
hits both; the overhead is the ratio of total times minus one. Last stdout line: JSON.
"""

import argparse
import dataclasses
import json
import os
import sys
import time

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import train  # noqa: E402  (the gin edge)
from bigsci_jax import data, sharding  # noqa: E402
from bigsci_jax import step as steps  # noqa: E402
from bigsci_jax.config import MeshConfig, TrainConfig  # noqa: E402
from bigsci_jax.model import Transformer  # noqa: E402
from bigsci_jax.optim import make_optimizer  # noqa: E402
from benchmarks.results_table import append_row  # noqa: E402
from benchmarks.train_step import synthetic_batch  # noqa: E402


def main(argv):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--gin_file", action="append", default=[])
  p.add_argument("--gin", action="append", default=[])
  p.add_argument("--seq_len", type=int, default=256)
  p.add_argument("--micro_batch", type=int, default=8)
  p.add_argument("--accumulation", type=int, default=4)
  p.add_argument("--gns_every", type=int, default=1)
  p.add_argument("--dtype", default="float32")
  p.add_argument("--mesh", default="-1,1,1")
  p.add_argument("--steps", type=int, default=40, help="timed steps per setting")
  p.add_argument("--block", type=int, default=10, help="steps per interleaved block")
  p.add_argument("--results", default=None)
  args = p.parse_args(argv)

  bindings = [f"ModelConfig.dtype='{args.dtype}'", f"SEQ_LEN={args.seq_len}",
              f"BATCH_SIZE={args.micro_batch * args.accumulation}",
              f"BatchConfig.micro_batch_size={args.micro_batch}"] + args.gin
  run, _ = train.build_config(["runs/cpu_smoke.gin"] + args.gin_file, bindings)
  run = dataclasses.replace(run, mesh=MeshConfig(*[int(x) for x in args.mesh.split(",")]))
  mesh = sharding.make_mesh(run.mesh)
  model = Transformer(run.model)
  tx, schedule = make_optimizer(run.optimizer, 1000, run.batch.batch_size)
  _, shardings = steps.abstract_state(model, tx, mesh, args.seq_len)
  in_sharding = sharding.batch_sharding(mesh, 3, batch_axis=1)
  rng = np.random.default_rng(0)
  host = synthetic_batch(rng, args.accumulation, args.micro_batch, args.seq_len,
                         run.model.vocab_size)
  rows = args.accumulation * args.micro_batch
  plain = data.to_global(host, in_sharding, args.micro_batch)
  halves = data.to_global(
      data.split_micro_batches({k: v.reshape(rows, -1) for k, v in host.items()}, 2),
      in_sharding, rows // 2)

  def setting(gns_every):
    step = steps.make_train_step(model, tx, schedule, mesh, shardings,
                                 TrainConfig(gns_every=gns_every))
    state = steps.init_state(model, tx, mesh, 0, args.seq_len)

    def batch_of(i):  # the loop's choice: halves on every gns_every-th step without accumulation
      if gns_every and args.accumulation == 1 and i % gns_every == 0:
        return halves
      return plain
    for i in range(2 * max(gns_every, 1)):  # compile every shape the run uses
      state, metrics = step(state, batch_of(i))
    jax.block_until_ready(metrics)
    return {"step": step, "state": state, "batch_of": batch_of, "i": 0, "time": 0.0}

  runs = {"off": setting(0), "on": setting(args.gns_every)}
  for _ in range(args.steps // args.block):
    for r in runs.values():
      start = time.perf_counter()
      for _ in range(args.block):
        r["state"], metrics = r["step"](r["state"], r["batch_of"](r["i"]))
        r["i"] += 1
      jax.block_until_ready(metrics)
      r["time"] += time.perf_counter() - start
  timed = runs["off"]["i"]
  overhead = runs["on"]["time"] / runs["off"]["time"] - 1
  device = jax.devices()[0]
  result = {"model": "+".join(args.gin_file) or "tiny", "device": device.device_kind,
            "devices": jax.device_count(), "seq_len": args.seq_len, "micro_batch": args.micro_batch,
            "accumulation": args.accumulation, "gns_every": args.gns_every, "steps": timed,
            "step_ms_off": 1e3 * runs["off"]["time"] / timed,
            "step_ms_on": 1e3 * runs["on"]["time"] / timed, "overhead": overhead,
            "gns": float(metrics["gns"]), "jax": jax.__version__}
  if args.results:
    append_row(args.results, [
        result["model"], f"{device.device_kind} x{jax.device_count()}", args.seq_len,
        f"{args.micro_batch} x {args.accumulation}", args.gns_every,
        f"{result['step_ms_off']:.1f}", f"{result['step_ms_on']:.1f}", f"{overhead:+.1%}",
        f"jax {jax.__version__}"])
  print(json.dumps(result))


if __name__ == "__main__":
  main(sys.argv[1:])
