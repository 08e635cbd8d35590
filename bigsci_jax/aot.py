"""Ahead-of-time scale check: compile the train step for a device slice without one.

  python -m bigsci_jax.aot [--gin_file=F ...] --topology=v5p:8x8x4 [--mesh=DATAxFSDPxTENSOR]
                           [--gin.NAME=VALUE ...] [--verbose]

`--topology` names a TPU slice (`v5e:4x4`, `v5p:8x8x4`, `v4:4x4x8`, `v6e:16x16`: the
real TPU compiler from libtpu, the [tpu] extra, compiles for it on this machine) or
`cpu:N` (N fake CPU devices: a mesh check without libtpu). Nothing is allocated:
the state and batch are abstract (shapes, dtypes, shardings) and nothing runs.
Prints per-chip memory (arguments, outputs, temporaries, total), the chip's HBM
and whether it fits, parameters, FLOPs per step (bigsci_jax.flops; the compiler's
cost analysis counts a scanned layer once) and compile time; the last stdout line
is a JSON object. A config over the chip's memory exits 1 with one sentence.
"""

import argparse
import dataclasses
import json
import os
import re
import sys
import time

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


def topology_devices(topology):
  """The devices of a named slice: 'cpu:N' (this process's first N CPU devices) or a
  TPU topology name for libtpu ('v5e:2x2', 'v5p:8x8x4', ...)."""
  import jax
  platform, _, shape = topology.partition(":")
  if platform == "cpu":
    if not shape.isdigit() or int(shape) < 1:
      raise AotError(f"--topology={topology!r}: write cpu:N with N a positive number of devices.")
    devices = jax.devices("cpu")
    if int(shape) > len(devices):
      raise AotError(f"--topology={topology!r} needs {shape} CPU devices but this process has "
                     f"{len(devices)}; set XLA_FLAGS=--xla_force_host_platform_device_count="
                     f"{shape} before jax starts (python -m bigsci_jax.aot does).")
    return devices[:int(shape)]
  try:
    from jax.experimental import topologies
    return list(topologies.get_topology_desc(platform="tpu", topology_name=topology).devices)
  except (ImportError, RuntimeError, ValueError) as e:
    raise AotError(f"--topology={topology!r} is not a TPU slice the TPU compiler knows "
                   f"({str(e).splitlines()[0][:120]}); name one like v5e:2x2, v5p:8x8x4 or v4:4x4x8, "
                   f"and install the [tpu] extra (libtpu).") from e


def parse_mesh(text):
  """'DATAxFSDPxTENSOR' (e.g. '1x32x8', -1 allowed once) -> MeshConfig."""
  from bigsci_jax.config import MeshConfig
  parts = text.lower().split("x")
  if len(parts) != 3 or not all(re.fullmatch(r"-?\d+", p) for p in parts):
    raise AotError(f"--mesh={text!r}: write DATAxFSDPxTENSOR, e.g. 1x32x8.")
  return MeshConfig(*(int(p) for p in parts))


@dataclasses.dataclass(frozen=True)
class Report:
  """One compile: where, what, and the compiler's per-device memory."""
  topology: str
  device_kind: str
  devices: int
  chips: int
  mesh: dict
  params: int
  attention_impl: str
  remat: str
  batch: dict
  flops_per_step: float
  memory: dict            # per device: argument, output, alias, temp, code, total bytes
  bytes_per_chip: int     # memory["total"]
  hbm_bytes: int | None
  fits: bool
  compile_s: float

  def to_dict(self):
    return dataclasses.asdict(self)


def _device_grid(devices, shape):
  """Devices laid out for the mesh: the physical-topology order mesh_utils picks for a
  whole slice, else in order."""
  import numpy as np
  from jax.experimental import mesh_utils
  if int(np.prod(shape)) == len(devices):
    try:
      return mesh_utils.create_device_mesh(shape, devices)
    except (NotImplementedError, ValueError, AssertionError):
      pass
  return np.asarray(devices[:int(np.prod(shape))]).reshape(shape)


def too_big(topology, device_kind, mesh, needed, available):
  """One sentence: what does not fit where, and how to fix it."""
  amount = (f"needs {needed} per device but the {device_kind} device has {available}" if needed
            else f"does not fit the {device_kind} device's memory")
  return (f"the train step on {topology} with mesh data={mesh['data']} fsdp={mesh['fsdp']} "
          f"tensor={mesh['tensor']} {amount}: use a bigger slice, another mesh (more fsdp or "
          f"tensor), a smaller BatchConfig.micro_batch_size, or ModelConfig.remat='full'.")


def _exhausted(message):
  """(needed, available) from the compiler's out-of-memory message, or (None, None)."""
  size = r"([\d.]+\s*[KMGT]i?B?)"
  amounts = (re.search(rf"required[^(]*\({size}\)[^(]*available[^(]*\({size}\)", message)
             or re.search(rf"[Uu]sed {size} of {size}", message))
  return amounts.groups() if amounts else (None, None)


def compile_train_step(run, devices, topology=""):
  """Lower and compile `run`'s train step for `devices` (abstract state and batch);
  returns (Report, compiled). Raises AotError when it does not fit."""
  import jax
  import jax.numpy as jnp
  from jax.sharding import AxisType, Mesh

  from bigsci_jax import data, flops, sharding
  from bigsci_jax import step as steps
  from bigsci_jax.kernels import auto_impl
  from bigsci_jax.loop import check_batch_fits_mesh
  from bigsci_jax.model import Transformer
  from bigsci_jax.optim import make_optimizer

  shape = sharding.mesh_shape(run.mesh, len(devices))
  run = dataclasses.replace(run, mesh=dataclasses.replace(run.mesh, data=shape[0],
                                                          fsdp=shape[1], tensor=shape[2]))
  mesh = Mesh(_device_grid(devices, shape), sharding.MESH_AXES,
              axis_types=(AxisType.Auto,) * len(sharding.MESH_AXES))
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
  start = time.perf_counter()
  try:
    with sharding.activate(mesh):
      impl = (auto_impl() if run.model.attention_impl == "auto" else run.model.attention_impl)
      compiled = train_step.jitted.lower(abstract, batch).compile()
  except Exception as e:  # the compiler's errors are XlaRuntimeError / JaxRuntimeError
    if "RESOURCE_EXHAUSTED" not in str(e):
      raise
    mesh_sizes = dict(zip(sharding.MESH_AXES, shape))
    raise AotError(too_big(topology or devices[0].platform, devices[0].device_kind, mesh_sizes,
                           *_exhausted(str(e)))) from e
  compile_s = time.perf_counter() - start
  m = compiled.memory_analysis()
  memory = {"argument": m.argument_size_in_bytes, "output": m.output_size_in_bytes,
            "alias": m.alias_size_in_bytes, "temp": m.temp_size_in_bytes,
            "code": m.generated_code_size_in_bytes}
  memory["total"] = (memory["argument"] + memory["output"] - memory["alias"] + memory["temp"]
                     + memory["code"])
  kind = devices[0].device_kind
  hbm = hbm_bytes(kind)
  cores = len({getattr(d, "core_on_chip", 0) for d in devices})
  report = Report(
      topology=topology or f"{devices[0].platform}:{len(devices)}", device_kind=kind,
      devices=len(devices), chips=len(devices) // cores,
      mesh=dict(zip(sharding.MESH_AXES, (int(s) for s in shape))),
      params=flops.param_counts(run.model).total, attention_impl=impl, remat=run.model.remat,
      batch={"global": run.batch.batch_size, "micro": run.batch.micro_batch_size,
             "accumulation": accumulation, "seq_len": run.batch.seq_len},
      flops_per_step=flops.flops_per_token(run.model, run.batch.seq_len)
      * run.batch.batch_size * run.batch.seq_len,
      memory=memory, bytes_per_chip=memory["total"], hbm_bytes=hbm,
      fits=hbm is None or memory["total"] <= hbm, compile_s=round(compile_s, 1))
  return report, compiled


def describe(report: Report):
  """The human-readable lines printed before the JSON."""
  gib = lambda b: f"{b / 2**30:.2f} GiB"  # noqa: E731
  m = report.memory
  mesh = " x ".join(f"{k} {v}" for k, v in report.mesh.items())
  hbm = gib(report.hbm_bytes) if report.hbm_bytes else "unknown"
  return [
      f"{report.topology}: {report.devices} {report.device_kind} devices ({report.chips} chips), "
      f"mesh {mesh}",
      f"model: {report.params:,} parameters, attention {report.attention_impl}, "
      f"remat {report.remat}; batch {report.batch['global']} x {report.batch['seq_len']} tokens "
      f"({report.batch['accumulation']} micro-batches of {report.batch['micro']}); "
      f"{report.flops_per_step:.3e} FLOPs per step",
      f"per device: arguments {gib(m['argument'])}, outputs {gib(m['output'])} "
      f"({gib(m['alias'])} aliased), temporaries {gib(m['temp'])}, total {gib(m['total'])} "
      f"of {hbm} HBM: {'fits' if report.fits else 'DOES NOT FIT'}",
      f"compiled in {report.compile_s:.1f} s",
  ]


def parse_flags(argv):
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--gin_file", action="append", default=[])
  parser.add_argument("--topology", required=True)
  parser.add_argument("--mesh", default=None)
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
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + f" --xla_force_host_platform_device_count={count}").strip()
  # Nothing runs: the host's default backend is the CPU, and several compile checks
  # may load libtpu side by side.
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  from bigsci_jax.config import ConfigError
  try:
    train = _gin_edge()
    run, _ = train.build_config(flags.gin_file or [train.DEFAULT_GIN], flags.gin_bindings)
    if flags.mesh:
      run = dataclasses.replace(run, mesh=parse_mesh(flags.mesh))
    devices = topology_devices(flags.topology)
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
    print("error: " + too_big(report.topology, report.device_kind, report.mesh,
                              gib(report.bytes_per_chip), gib(report.hbm_bytes)), file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
