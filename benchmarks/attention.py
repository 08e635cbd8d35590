"""Attention kernels: time, TFLOP/s and memory of every implementation, or, with
--tpu_topology, what the real TPU compiler says about each on one chip.

  python benchmarks/attention.py [--lengths=2048,4096,8192,16384] [--dims=64,128] \
      [--impls=xla,cudnn,pallas_gpu] [--results=benchmarks/RESULTS.md]
  python benchmarks/attention.py --tpu_topology=v5e:2x2 [--results=benchmarks/RESULTS.md]

Run mode (the present backend): forward and forward+backward, bf16, H=16 heads,
B*T = 16384 tokens per call, each case jitted and timed (median of --iters after
--warmup). TFLOP/s twice: over the dense count (4*B*H*T^2*D forward, 2.5x that
backward) and over the valid-pair count (only the (query, key) pairs the mask
lets through: about half for causal). Memory: the compiler's temporaries for
forward+backward (memory_analysis), so cases are comparable without resetting the
allocator. A case that does not fit prints OOM.

--tpu_topology mode: nothing runs; forward+backward is compiled for one chip of the
topology (libtpu, the [tpu] extra) for xla, pallas_tpu and jax's splash attention
(causal and packed only: it has no ALiBi bias and its masks are static, so no
per-example prefix), and the table gives per-chip temporaries and whether the
program fits the chip's HBM.

Features: causal; prefix (one document per row, its first half the bidirectional
prefix); alibi (causal + ALiBi); packed (4 documents per row and 5% padding);
all (ALiBi + prefix + packing: the BigScience prefix-LM case). Imports only jax,
numpy and bigsci_jax.kernels (no TensorFlow). The last stdout line is JSON.
"""

import argparse
import json
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bigsci_jax import kernels  # noqa: E402
from bigsci_jax.config import default_alibi_slopes  # noqa: E402
from benchmarks.results_table import append_row  # noqa: E402

FEATURES = ("causal", "prefix", "alibi", "packed", "all")
HEADS, TOKENS = 16, 16384
HBM_BYTES = {"v5e": 16 * 2**30, "v5p": 95 * 2**30, "v6e": 32 * 2**30, "v4": 32 * 2**30}


def feature_inputs(feature, b, t):
  """segment_ids, prefix_mask, alibi slopes (numpy / None) for one feature set."""
  seg = prefix = slopes = None
  if feature in ("packed", "all"):
    live = int(t * 0.95)
    cuts = np.linspace(0, live, 5).astype(int)
    seg = np.zeros((b, t), np.int32)
    for i in range(4):
      seg[:, cuts[i]:cuts[i + 1]] = i + 1
  if feature in ("prefix", "all"):
    starts = [0] if seg is None else list(np.linspace(0, int(t * 0.95), 5).astype(int)[:-1])
    ends = [t] if seg is None else list(np.linspace(0, int(t * 0.95), 5).astype(int)[1:])
    prefix = np.zeros((b, t), np.int32)
    for start, end in zip(starts, ends):
      prefix[:, start:start + (end - start) // 2] = 1
  if feature in ("alibi", "all"):
    slopes = default_alibi_slopes(HEADS)
  return seg, prefix, slopes


def valid_pairs(seg, prefix, b, t):
  """Visible (query, key) pairs per head, summed over the batch: causal within each
  document plus the prefix's pairs above the diagonal (prefixes lead documents)."""
  seg = np.ones((b, t), np.int32) if seg is None else seg
  prefix = np.zeros((b, t), np.int32) if prefix is None else prefix
  total = 0
  for row in range(b):
    for s in np.unique(seg[row][seg[row] > 0]):
      n = int(np.sum(seg[row] == s))
      p = int(np.sum(prefix[row][seg[row] == s]))
      total += n * (n + 1) // 2 + p * (p - 1) // 2
  return total


def forward_backward(impl, slopes):
  """(q, k, v, d_out, seg, prefix) -> (dq, dk, dv); seg / prefix are traced arguments
  (None: not used), so no O(T^2) mask is folded into the program as a constant."""
  def run(q, k, v, d_out, seg, prefix):
    out, vjp = jax.vjp(lambda q, k, v: attend(impl, q, k, v, seg, prefix, slopes), q, k, v)
    return vjp(d_out)
  return run


def attend(impl, q, k, v, seg, prefix, slopes):
  if impl == "splash":
    return splash(q, k, v, seg)
  if impl.startswith("pallas_gpu:"):  # a tuning: pallas_gpu:BQxBKxWARPSxSTAGES
    bq, bk, warps, stages = (int(x) for x in impl.split(":")[1].split("x"))
    return kernels.pallas_gpu.attention(q, k, v, segment_ids=seg, prefix_mask=prefix,
                                        alibi_slopes=slopes, block_q=bq, block_k=bk,
                                        num_warps=warps, num_stages=stages)
  return kernels.attention(q, k, v, segment_ids=seg, prefix_mask=prefix, alibi_slopes=slopes,
                           impl=impl)


def splash(q_BxTxHxK, k_BxTxHxK, v_BxTxHxK, seg):
  """jax's splash attention (TPU), causal with optional segment ids: the comparison point."""
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm
  b, t, h, d = q_BxTxHxK.shape
  kernel = sk.make_splash_mha(sm.MultiHeadMask([sm.CausalMask((t, t))] * h), head_shards=1,
                              q_seq_shards=1)
  q, k, v = (x.transpose(0, 2, 1, 3) for x in (q_BxTxHxK * d ** -0.5, k_BxTxHxK, v_BxTxHxK))
  if seg is None:
    out = jax.vmap(kernel)(q, k, v)
  else:
    ids = jnp.asarray(seg)
    out = jax.vmap(lambda q, k, v, s: kernel(q, k, v, segment_ids=sk.SegmentIds(q=s, kv=s)))(
        q, k, v, ids)
  return out.transpose(0, 2, 1, 3)


def shapes(t, d, sharding=None, tokens=TOKENS):
  b = max(1, tokens // t)
  spec = jax.ShapeDtypeStruct((b, t, HEADS, d), jnp.bfloat16, sharding=sharding)
  return b, (spec,) * 4


def supports(impl, feature):
  return impl != "splash" or feature in ("causal", "packed")


def tpu_table(args):
  from bigsci_jax.aot import topology_devices  # libtpu, loadable beside other compile checks
  devices = topology_devices(args.tpu_topology)
  chip = args.tpu_topology.split(":")[0]
  hbm = HBM_BYTES.get(chip)
  one = jax.sharding.SingleDeviceSharding(devices[0])
  rows = []
  with jax.set_mesh(jax.sharding.Mesh(np.array(devices[:1]), ("x",))):
    for t in args.lengths:
      for d in args.dims:
        b, specs = shapes(t, d, one, args.tokens)
        for feature in args.features:
          seg, prefix, slopes = feature_inputs(feature, b, t)
          for impl in args.impls:
            if not supports(impl, feature):
              continue
            try:
              masks = [None if x is None else jax.ShapeDtypeStruct(x.shape, jnp.int32, sharding=one)
                       for x in (seg, prefix)]
              compiled = jax.jit(forward_backward(impl, slopes)).lower(*specs, *masks).compile()
              memory = compiled.memory_analysis()
              temp = memory.temp_size_in_bytes
              total = temp + memory.argument_size_in_bytes + memory.output_size_in_bytes
              fits = "yes" if hbm is None or total <= hbm else "no"
            except Exception as e:  # the compiler refuses what does not fit the chip
              if "RESOURCE_EXHAUSTED" not in str(e):
                raise
              temp, fits = None, "no (RESOURCE_EXHAUSTED)"
            row = dict(topology=args.tpu_topology, device=devices[0].device_kind, impl=impl,
                       t=t, d=d, batch=b, feature=feature,
                       temp_gib=None if temp is None else round(temp / 2**30, 3), fits=fits)
            rows.append(row)
            print(f"{args.tpu_topology:9} {impl:10} T={t:6} D={d:3} B={b:2} {feature:7} "
                  f"temp={'-' if temp is None else f'{temp / 2**30:.3f} GiB':>11} fits={fits}",
                  flush=True)
            if args.results:
              append_row(args.results, [row["device"], args.tpu_topology, impl, t, d, b, feature,
                                        "-" if temp is None else f"{temp / 2**30:.3f}", fits,
                                        f"jax {jax.__version__}"])
  return rows


def timed(fn, inputs, warmup, iters):
  out = fn(*inputs)
  jax.block_until_ready(out)
  for _ in range(warmup):
    jax.block_until_ready(fn(*inputs))
  times = []
  for _ in range(iters):
    start = time.perf_counter()
    jax.block_until_ready(fn(*inputs))
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def run_table(args):
  device = jax.devices()[0]
  rows = []
  for t in args.lengths:
    for d in args.dims:
      b, specs = shapes(t, d, tokens=args.tokens)
      keys = jax.random.split(jax.random.key(0), 4)
      q, k, v, d_out = (jax.random.normal(key, spec.shape, spec.dtype)
                        for key, spec in zip(keys, specs))
      for feature in args.features:
        seg, prefix, slopes = feature_inputs(feature, b, t)
        dense = 4 * b * HEADS * t * t * d
        valid = 4 * HEADS * valid_pairs(seg, prefix, b, t) * d
        for impl in args.impls:
          if not supports(impl, feature):
            continue
          row = dict(device=device.device_kind, impl=impl, t=t, d=d, batch=b, feature=feature)
          try:
            masks = [None if x is None else jnp.asarray(x) for x in (seg, prefix)]
            fwd = jax.jit(lambda q, k, v, seg, prefix: attend(impl, q, k, v, seg, prefix, slopes))
            both = jax.jit(forward_backward(impl, slopes))
            memory = both.lower(q, k, v, d_out, *masks).compile().memory_analysis()
            row["fwd_ms"] = 1e3 * timed(fwd, (q, k, v, *masks), args.warmup, args.iters)
            row["fwd_bwd_ms"] = 1e3 * timed(both, (q, k, v, d_out, *masks), args.warmup,
                                            args.iters)
            row["temp_gib"] = memory.temp_size_in_bytes / 2**30
            for name, flops in (("dense", dense), ("valid", valid)):
              row[f"fwd_tflops_{name}"] = flops / row["fwd_ms"] / 1e9
              row[f"fwd_bwd_tflops_{name}"] = 3.5 * flops / row["fwd_bwd_ms"] / 1e9
          except Exception as e:  # out of memory, or a feature the impl refuses
            row["error"] = "OOM" if "RESOURCE_EXHAUSTED" in str(e) else type(e).__name__
          rows.append(row)
          print(_format(row), flush=True)
          if args.results:
            append_row(args.results, _cells(row))
  return rows


def _format(row):
  if "error" in row:
    return f"{row['impl']:10} T={row['t']:6} D={row['d']:3} {row['feature']:7} {row['error']}"
  return (f"{row['impl']:10} T={row['t']:6} D={row['d']:3} {row['feature']:7} "
          f"fwd {row['fwd_ms']:8.2f} ms {row['fwd_tflops_dense']:6.1f}/{row['fwd_tflops_valid']:6.1f}"
          f" TFLOP/s  fwd+bwd {row['fwd_bwd_ms']:8.2f} ms {row['fwd_bwd_tflops_dense']:6.1f}/"
          f"{row['fwd_bwd_tflops_valid']:6.1f} TFLOP/s  temp {row['temp_gib']:.3f} GiB")


def _cells(row):
  if "error" in row:
    return [row["device"], row["impl"], row["t"], row["d"], row["feature"]] + [row["error"]] * 7
  return [row["device"], row["impl"], row["t"], row["d"], row["feature"],
          f"{row['fwd_ms']:.2f}", f"{row['fwd_tflops_dense']:.1f}", f"{row['fwd_tflops_valid']:.1f}",
          f"{row['fwd_bwd_ms']:.2f}", f"{row['fwd_bwd_tflops_dense']:.1f}",
          f"{row['fwd_bwd_tflops_valid']:.1f}", f"{row['temp_gib']:.3f}"]


def main(argv):
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--lengths", default="2048,4096,8192,16384")
  p.add_argument("--dims", default="64,128")
  p.add_argument("--features", default=",".join(FEATURES))
  p.add_argument("--impls", default=None,
                 help="default: xla,cudnn,pallas_gpu on GPU; xla,pallas_tpu(,splash) on TPU; "
                      "pallas_gpu:BQxBKxWARPSxSTAGES runs that tuning of the GPU kernel")
  p.add_argument("--tpu_topology", default=None, help="e.g. v5e:2x2: compile only, for one chip")
  p.add_argument("--tokens", type=int, default=TOKENS, help="B*T per call")
  p.add_argument("--warmup", type=int, default=2)
  p.add_argument("--iters", type=int, default=10)
  p.add_argument("--results", default=None, help="append markdown rows to this file")
  args = p.parse_args(argv)
  args.lengths = [int(x) for x in args.lengths.split(",")]
  args.dims = [int(x) for x in args.dims.split(",")]
  args.features = args.features.split(",")
  unknown = set(args.features) - set(FEATURES)
  if unknown:
    p.error(f"unknown features {sorted(unknown)}; choose from {', '.join(FEATURES)}")
  platform = "tpu" if args.tpu_topology else jax.default_backend()
  default = {"tpu": "xla,pallas_tpu,splash", "gpu": "xla,cudnn,pallas_gpu"}.get(platform, "xla")
  args.impls = (args.impls or default).split(",")
  rows = tpu_table(args) if args.tpu_topology else run_table(args)
  print(json.dumps(rows))


if __name__ == "__main__":
  main(sys.argv[1:])
