"""What per-layer norms (TrainConfig.watch_every) cost a train step.

  python benchmarks/layer_norms.py --gin_file=models/125m.gin --seq_len=128 --micro_batch=2 \
      [--dtype=float32] [--mesh=1,1,1] [--steps=8] [--warmup=2] [--gin=BINDING ...]
  python benchmarks/layer_norms.py --gin_file=runs/tpu_pod.gin --tpu_topology=v5e:2x2 [--gin=...]

Three variants of one config's train step: watch off (watch_every=0); on, a step that
logs no norms (what most steps of a run with it on run: the gradient's norms behind a
lax.cond taken only on a skipped update); on, a step that logs them (the second compiled
variant, train_step.watched, what every watch_every-th step runs).
On the local device each is timed (synthetic batches, mean step time over --steps after
--warmup, the variants interleaved --repeats times). With --tpu_topology each is compiled
by the TPU compiler (libtpu) for that slice instead, and nothing runs: per-chip
temporaries and the compiler's bytes accessed (which count a scanned layer's body once;
the norms and the optimizer update are outside the layer scan, so their share is whole).
The last stdout line is a JSON object.
"""

import argparse
import dataclasses
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import train  # noqa: E402  (the gin edge)
from benchmarks.train_step import synthetic_batch  # noqa: E402

VARIANTS = (("off", 0, False), ("on, a step not logging them", 1, False),
            ("on, a step logging them", 1, True))


def main(argv):
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--gin_file", action="append", default=[])
  p.add_argument("--gin", action="append", default=[])
  p.add_argument("--seq_len", type=int, default=None)
  p.add_argument("--micro_batch", type=int, default=None)
  p.add_argument("--dtype", default=None)
  p.add_argument("--mesh", default=None, help="data,fsdp,tensor")
  p.add_argument("--steps", type=int, default=8)
  p.add_argument("--warmup", type=int, default=2)
  p.add_argument("--repeats", type=int, default=2)
  p.add_argument("--tpu_topology", default=None)
  args = p.parse_args(argv)
  if args.tpu_topology:
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
  import jax

  from bigsci_jax.config import MeshConfig

  bindings = list(args.gin)
  if args.dtype:
    bindings.append(f"ModelConfig.dtype='{args.dtype}'")
  if args.seq_len:
    bindings.append(f"SEQ_LEN={args.seq_len}")
  if args.micro_batch:
    bindings += [f"BATCH_SIZE={args.micro_batch}",
                 f"BatchConfig.micro_batch_size={args.micro_batch}",
                 "BatchConfig.warmup_start=None", "BatchConfig.warmup_increment=None"]

  def config(watch_every):
    run, _ = train.build_config(args.gin_file or ["runs/cpu_smoke.gin"],
                                bindings + [f"TrainConfig.watch_every={watch_every}"])
    if args.mesh:
      run = dataclasses.replace(run, mesh=MeshConfig(*[int(x) for x in args.mesh.split(",")]))
    return run

  result = {"model": "+".join(args.gin_file), "jax": jax.__version__, "variants": {}}
  if args.tpu_topology:
    from bigsci_jax import aot
    devices = aot.topology_devices(args.tpu_topology)
    for name, every, watch in VARIANTS:
      report, compiled = aot.compile_train_step(config(every), devices, args.tpu_topology,
                                                watch)
      cost = compiled.cost_analysis()
      cost = cost[0] if isinstance(cost, (list, tuple)) else cost
      result["variants"][name] = {"temp_gib": report.memory["temp"] / 2**30,
                                  "bytes_accessed_gb": cost.get("bytes accessed", 0) / 1e9}
    result.update(device=report.device_kind, topology=args.tpu_topology, mesh=report.mesh)
  else:
    timers = {name: _timer(config(every), watch, args) for name, every, watch in VARIANTS}
    times = {name: [] for name in timers}
    for _ in range(args.repeats):
      for name, timer in timers.items():
        times[name].append(timer())
    result["variants"] = {name: {"step_s": t} for name, t in times.items()}
    result["device"] = jax.devices()[0].device_kind
  print(json.dumps(result))


def _timer(run, watch, args):
  """A function that times args.steps train steps of `run` (after args.warmup)."""
  import jax
  import numpy as np

  from bigsci_jax import data, sharding
  from bigsci_jax import step as steps
  from bigsci_jax.model import Transformer
  from bigsci_jax.optim import make_optimizer

  mesh = sharding.make_mesh(run.mesh)
  model = Transformer(run.model)
  tx, schedule = make_optimizer(run.optimizer, 1000, run.batch.batch_size)
  _, shardings = steps.abstract_state(model, tx, mesh, run.batch.seq_len)
  state = [steps.init_state(model, tx, mesh, 0, run.batch.seq_len)]
  train_step = steps.make_train_step(model, tx, schedule, mesh, shardings, run.train)
  host = synthetic_batch(np.random.default_rng(0), 1, run.batch.micro_batch_size,
                         run.batch.seq_len, run.model.vocab_size)
  batch = data.to_global(host, sharding.batch_sharding(mesh, 3, batch_axis=1),
                         run.batch.micro_batch_size)

  def timed():
    for _ in range(args.warmup):
      state[0], metrics = train_step(state[0], batch, watch)
    jax.block_until_ready(metrics)
    start = time.perf_counter()
    for _ in range(args.steps):
      state[0], metrics = train_step(state[0], batch, watch)
    jax.block_until_ready(metrics)
    return (time.perf_counter() - start) / args.steps
  return timed


if __name__ == "__main__":
  main(sys.argv[1:])
