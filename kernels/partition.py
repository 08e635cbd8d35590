"""How a fused attention kernel meets a sharded program: the call's prologue that
both Pallas implementations share (settings, per-token codes, ALiBi slopes) and the
shard_map around it.

A `pallas_call` cannot be partitioned automatically, so under a mesh (jax.set_mesh)
the call wraps itself in shard_map: batch split over the mesh's data / fsdp axes
and heads over tensor (DESIGN.md's mesh), each only where it divides. Inside a
caller's shard_map (those axes manual) it runs on the local shards as they are.
"""

import jax
import jax.numpy as jnp
import numpy as np

from bigsci_jax.kernels import blocks

BATCH_AXES, HEAD_AXES = ("data", "fsdp"), ("tensor",)


def target():
  """(platform, device_kind) the current computation is for: the mesh's devices
  under jax.set_mesh (a TPU topology compiled from a CPU host included), else the
  default backend's."""
  device = jax.sharding.get_abstract_mesh().abstract_device or jax.devices()[0]
  return device.platform, device.device_kind


def call(name, custom_vjp_fn, q_BxTxHxK, k_BxSxGxK, v_BxSxGxK, *, segment_ids, prefix_mask,
         alibi_slopes, causal, sm_scale, block_q, block_k, interpret, **tuning):
  """custom_vjp_fn(settings, q, k, v, codes_BxT, slopes_H) on this program's shards."""
  b, t, h, d = q_BxTxHxK.shape
  if max(block_q, block_k) % min(block_q, block_k):
    raise ValueError(f"{name} attention: block sizes {block_q} and {block_k} must divide "
                     f"each other.")
  codes_BxT = blocks.token_codes(segment_ids, prefix_mask, b, t)
  slopes_H = (jnp.zeros((h,), jnp.float32) if alibi_slopes is None
              else local_slopes(jnp.asarray(alibi_slopes, jnp.float32), h, name))
  settings = blocks.Settings(scale=d ** -0.5 if sm_scale is None else sm_scale, causal=causal,
                             alibi=alibi_slopes is not None, block_q=block_q, block_k=block_k,
                             interpret=interpret, **tuning)

  def run(q, k, v, codes, slopes):
    return custom_vjp_fn(settings, q, k, v, codes, slopes)
  mesh = jax.sharding.get_abstract_mesh()
  rows = _dividing_axes(mesh, BATCH_AXES, b) or None
  heads = _dividing_axes(mesh, HEAD_AXES, k_BxSxGxK.shape[2]) or None
  # Also where neither divides (2 kv heads on tensor = 4, one row on data = 2): the call
  # then runs whole on every device, but a pallas_call must still sit in a shard_map.
  if _auto_axes(mesh):
    P = jax.sharding.PartitionSpec
    run = jax.shard_map(run, mesh=mesh, check_vma=False,
                        in_specs=(P(rows, None, heads),) * 3 + (P(rows), P(heads)),
                        out_specs=P(rows, None, heads))
  return run(q_BxTxHxK, k_BxSxGxK, v_BxSxGxK, codes_BxT, slopes_H)


def local_slopes(slopes, h, name="attention"):
  """This shard's heads' slopes: inside a caller's shard_map that split the heads over
  the tensor axis, the full [H] slopes are sliced at the shard's index."""
  if slopes.shape[0] == h:
    return slopes
  mesh = jax.sharding.get_abstract_mesh()
  split = [a for a in HEAD_AXES if not mesh.empty and a in mesh.manual_axes]
  shards = int(np.prod([mesh.shape[a] for a in split]))
  if slopes.shape[0] != h * shards:
    raise ValueError(f"{name} attention: {slopes.shape[0]} ALiBi slopes for {h} heads.")
  index = 0
  for a in split:
    index = index * mesh.shape[a] + jax.lax.axis_index(a)
  return jax.lax.dynamic_slice_in_dim(slopes, index * h, h)


def _auto_axes(mesh):
  """The mesh axes of more than one device that the partitioner still splits (not
  manual in a caller's shard_map)."""
  if mesh.empty:
    return ()
  return tuple(a for a in mesh.axis_names if a not in mesh.manual_axes and mesh.shape[a] > 1)


def _dividing_axes(mesh, names, size):
  """The mesh axes among `names` still to be split (not manual: a caller's shard_map
  already did) whose product divides `size`, kept in order while it does."""
  chosen, product, auto = [], 1, _auto_axes(mesh)
  for name in names:
    if name in auto:
      if size % (product * mesh.shape[name]) == 0:
        chosen.append(name)
        product *= mesh.shape[name]
  return tuple(chosen)
