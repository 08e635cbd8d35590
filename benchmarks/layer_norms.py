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

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import train  # noqa: E402  (the gin edge)
from benchmarks.train_step import step_timer  # noqa: E402

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
    from bigsci_jax import sharding
    runs = {name: (config(every), watch) for name, every, watch in VARIANTS}
    timers = {name: step_timer(run, sharding.make_mesh(run.mesh), watch)
              for name, (run, watch) in runs.items()}
    times = {name: [] for name in timers}
    for _ in range(args.repeats):
      for name, timer in timers.items():
        times[name].append(timer(args.steps, args.warmup)[0])
    result["variants"] = {name: {"step_s": t} for name, t in times.items()}
    result["device"] = jax.devices()[0].device_kind
  print(json.dumps(result))


if __name__ == "__main__":
  main(sys.argv[1:])
