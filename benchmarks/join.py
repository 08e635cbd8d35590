"""Rows joining a server's KV cache over batch shards: putting prefilled rows into it.

  XLA_FLAGS=--xla_force_host_platform_device_count=2 python benchmarks/join.py \
      [--gin_file=models/125m.gin] [--mesh=2x1x1] [--cache_rows=8] [--rows=2] [--width=512]
      [--repeats=20] [--tpu_topology=v5e:2x2] [--results=benchmarks/RESULTS.md]

A cache of --cache_rows rows of the model's window (generate.Decoder, random weights,
the cache's rows split over the mesh's batch axes) and a prefill's cache of --rows rows
--width slots wide, each prefill row going to a slot of its own shard's block of the
cache (as the engine's joins place them): put by each shard into its own rows
(kv_cache.put_rows_locally, what Decoder.put_rows runs for such slots), and by the
global put of every join before (kv_cache.put_rows, still what slots in other blocks
take). Both compute the same cache. Each is compiled once, then timed --repeats times
(the median); both list their compiled collectives (op, shape) and temporaries. With
--tpu_topology the two are compiled by the TPU compiler (libtpu) for that slice instead
and nothing runs. The last stdout line is a JSON object; --results appends a row per put.
"""

import argparse
import json
import os
import sys
import time

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import train  # noqa: E402  (the gin edge: builds RunConfig from gin files)
from benchmarks.results_table import append_row  # noqa: E402
from bigsci_jax import generate, kv_cache, sharding  # noqa: E402
from bigsci_jax.aot import collectives, topology_devices  # noqa: E402
from bigsci_jax.config import MeshConfig, parse_mesh  # noqa: E402
from bigsci_jax.model import Transformer  # noqa: E402


def main(argv):
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--gin_file", action="append", default=[])
  p.add_argument("--mesh", default="2x1x1", help="DATAxFSDPxTENSOR")
  p.add_argument("--cache_rows", type=int, default=8)
  p.add_argument("--rows", type=int, default=2)
  p.add_argument("--width", type=int, default=512)
  p.add_argument("--repeats", type=int, default=20)
  p.add_argument("--dtype", default="float32")
  p.add_argument("--tpu_topology", default="")
  p.add_argument("--results", default=None)
  args = p.parse_args(argv)
  run, _ = train.build_config(["runs/cpu_smoke.gin"] + args.gin_file,
                              [f"ModelConfig.dtype='{args.dtype}'"])
  model = Transformer(run.model)
  shape = MeshConfig(**parse_mesh(args.mesh))
  devices = topology_devices(args.tpu_topology) if args.tpu_topology else jax.devices()
  mesh = sharding.make_mesh(shape, list(devices)[:shape.data * shape.fsdp * shape.tensor])
  shards = sharding.batch_shards(mesh)
  if shards < 2 or args.rows % shards or args.cache_rows % shards:
    raise SystemExit(f"--mesh={args.mesh} must split the batch, and --rows={args.rows} and "
                     f"--cache_rows={args.cache_rows} must be multiples of its {shards} shards.")
  decoder = generate.Decoder(model, mesh)
  shift = np.zeros(args.rows, np.int32)
  result = {"model": "+".join(args.gin_file) or "tiny", "mesh": args.mesh,
            "device": args.tpu_topology or devices[0].device_kind, "cache_rows": args.cache_rows,
            "rows": args.rows, "width": args.width, "window": run.model.max_len,
            "jax": jax.__version__}
  slots = np.asarray(kv_cache.step_rows(args.cache_rows, args.rows, shards), np.int32)
  for name, fn in (("local", decoder._put_locally), ("global", decoder._put_rows)):
    with sharding.activate(mesh):
      compiled = fn.lower(kv_cache.abstract(model, args.cache_rows, mesh),
                          kv_cache.abstract(model, args.rows, mesh, args.width),
                          slots, shift).compile()
    moved = [(op, shape) for op, shape, _ in collectives(compiled)]
    temp = compiled.memory_analysis().temp_size_in_bytes
    row = {"collectives": moved, "temp_mib": temp / 2 ** 20}
    if not args.tpu_topology:
      cache = decoder.empty_cache(args.cache_rows, run.model.max_len)
      new = decoder.empty_cache(args.rows, args.width)
      times = []
      for _ in range(args.repeats + 1):
        start = time.perf_counter()
        cache = jax.block_until_ready(decoder._run(fn, cache, new, slots, shift))
        times.append(time.perf_counter() - start)
      row["ms"] = 1e3 * float(np.median(times[1:]))  # the first compiles
    result[name] = row
    if args.results:
      gathered = sum(1 for op, _ in moved if op != "all-reduce")
      append_row(args.results, [
          result["model"], args.mesh, result["device"], args.cache_rows, args.rows, args.width,
          name, f"{row['ms']:.2f}" if "ms" in row else "-", len(moved), gathered,
          f"{row['temp_mib']:.2f}", f"jax {jax.__version__}"])
  print(json.dumps(result))


if __name__ == "__main__":
  main(sys.argv[1:])
