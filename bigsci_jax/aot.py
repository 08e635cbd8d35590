"""Ahead-of-time scale check: compile the train step, or one decoding step, for a
device slice without one.

  python -m bigsci_jax.aot [--gin_file=F ...] --topology=v5p:8x8x4 [--mesh=DATAxFSDPxTENSOR]
                           [--slices=N]
                           [--step=train|decode] [--decode_rows=N] [--offload=host]
                           [--gin.NAME=VALUE ...] [--verbose]

`--topology` names a TPU slice (`v5e:4x4`, `v5p:8x8x4`, `v4:4x4x8`, `v6e:16x16`: the
real TPU compiler from libtpu, the [tpu] extra, compiles for it on this machine) or
`cpu:N` (N fake CPU devices: a mesh check without libtpu); `--slices=N` compiles for N
such slices joined over the data axis (TPU multislice, MeshConfig.slices). Nothing is allocated:
the state and batch are abstract (shapes, dtypes, shardings) and nothing runs.
Prints per-chip memory (arguments, outputs, temporaries, total), the chip's HBM
and whether it fits, parameters, FLOPs per step (bigsci_jax.flops; the compiler's
cost analysis counts a scanned layer once) and compile time; the last stdout line
is a JSON object. A config over the chip's memory exits 1 with one sentence.

--step=decode compiles what generation and serving run per new token
(generate.Decoder's step): N rows (--decode_rows) each add one token to a KV cache of
ModelConfig.max_len slots, the parameters in their ModelConfig.param_dtype (bind
'bfloat16' for a released model's weights) and the cache's rows over data x fsdp, its
heads over tensor. With --offload=host the parameters are arguments in pinned host
memory and each layer's weights are copied to the device inside the layer scan; the
report adds the host bytes per device (what the host must hold for it).
"""

import argparse
import dataclasses
import json
import os
import re
import sys
import time

from bigsci_jax.config import OFFLOAD, parse_mesh  # no jax import: main sets the platform first

# The HBM a TPU device's program may use, by jax device_kind prefix: the limits the
# TPU compiler reports (libtpu 0.0.42.1). libtpu's v4 topologies have one device per
# TensorCore, two per chip (no megacore), each with about half the chip's 32 GiB.
HBM_BYTES = (("TPU v6", 31.25 * 2**30), ("TPU v5 lite", 15.75 * 2**30),
             ("TPU v5", 95.74 * 2**30), ("TPU v4", 15.25 * 2**30))


class AotError(RuntimeError):
  """The compile check cannot go on or the program does not fit; one sentence says why."""


def hbm_bytes(device_kind):
  for prefix, size in HBM_BYTES:
    if device_kind.startswith(prefix):
      return int(size)
  return None


def topology_devices(topology, slices=1):
  """The devices of a named slice: 'cpu:N' (this process's first N CPU devices) or a
  TPU topology name for libtpu ('v5e:2x2', 'v5p:8x8x4', ...); slices > 1: that many
  such slices (TPU multislice; cpu:N, N devices for each)."""
  import jax
  platform, _, shape = topology.partition(":")
  if platform == "cpu":
    if not shape.isdigit() or int(shape) < 1:
      raise AotError(f"--topology={topology!r}: write cpu:N with N a positive number of devices.")
    devices, count = jax.devices("cpu"), int(shape) * slices
    if count > len(devices):
      raise AotError(f"--topology={topology!r} needs {count} CPU devices but this process has "
                     f"{len(devices)}; set XLA_FLAGS=--xla_force_host_platform_device_count="
                     f"{count} before jax starts (python -m bigsci_jax.aot does).")
    return devices[:count]
  # Nothing runs on these devices: several compile checks (a test worker each, a sweep of
  # configs) may load libtpu side by side, which its lock file refuses by default.
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  try:
    from jax.experimental import topologies
    return list(topologies.get_topology_desc(platform="tpu", topology_name=topology,
                                             num_slices=slices).devices)
  except (ImportError, RuntimeError, ValueError) as e:
    raise AotError(f"--topology={topology!r} is not a TPU slice the TPU compiler knows "
                   f"({str(e).splitlines()[0][:120]}); name one like v5e:2x2, v5p:8x8x4 or v4:4x4x8, "
                   f"and install the [tpu] extra (libtpu).") from e


@dataclasses.dataclass(frozen=True)
class Report:
  """One compile: where, what, and the compiler's per-device memory."""
  topology: str
  step: str               # "train" or "decode"
  offload: str            # "none" or "host" (where the parameters live)
  device_kind: str
  devices: int
  chips: int
  slices: int             # slices of `topology` joined over the data axis (multislice)
  mesh: dict
  params: int
  attention_impl: str
  remat: str
  sequence_parallel: bool
  logits_chunk: int       # ModelConfig.logits_chunk (0: every column's logits at once)
  batch: dict             # train: global, micro, accumulation, seq_len; decode: rows, cache_len
  flops_per_step: float
  memory: dict            # per device: argument, output, alias, temp, code, total (device
                          # memory) and host_argument, host_temp bytes
  bytes_per_chip: int     # memory["total"]
  hbm_bytes: int | None
  fits: bool
  compile_s: float

  def to_dict(self):
    return dataclasses.asdict(self)


def too_big(topology, device_kind, mesh, needed, available, what="train step", offload="none",
            run=None):
  """One sentence: what does not fit where, and how to fix it (run: the train step's
  RunConfig, whose model and batch say which fixes apply)."""
  amount = (f"needs {needed} per device but the {device_kind} device has {available}" if needed
            else f"does not fit the {device_kind} device's memory")
  if what == "train step":
    fixes = ["a smaller BatchConfig.micro_batch_size"]
    if run is not None and mesh["tensor"] > 1 and not run.model.sequence_parallel:
      fixes.append("ModelConfig.sequence_parallel=True")
    hbm = hbm_bytes(device_kind)
    if run is not None and not run.model.logits_chunk and hbm and logits_bytes(run, mesh) > hbm / 10:
      fixes.append(f"ModelConfig.logits_chunk={LOGITS_CHUNK}")
    fixes = ", ".join(fixes) + ", or ModelConfig.remat='full'"
  else:
    fixes = ("fewer --decode_rows, or a shorter ModelConfig.max_len" if offload == "host"
             else "fewer --decode_rows, a shorter ModelConfig.max_len, or --offload=host")
  return (f"the {what} on {topology} with mesh data={mesh['data']} fsdp={mesh['fsdp']} "
          f"tensor={mesh['tensor']} {amount}: use a bigger slice, another mesh (more fsdp or "
          f"tensor), {fixes}.")


LOGITS_CHUNK = 512  # the columns per logits chunk too_big suggests


def logits_bytes(run, mesh):
  """The bytes of one micro-batch's float32 logits on one device, all columns at once
  (ModelConfig.logits_chunk=0): its rows split over data x fsdp, the vocabulary over
  tensor where they divide."""
  rows = run.batch.micro_batch_size
  rows //= mesh["data"] * mesh["fsdp"] if rows % (mesh["data"] * mesh["fsdp"]) == 0 else 1
  vocab = run.model.vocab_size
  vocab //= mesh["tensor"] if vocab % mesh["tensor"] == 0 else 1
  return 4 * rows * run.batch.seq_len * vocab


def _exhausted(message):
  """(needed, available) from the compiler's out-of-memory message, or (None, None)."""
  size = r"([\d.]+\s*[KMGT]i?B?)"
  amounts = (re.search(rf"required[^(]*\({size}\)[^(]*available[^(]*\({size}\)", message)
             or re.search(rf"[Uu]sed {size} of {size}", message))
  return amounts.groups() if amounts else (None, None)


def _mesh(run, devices):
  """(run with its mesh sizes resolved for these devices, the Mesh)."""
  from bigsci_jax import sharding
  shape = sharding.mesh_shape(run.mesh, len(devices))
  run = dataclasses.replace(run, mesh=dataclasses.replace(run.mesh, data=shape[0],
                                                          fsdp=shape[1], tensor=shape[2]))
  return run, sharding.make_mesh(run.mesh, devices)


def _compile(lowered_fn, mesh, devices, topology, what, offload="none", run=None):
  """(compiled, seconds): lowered_fn() compiled under the mesh's logical rules; a program
  over the chip's memory raises AotError with the compiler's amounts."""
  from bigsci_jax import sharding
  start = time.perf_counter()
  try:
    with sharding.activate(mesh):
      compiled = lowered_fn().compile()
  except Exception as e:  # the compiler's errors are XlaRuntimeError / JaxRuntimeError
    if "RESOURCE_EXHAUSTED" not in str(e):
      raise
    raise AotError(too_big(topology or devices[0].platform, devices[0].device_kind,
                           dict(mesh.shape), *_exhausted(str(e)), what, offload,
                           run)) from e
  return compiled, time.perf_counter() - start


def _report(compiled, compile_s, run, mesh, devices, topology, **fields):
  """The Report of a compiled program: the compiler's per-device memory against the HBM."""
  m = compiled.memory_analysis()
  memory = {"argument": m.argument_size_in_bytes, "output": m.output_size_in_bytes,
            "alias": m.alias_size_in_bytes, "temp": m.temp_size_in_bytes,
            "code": m.generated_code_size_in_bytes}
  memory["total"] = (memory["argument"] + memory["output"] - memory["alias"] + memory["temp"]
                     + memory["code"])
  memory["host_argument"] = getattr(m, "host_argument_size_in_bytes", 0)
  memory["host_temp"] = getattr(m, "host_temp_size_in_bytes", 0)
  kind = devices[0].device_kind
  hbm = hbm_bytes(kind)
  cores = len({getattr(d, "core_on_chip", 0) for d in devices})
  from bigsci_jax import flops
  return Report(
      topology=topology or f"{devices[0].platform}:{len(devices)}", device_kind=kind,
      devices=len(devices), chips=len(devices) // cores, slices=run.mesh.slices,
      mesh={k: int(v) for k, v in mesh.shape.items()},
      params=flops.param_counts(run.model).total, remat=run.model.remat,
      sequence_parallel=run.model.sequence_parallel, logits_chunk=run.model.logits_chunk,
      memory=memory,
      bytes_per_chip=memory["total"], hbm_bytes=hbm,
      fits=hbm is None or memory["total"] <= hbm, compile_s=round(compile_s, 1), **fields)


def collectives(compiled):
  """(op, shape, enclosing computation) of every collective in a compiled HLO module: one
  entry per array of its result, so a combined collective (a tuple of arrays, as XLA's
  combiners make them) gives each of its arrays, and an asynchronous start its operands'
  and outputs' (its result holds both, and scalar sync contexts, which are left out)."""
  found, computation = [], None
  for line in compiled.as_text().splitlines():
    head = re.match(r"^(?:ENTRY )?%(\S+) .*\{$", line)
    if head:
      computation = head.group(1)
    _, eq, rhs = line.partition(" = ")
    op = eq and re.match(r"(.*?) (all-reduce|all-gather|all-to-all|reduce-scatter|"
                         r"collective-permute)(-start)?\(", rhs)
    if op:
      shapes = re.findall(r"\w+\[([\d,]*)\]", op.group(1))
      found += [(op.group(2), shape, computation) for shape in shapes
                if shape or not op.group(3)]
  return found


def _attention_impl(run, mesh):
  """The attention the train step uses on the mesh's devices ("auto" resolved there)."""
  from bigsci_jax import sharding
  from bigsci_jax.kernels import auto_impl
  if run.model.attention_impl != "auto":
    return run.model.attention_impl
  with sharding.activate(mesh):
    return auto_impl()


def compile_train_step(run, devices, topology="", watch=False):
  """Lower and compile `run`'s train step for `devices` (abstract state and batch; with
  `watch`, the variant that computes per-layer norms); returns (Report, compiled).
  Raises AotError when it does not fit."""
  import jax
  import jax.numpy as jnp

  from bigsci_jax import data, flops, sharding
  from bigsci_jax import step as steps
  from bigsci_jax.loop import check_batch_fits_mesh
  from bigsci_jax.model import Transformer
  from bigsci_jax.optim import make_optimizer

  run, mesh = _mesh(run, devices)
  check_batch_fits_mesh(run, mesh, processes=1)
  model = Transformer(run.model)
  tx, schedule = make_optimizer(run.optimizer, run.train.train_steps, run.batch.batch_size)
  abstract, shardings = steps.abstract_state(model, tx, mesh, run.batch.seq_len,
                                             run.train.spike_window)
  accumulation = run.batch.batch_size // run.batch.micro_batch_size
  batch_shape = (accumulation, run.batch.micro_batch_size, run.batch.seq_len)
  batch = {k: jax.ShapeDtypeStruct(batch_shape, jnp.int32,
                                   sharding=sharding.batch_sharding(mesh, 3, batch_axis=1))
           for k in data.FEATURES}
  train_step = steps.make_train_step(model, tx, schedule, mesh, shardings, run.train)
  jitted = train_step.watched if watch else train_step.jitted
  compiled, seconds = _compile(lambda: jitted.lower(abstract, batch), mesh, devices, topology,
                               "train step", run=run)
  report = _report(
      compiled, seconds, run, mesh, devices, topology, step="train", offload="none",
      attention_impl=_attention_impl(run, mesh),
      batch={"global": run.batch.batch_size, "micro": run.batch.micro_batch_size,
             "accumulation": accumulation, "seq_len": run.batch.seq_len},
      flops_per_step=flops.flops_per_token(run.model, run.batch.seq_len)
      * run.batch.batch_size * run.batch.seq_len)
  return report, compiled


def compile_decode_step(run, devices, topology="", rows=1, offload="none", cache_rows=None):
  """Lower and compile one decoding step of `run`'s model (generate.Decoder's step:
  `rows` rows, a KV cache of `cache_rows` (default `rows`) rows of ModelConfig.max_len
  slots, as a server's step of a smaller bucket) for `devices`, the parameters in
  pinned host memory for offload="host"; returns (Report, compiled)."""
  import jax
  import jax.numpy as jnp
  import optax

  from bigsci_jax import flops, generate, kv_cache, sharding
  from bigsci_jax import step as steps
  from bigsci_jax.model import Transformer

  run, mesh = _mesh(run, devices)
  model = Transformer(run.model, offload=offload)
  abstract, shardings = steps.abstract_state(Transformer(run.model), optax.identity(), mesh, 1)
  params = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        abstract.params, sharding.offloaded(shardings.params, offload))
  cache = kv_cache.abstract(model, cache_rows or rows, mesh)
  row = sharding.logical_to_sharding(("batch",), (rows,), mesh)
  ints = jax.ShapeDtypeStruct((rows,), jnp.int32, sharding=row)
  column = jax.ShapeDtypeStruct((rows, 1), jnp.int32,
                                sharding=sharding.logical_to_sharding(("batch", None), (rows, 1), mesh))
  keys = jax.ShapeDtypeStruct((rows,), jax.eval_shape(generate.row_keys, [0] * rows).dtype,
                              sharding=row)
  floats = jax.ShapeDtypeStruct((rows,), jnp.float32, sharding=row)
  decoder = generate.Decoder(model, mesh)
  compiled, seconds = _compile(
      lambda: decoder._extend.lower(0, None, params, cache, column, column, ints, keys, ints,
                                   (floats, ints, floats)),
      mesh, devices, topology, "decoding step", offload)
  report = _report(
      compiled, seconds, run, mesh, devices, topology, step="decode", offload=offload,
      attention_impl="cached (XLA)",
      batch={"rows": rows, "cache_rows": cache_rows or rows, "cache_len": run.model.max_len},
      flops_per_step=flops.flops_per_token(run.model, run.model.max_len) / 3 * rows)
  return report, compiled


def describe(report: Report):
  """The human-readable lines printed before the JSON."""
  gib = lambda b: f"{b / 2**30:.2f} GiB"  # noqa: E731
  m, b = report.memory, report.batch
  mesh = " x ".join(f"{k} {v}" for k, v in report.mesh.items())
  hbm = gib(report.hbm_bytes) if report.hbm_bytes else "unknown"
  if report.step == "train":
    split = ", sequence parallel" if report.sequence_parallel and report.mesh["tensor"] > 1 else ""
    split += f", logits {report.logits_chunk} columns at a time" if report.logits_chunk else ""
    work = (f"remat {report.remat}{split}; batch {b['global']} x {b['seq_len']} tokens "
            f"({b['accumulation']} micro-batches of {b['micro']})")
  else:
    work = (f"one decoding step of {b['rows']} rows against a KV cache of {b['cache_rows']} "
            f"rows of {b['cache_len']} slots, "
            f"parameters {'in pinned host memory' if report.offload == 'host' else 'on device'}")
  host = (f"; in host memory: arguments {gib(m['host_argument'])}, temporaries "
          f"{gib(m['host_temp'])}" if m["host_argument"] or m["host_temp"] else "")
  return [
      f"{report.topology}{f' x {report.slices} slices' if report.slices > 1 else ''}: "
      f"{report.devices} {report.device_kind} devices ({report.chips} chips), mesh {mesh}",
      f"model: {report.params:,} parameters, attention {report.attention_impl}, {work}; "
      f"{report.flops_per_step:.3e} FLOPs per step",
      f"per device: arguments {gib(m['argument'])}, outputs {gib(m['output'])} "
      f"({gib(m['alias'])} aliased), temporaries {gib(m['temp'])}, total {gib(m['total'])} "
      f"of {hbm} HBM: {'fits' if report.fits else 'DOES NOT FIT'}{host}",
      f"compiled in {report.compile_s:.1f} s",
  ]


def parse_flags(argv):
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--gin_file", action="append", default=[])
  parser.add_argument("--topology", required=True)
  parser.add_argument("--mesh", default=None)
  parser.add_argument("--slices", type=int, default=None,
                      help="that many slices of --topology (multislice; default MeshConfig.slices)")
  parser.add_argument("--step", default="train", choices=("train", "decode"))
  parser.add_argument("--decode_rows", type=int, default=1, help="rows of a decoding step")
  parser.add_argument("--cache_rows", type=int, default=None,
                      help="rows of its KV cache: a server's --max_batch, stepping a smaller "
                           "bucket (default --decode_rows)")
  parser.add_argument("--offload", default="none", choices=OFFLOAD,
                      help="decode: parameters in pinned host memory, one layer on the device")
  parser.add_argument("--verbose", action="store_true", help="tracebacks for errors")
  bindings, rest = _gin_edge().split_gin_bindings(argv)
  flags = parser.parse_args(rest)
  flags.gin_bindings = bindings
  return flags


def _gin_edge():
  """train.py, the one module that reads gin files (next to this package in a checkout)."""
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  if root not in sys.path:
    sys.path.insert(0, root)
  import train
  return train


def main(argv):
  flags = parse_flags(argv)
  platform, _, count = flags.topology.partition(":")
  if platform == "cpu" and count.isdigit() and "jax" not in sys.modules:
    count = int(count) * (flags.slices or 1)
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + f" --xla_force_host_platform_device_count={count}").strip()
  # Nothing runs: the host's default backend is the CPU (topology_devices lets several
  # compile checks load libtpu side by side).
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  from bigsci_jax.config import ConfigError
  try:
    train = _gin_edge()
    run, _ = train.build_config(flags.gin_file or [train.DEFAULT_GIN], flags.gin_bindings)
    sizes = parse_mesh(flags.mesh) if flags.mesh else {}
    if flags.slices is not None:
      sizes["slices"] = flags.slices
    run = dataclasses.replace(run, mesh=dataclasses.replace(run.mesh, **sizes))
    devices = topology_devices(flags.topology, run.mesh.slices)
    if flags.step == "decode":
      if flags.decode_rows < 1:
        raise AotError(f"--decode_rows={flags.decode_rows}: a decoding step has at least 1 row.")
      if flags.cache_rows is not None and flags.cache_rows < flags.decode_rows:
        raise AotError(f"--cache_rows={flags.cache_rows}: the cache holds at least the step's "
                       f"--decode_rows={flags.decode_rows}.")
      report, _ = compile_decode_step(run, devices, flags.topology, flags.decode_rows,
                                      flags.offload, flags.cache_rows)
    else:
      if flags.offload != "none":
        raise AotError("--offload=host is for --step=decode: training keeps its parameters "
                       "and optimizer state on the devices.")
      report, _ = compile_train_step(run, devices, flags.topology)
  except (AotError, ConfigError, FileNotFoundError) as e:
    if flags.verbose:
      raise
    print(f"error: {str(e).splitlines()[0]}", file=sys.stderr)
    return 1
  print("\n".join(describe(report)))
  print(json.dumps(report.to_dict()))
  if not report.fits:  # the compiler checks temporaries alone; arguments need room too
    gib = lambda b: f"{b / 2**30:.2f}G"  # noqa: E731
    what = "train step" if report.step == "train" else "decoding step"
    print("error: " + too_big(report.topology, report.device_kind, report.mesh,
                              gib(report.bytes_per_chip), gib(report.hbm_bytes), what,
                              report.offload, run),
          file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
