"""The device mesh and the one table that maps logical axis names to it.

Mesh axes: `data` (pure data parallel), `fsdp` (data parallel with parameters,
gradients and optimizer state sharded, ZeRO-3 style) and `tensor` (Megatron-style
tensor parallelism over heads, MLP hidden units and the vocabulary).
"""

import contextlib
import functools
import os

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import mesh_utils, multihost_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from bigsci_jax.config import OFFLOAD, ConfigError, MeshConfig

MESH_AXES = ("data", "fsdp", "tensor")

# Logical axis -> mesh axes. Names not listed (kv, layers, position, length,
# act_embed) are replicated. A dimension that a mesh axis does not divide is
# replicated too (`_spec`).
RULES = (
    ("batch", ("data", "fsdp")),  # activations and input batches
    ("embed", "fsdp"),            # parameters: sharded over fsdp, gathered per layer
    ("vocab", "tensor"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("act_length", "tensor"),    # the residual stream's length, ModelConfig.sequence_parallel
)


def mesh_shape(cfg: MeshConfig, num_devices: int) -> tuple:
  """Resolve -1 and check the mesh against the devices present."""
  sizes = [cfg.data, cfg.fsdp, cfg.tensor]
  known = int(np.prod([s for s in sizes if s != -1]))
  if -1 in sizes:
    if num_devices % known:
      raise ConfigError(f"MeshConfig {dict(zip(MESH_AXES, sizes))}: the fixed axes ({known} devices) "
                        f"do not divide the {num_devices} devices present.")
    sizes[sizes.index(-1)] = num_devices // known
  if sizes[0] % cfg.slices:
    raise ConfigError(f"MeshConfig {dict(zip(MESH_AXES, sizes))}: the data axis spans the "
                      f"{cfg.slices} slices (MeshConfig.slices), so data={sizes[0]} must be a "
                      f"multiple of {cfg.slices}.")
  total = int(np.prod(sizes))
  if total > num_devices:
    raise ConfigError(f"MeshConfig {dict(zip(MESH_AXES, sizes))} needs {total} devices but only "
                      f"{num_devices} are present; make data*fsdp*tensor at most {num_devices}.")
  return tuple(sizes)


def make_mesh(cfg: MeshConfig, devices=None) -> Mesh:
  devices = jax.devices() if devices is None else list(devices)
  shape = mesh_shape(cfg, len(devices))
  return Mesh(device_grid(shape, devices, cfg.slices), MESH_AXES,
              axis_types=(AxisType.Auto,) * len(MESH_AXES))


def _slice_grid(shape, devices):
  """One slice's devices as a grid: in the physical-topology order mesh_utils picks for
  a whole TPU slice, else in order."""
  n = int(np.prod(shape))
  if n == len(devices):
    try:
      return mesh_utils.create_device_mesh(shape, devices)
    except (NotImplementedError, ValueError, AssertionError):
      pass
  return np.asarray(devices[:n]).reshape(shape)


def _slices(devices, count):
  """The devices split into `count` slices: by their slice_index where they span several
  (TPU multislice), else by process when there are that many (one per host), else in
  order (jax.devices() lists each process's devices together; fake devices of one
  process stand in for slices)."""
  def by(key, values):
    return [[d for d in devices if getattr(d, key) == v] for v in values]
  slice_ids = sorted({getattr(d, "slice_index", 0) for d in devices})
  if len(slice_ids) > 1:
    if len(slice_ids) != count:
      raise ConfigError(f"MeshConfig.slices={count}, but the devices form {len(slice_ids)} "
                        f"slices; set MeshConfig.slices={len(slice_ids)}.")
    return by("slice_index", slice_ids)
  processes = sorted({d.process_index for d in devices})
  if count > 1 and len(processes) == count:
    return by("process_index", processes)
  size = len(devices) // count
  return [devices[i * size:(i + 1) * size] for i in range(count)]


def device_grid(shape, devices, slices=1):
  """The devices laid out as a (data, fsdp, tensor) grid. With several slices, slice i
  fills data rows [i * data / slices, (i + 1) * data / slices): every fsdp and tensor
  group lies within one slice and only data-parallel traffic crosses between them."""
  groups = _slices(devices, slices)
  if len({len(g) for g in groups}) != 1:
    raise ConfigError(f"MeshConfig.slices={slices}: the slices hold "
                      f"{sorted(len(g) for g in groups)} devices; they must be equal.")
  per_slice = (shape[0] // slices,) + tuple(shape[1:])
  if int(np.prod(per_slice)) > len(groups[0]):
    raise ConfigError(f"MeshConfig {dict(zip(MESH_AXES, shape))} over {slices} slices needs "
                      f"{int(np.prod(per_slice))} devices per slice but a slice has "
                      f"{len(groups[0])}; make data / slices * fsdp * tensor at most "
                      f"{len(groups[0])}.")
  return np.concatenate([_slice_grid(per_slice, g) for g in groups], axis=0)


def _mesh_axes(name):
  for logical, mesh_axes in RULES:
    if logical == name:
      return mesh_axes
  return None


def _spec(logical_spec, shape, mesh) -> P:
  """The PartitionSpec of an array of `shape` with these logical axis names over `mesh`
  (a Mesh or the abstract mesh of a trace); a dimension its mesh axes do not divide
  stays replicated."""
  spec = []
  for dim, name in zip(shape, tuple(logical_spec) + (None,) * (len(shape) - len(logical_spec))):
    axes = _mesh_axes(name) if name is not None else None
    if axes is not None:
      size = int(np.prod([mesh.shape[a] for a in ((axes,) if isinstance(axes, str) else axes)]))
      if dim % size:
        axes = None
    spec.append(axes)
  return P(*spec)


def logical_to_sharding(logical_spec, shape, mesh: Mesh) -> NamedSharding:
  """One array's NamedSharding; an axis the mesh does not divide stays replicated."""
  return NamedSharding(mesh, _spec(logical_spec, shape, mesh))


def tree_shardings(logical_specs, abstract_tree, mesh: Mesh):
  """Shardings for a pytree, from its logical PartitionSpecs and abstract arrays."""
  return jax.tree.map(lambda spec, x: logical_to_sharding(spec, x.shape, mesh),
                      logical_specs, abstract_tree,
                      is_leaf=lambda x: isinstance(x, P))


# What offload="host" keeps in host memory: the layers' weight matrices, nearly all of a
# large model's bytes. Embeddings, norms and biases stay on the devices: every step reads
# them whole, and XLA:TPU (libtpu 0.0.42.1) fails to compile the scan's slicing of small
# bf16 host arrays such as a layer's [heads, head_dim] bias (a layout RET_CHECK).
OFFLOADED_LEAVES = ("kernel",)


def offloaded(shardings, offload):
  """Parameter shardings for model.Transformer(cfg, offload=offload): unchanged for
  "none"; for "host", the same layout in pinned host memory for the layers' weight
  matrices (OFFLOADED_LEAVES)."""
  if offload not in OFFLOAD:
    raise ConfigError(f"offload={offload!r}: it is one of {', '.join(OFFLOAD)}.")
  if offload == "none":
    return shardings

  def place(path, s):
    name = getattr(path[-1], "key", None)
    return s.with_memory_kind("pinned_host") if name in OFFLOADED_LEAVES else s
  return jax.tree_util.tree_map_with_path(place, shardings)


def batch_sharding(mesh: Mesh, ndim: int, batch_axis: int = 0) -> NamedSharding:
  spec = [None] * ndim
  spec[batch_axis] = _mesh_axes("batch")
  return NamedSharding(mesh, P(*spec))


def batch_shards(mesh=None):
  """How many shards the logical batch axis has over `mesh` (default: the active mesh;
  1 outside `activate`)."""
  mesh = jax.sharding.get_abstract_mesh() if mesh is None else mesh
  if mesh.empty:
    return 1
  return int(np.prod([mesh.shape[a] for a in _mesh_axes("batch") if a in mesh.shape]))


def constrain(x, logical_axes):
  """Sharding constraint by logical names; a no-op outside `activate`. A dimension its
  mesh axes do not divide stays replicated, as in logical_to_sharding (a decoding
  step's one position is not split over tensor by a sequence-parallel model)."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or not nn.get_logical_axis_rules():
    return x
  return jax.lax.with_sharding_constraint(x, _spec(logical_axes, x.shape, mesh))


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def reshard(x, logical_axes, cotangent_axes):
  """constrain(x, logical_axes), its cotangent constrained to cotangent_axes. A plain
  constraint's transpose puts the gradient in the same layout, so a layout change
  made for the forward pass (a sequence gathered for the tensor-parallel matmuls) is
  undone by an all-reduce of the whole gradient and a slice, not a reduce-scatter."""
  return constrain(x, logical_axes)


def _reshard_fwd(x, logical_axes, cotangent_axes):
  return constrain(x, logical_axes), None


def _reshard_bwd(logical_axes, cotangent_axes, _, g):
  return (constrain(g, cotangent_axes),)


reshard.defvjp(_reshard_fwd, _reshard_bwd)


@contextlib.contextmanager
def activate(mesh: Mesh):
  """Trace model code under this mesh and the logical rules."""
  with jax.set_mesh(mesh), nn.logical_axis_rules(RULES):
    yield


def call_with_rows(mesh, fn, *args, rows):
  """fn(*args, rows) as is without a mesh; with one, traced under its logical rules with
  the [N, L] feature rows placed over its batch axes."""
  if mesh is None:
    return fn(*args, rows)
  with activate(mesh):
    return fn(*args, jax.device_put(rows, batch_sharding(mesh, 2)))


def to_host(tree):
  """The arrays of `tree` as numpy on this process, whole: an array that spans other
  processes' devices (rows placed over the batch axes of a multi-process mesh) is
  gathered from all of them, so every process must call this with the same tree."""
  def fetch(x):
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(jax.device_get(x))
  return jax.tree.map(fetch, tree)


def maybe_initialize_distributed(coordinator_address=None, num_processes=None, process_id=None,
                                 multihost=False):
  """Join a multi-process run; returns True when jax.distributed was initialised.

  Explicit flags win; `multihost` (a TPU pod, where jax finds its peers itself),
  a SLURM job of several tasks, or JAX_COORDINATOR_ADDRESS in the environment let
  `jax.distributed.initialize()` detect the rest. On CPU, processes use gloo.
  """
  explicit = coordinator_address is not None
  detected = (multihost or int(os.environ.get("SLURM_NTASKS", "1")) > 1
              or "JAX_COORDINATOR_ADDRESS" in os.environ)
  if not (explicit or detected):
    return False
  if explicit and (num_processes is None or process_id is None):
    raise ConfigError("--coordinator_address needs --num_processes and --process_id as well.")
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  if explicit:
    jax.distributed.initialize(coordinator_address, num_processes, process_id)
  else:
    jax.distributed.initialize()
  return True
