"""Train-step throughput: tokens/s, step time, MFU and peak memory for one config and mesh.

  python benchmarks/train_step.py --gin_file=models/1_3b.gin --seq_len=2048 \
      --micro_batch=8 --dtype=bfloat16 [--mesh=1,1,1] [--steps=10] [--results=benchmarks/RESULTS.md]

Batches are synthetic (random tokens, one document per row), so no data pipeline
or TensorFlow is needed. MFU uses the same FLOP count as training metrics
(bigsci_jax.flops, Chinchilla convention) against the device's dense bf16 peak.
The last stdout line is a JSON object.
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
import train  # noqa: E402  (the gin edge: builds RunConfig from gin files)
from bigsci_jax import data, flops, sharding  # noqa: E402
from bigsci_jax import step as steps  # noqa: E402
from bigsci_jax.config import MeshConfig  # noqa: E402
from bigsci_jax.model import Transformer  # noqa: E402
from bigsci_jax.optim import make_optimizer  # noqa: E402
from benchmarks.results_table import append_row  # noqa: E402


def synthetic_batch(rng, accumulation, rows, seq_len, vocab):
  tokens = rng.integers(2, vocab, size=(accumulation, rows, seq_len), dtype=np.int32)
  ones = np.ones_like(tokens)
  return {"decoder_input_tokens": tokens, "decoder_target_tokens": np.roll(tokens, -1, -1),
          "decoder_loss_weights": ones, "decoder_segment_ids": ones,
          "decoder_positions": np.broadcast_to(np.arange(seq_len, dtype=np.int32), tokens.shape),
          "decoder_causal_attention": np.zeros_like(tokens)}


def step_timer(run, mesh, watch=False):
  """timer(steps, warmup) -> (mean seconds of `steps` train steps of `run` after `warmup`
  more, the last step's metrics), on one synthetic batch of run.batch.batch_size
  sequences in micro-batches of micro_batch_size; the state carries on from call to
  call. watch: the steps that compute per-layer norms (train_step.watched)."""
  model = Transformer(run.model)
  seq_len, micro = run.batch.seq_len, run.batch.micro_batch_size
  tx, schedule = make_optimizer(run.optimizer, 1000, run.batch.batch_size)
  _, shardings = steps.abstract_state(model, tx, mesh, seq_len)
  state = [steps.init_state(model, tx, mesh, 0, seq_len)]
  train_step = steps.make_train_step(model, tx, schedule, mesh, shardings, run.train)
  host = synthetic_batch(np.random.default_rng(0), run.batch.batch_size // micro, micro,
                         seq_len, run.model.vocab_size)
  batch = data.to_global(host, sharding.batch_sharding(mesh, 3, batch_axis=1), micro)

  def timer(count, warmup):
    for _ in range(warmup):
      state[0], metrics = train_step(state[0], batch, watch)
    jax.block_until_ready(metrics)
    start = time.perf_counter()
    for _ in range(count):
      state[0], metrics = train_step(state[0], batch, watch)
    jax.block_until_ready(metrics)
    return (time.perf_counter() - start) / count, metrics
  return timer


def main(argv):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--gin_file", action="append", default=[])
  p.add_argument("--gin", action="append", default=[], help="extra binding, e.g. ModelConfig.remat='full'")
  p.add_argument("--seq_len", type=int, default=2048)
  p.add_argument("--micro_batch", type=int, default=8)
  p.add_argument("--accumulation", type=int, default=1)
  p.add_argument("--dtype", default="bfloat16")
  p.add_argument("--mesh", default="-1,1,1", help="data,fsdp,tensor")
  p.add_argument("--steps", type=int, default=10)
  p.add_argument("--warmup", type=int, default=3)
  p.add_argument("--results", default=None, help="append a markdown row to this file")
  args = p.parse_args(argv)

  bindings = [f"ModelConfig.dtype='{args.dtype}'", f"SEQ_LEN={args.seq_len}",
              f"BATCH_SIZE={args.micro_batch * args.accumulation}",
              f"BatchConfig.micro_batch_size={args.micro_batch}"] + args.gin
  run, _ = train.build_config(["runs/cpu_smoke.gin"] + args.gin_file, bindings)
  run = dataclasses.replace(run, mesh=MeshConfig(*[int(x) for x in args.mesh.split(",")]))
  mesh = sharding.make_mesh(run.mesh)
  step_time, metrics = step_timer(run, mesh)(args.steps, args.warmup)

  tokens = args.micro_batch * args.accumulation * args.seq_len
  tokens_per_s = tokens / step_time
  flops_per_token = flops.flops_per_token(run.model, args.seq_len)
  device = jax.devices()[0]
  peak = flops.peak_flops(device.device_kind)
  stats = device.memory_stats() or {}
  result = {
      "model": "+".join(args.gin_file) or "tiny", "params": flops.param_counts(run.model).total,
      "device": device.device_kind, "devices": jax.device_count(), "mesh": list(mesh.shape.values()),
      "dtype": args.dtype, "remat": run.model.remat, "seq_len": args.seq_len,
      "batch_tokens": tokens, "step_time_s": step_time, "tokens_per_s": tokens_per_s,
      "mfu": flops_per_token * tokens_per_s / (peak * jax.device_count()) if peak else None,
      "peak_memory_gib": stats.get("peak_bytes_in_use", 0) / 2**30 or None,
      "loss": float(metrics["loss"]), "watch_every": run.train.watch_every, "jax": jax.__version__,
  }
  if args.results:
    mfu = f"{result['mfu']:.1%}" if result["mfu"] is not None else "n/a"
    mem = f"{result['peak_memory_gib']:.1f}" if result["peak_memory_gib"] else "n/a"
    append_row(args.results, [
        result["model"], f"{result['params'] / 1e6:.0f}M", f"{result['device']} x{result['devices']}",
        args.dtype, run.model.remat, args.seq_len, tokens, f"{step_time * 1e3:.1f}",
        f"{tokens_per_s:,.0f}", mfu, mem,
        f"jax {jax.__version__}, attention_impl='{run.model.attention_impl}'"])
  print(json.dumps(result))


if __name__ == "__main__":
  main(sys.argv[1:])
