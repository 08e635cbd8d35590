"""The decoding cache: each attention layer's keys, values, positions, prefix flags
and fill index per row (model.Attention's "cache" collection), how its arrays lie over
a mesh, and the whole-row operations between decoding calls.

A cache is a pytree of arrays whose leaves are named by their last path key: keys /
values [rows, G, S, K], positions / prefix [rows, S], index [rows] (S slots per row;
layers scanned with nn.scan put one more axis in front). A layer reads and writes its
rows through an Entry; a server's batch puts prefilled rows into its cache (put_rows,
put_rows_locally), packs them (move_rows) and runs a step on a bucket of rows
(step_rows).
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from bigsci_jax import sharding


# The axes of a row in each cache array of model.Attention (keys / values [G, S, K],
# positions / prefix [S], index a number) and where its slots are among them; layers
# scanned with nn.scan put one more axis in front of the rows.
_ROW_AXES = {"keys": 3, "values": 3, "positions": 1, "prefix": 1, "index": 0}
_SLOT_IN_ROW = {"keys": 1, "values": 1, "positions": 0, "prefix": 0}


def _row_axis(path, x):
  return x.ndim - 1 - _ROW_AXES[path[-1].key]


def _slot_axis(path, x):
  return _row_axis(path, x) + 1 + _SLOT_IN_ROW[path[-1].key]


def axes(path, x):
  """The logical axes of one decoding cache array (model.Attention._cached): its rows
  over the batch axes, keys' and values' heads over tensor, the rest (a scanned
  stack's layers, the slots) whole."""
  names = [None] * x.ndim
  row = _row_axis(path, x)
  names[row] = "batch"
  if path[-1].key in ("keys", "values"):
    names[row + 1] = "kv_heads"
  return tuple(names)


def shardings(cache, mesh):
  """The NamedSharding of each array of `cache` (arrays or their shapes) over `mesh`,
  in the layout of axes()."""
  return jax.tree_util.tree_map_with_path(
      lambda path, x: sharding.logical_to_sharding(axes(path, x), x.shape, mesh), cache)


def empty(model, batch_size, length=None):
  """The decoding cache for batch_size rows of `length` slots (default model.cfg.max_len;
  the cache's arrays, not the model, fix how many slots there are)."""
  cfg = model.cfg if length is None else dataclasses.replace(model.cfg, max_len=length)
  tokens = jnp.zeros((batch_size, 1), jnp.int32)
  shapes = jax.eval_shape(lambda: type(model)(cfg).init(jax.random.key(0), tokens,
                                                        decode=True)["cache"])
  return pinned(jax.tree_util.tree_map_with_path(
      _reset, jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)))


def abstract(model, rows, mesh, length=None):
  """empty()'s shapes, each with its sharding over `mesh`: what compiling a function of
  a cache ahead of time takes."""
  shapes = jax.eval_shape(lambda: empty(model, rows, length))
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      shapes, shardings(shapes, mesh))


def pinned(cache):
  """`cache` in the layout of axes() over the active mesh (as is without one). Every
  jitted function that returns a cache pins it, so whichever ran last (a step, a
  prefill, putting or moving rows), the next call finds the layout it was compiled
  for: a server warmed up compiles nothing more."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return cache
  return jax.tree.map(jax.lax.with_sharding_constraint, cache, shardings(cache, mesh))


def _reset(path, x):
  return jnp.full_like(x, _fill(path))


def _fill(path):
  return -1 if path[-1].key == "positions" else 0


def row_slots(cache):
  """How many slots each row of `cache` has."""
  path, x = next((p, x) for p, x in jax.tree_util.tree_leaves_with_path(cache)
                 if p[-1].key == "positions")
  return x.shape[_slot_axis(path, x)]


def row_count(cache):
  """How many rows `cache` has."""
  return next(x for p, x in jax.tree_util.tree_leaves_with_path(cache)
              if p[-1].key == "index").shape[-1]


def step_rows(size, count, blocks=1):
  """The rows of a cache of `size` rows that a step of `count` rows runs on, in its row
  order, when the batch axis has `blocks` shards (Entry): the first count / blocks rows
  of each of the blocks."""
  per, block = count // blocks, size // blocks
  return [d * block + j for d in range(blocks) for j in range(per)]


def in_own_blocks(rows_N, total, shards):
  """Whether each call row i's cache row rows_N[i] (of `total`; out of range: none) is in
  block i // (N / shards) of the cache's rows: over a batch axis of `shards` shards,
  each shard's call rows are then its own cache rows (Entry)."""
  n = len(rows_N)
  if shards < 2 or total % shards or n % shards:
    return False
  inside = rows_N < total
  own = rows_N // (total // shards) == np.arange(n) // (n // shards)
  return bool(own[inside].all())


class Entry:
  """One cache variable as one layer sees it: the variable, or with `layer` row `layer`
  of the layers' stacked array, which the layer scan carries from layer to layer so
  that a step updates it in place (scanned as an input and an output instead, the cache
  was copied whole every step). A row's slots are axis `slot_axis` of the layer's array
  (keys and values [B, G, S, K], heads first; positions and prefix [B, S]; index [B]).

  A call of b rows on a cache of more (a server's cache holds its most rows, and a step
  runs only the bucket of them in use) reads and writes only its step rows (step_rows):
  the B rows form `blocks` equal blocks, one per shard of the batch axis, and call row i
  is row i % (b / blocks) of block i // (b / blocks). Or, given `chosen` [b], the cache
  rows it names (a server's prompts prefilled chunk by chunk), call row i's again in
  block i // (b / blocks). Reads and writes name the
  block and the heads as batch dimensions of one gather or scatter, so the partitioner
  keeps each device on its own rows and heads: with global row and head indices
  jaxlib's XLA (CPU, GPU) all-gathered every write's update over the batch and tensor
  axes (libtpu's partitioner did not)."""

  def __init__(self, variable, layer, slot_axis, rows, blocks, chosen=None):
    self.variable, self.layer, self.slot_axis = variable, layer, slot_axis
    self.rows, self.blocks, self.chosen = rows, blocks, chosen
    self.lead, self.split = 0 if layer is None else 1, blocks > 1  # the array's row axis

  def _blocked(self):
    """The variable's array, its rows as [blocks, B / blocks] when split."""
    value, lead = self.variable.value, self.lead
    if not self.split:
      return value
    total = value.shape[lead]
    return value.reshape(value.shape[:lead] + (self.blocks, total // self.blocks)
                         + value.shape[lead + 1:])

  def _row_ids(self):
    """The call's rows within their blocks, [blocks, b / blocks] (split) or [b]."""
    per = self.rows // self.blocks
    if self.chosen is None:
      ids = jnp.arange(per, dtype=jnp.int32)
      return jnp.broadcast_to(ids, (self.blocks, per)) if self.split else ids
    if not self.split:
      return self.chosen
    block_rows = self.variable.value.shape[self.lead] // self.blocks
    starts = block_rows * jnp.arange(self.blocks, dtype=self.chosen.dtype)
    return self.chosen.reshape(self.blocks, per) - starts[:, None]

  def _unblocked(self, x):
    return x.reshape((self.rows,) + x.shape[2:]) if self.split else x

  def read(self, slots=None):
    """The layer's array of the call's rows, only the first `slots` slots of each row
    (None: all)."""
    value, lead, split = self._blocked(), self.lead, self.split
    row_axis = lead + split
    if self.chosen is not None:  # a gather of the chosen rows
      return self._unblocked(_gather_rows(value, self._row_ids(), slots, self.layer, split,
                                          self.slot_axis))
    sizes = list(value.shape)  # the first rows of each block: one slice
    sizes[row_axis] = self.rows // self.blocks
    if slots is not None:
      sizes[row_axis + self.slot_axis] = slots
    start = [0] * value.ndim
    if self.layer is not None:
      start[0], sizes[0] = self.layer, 1
    part = jax.lax.dynamic_slice(value, start, sizes)
    return self._unblocked(part if self.layer is None else part[0])

  def set(self, value_b):
    """The call's rows set to value_b (a row without slots: index)."""
    self._scatter(value_b)

  def write(self, update_BxT, at_B):
    """Call row b's slots at_B[b] .. at_B[b] + T - 1 set to update_BxT[b]."""
    self._scatter(update_BxT, at_B)

  def _scatter(self, new_b, at_B=None):
    value = self._blocked()
    if self.split:
      new_b = new_b.reshape((self.blocks, -1) + new_b.shape[1:])
      at_B = None if at_B is None else at_B.reshape(self.blocks, -1)
    heads = 0 if at_B is None else self.slot_axis - 1
    self.variable.value = _scatter_rows(value, new_b, self._row_ids(), at_B, self.layer,
                                        self.split, heads).reshape(self.variable.value.shape)


def _scatter_rows(cache, new, rows, at=None, layer=None, split=False, heads=0):
  """`cache` with rows[r]'s entries set to new[r], one scatter. cache: [layers] (with
  `layer`, the one written), [blocks] (split), rows, then a row's axes: `heads` axes,
  with `at` its slots, the rest. new: [blocks] (split), rows, the heads' axes, with
  `at` T slots from at[r] on (at: [blocks,] rows; slots past the row's end dropped),
  the rest. Blocks and heads are batch dimensions of the scatter (each block's rows
  and each head's slots are their own), rows and slots its indices. Written as a
  per-row dynamic update slice, one row's update became a plain one, for which XLA:TPU
  lays the cache out slots-major and copies it into and out of the layer scan every
  step."""
  lead = int(layer is not None)
  row_axis = lead + split
  index_shape = new.shape[:split + 1 + heads + (at is not None)]
  n = len(index_shape)

  def spread(x, axes):  # x's axes put at `axes` of the index shape
    shape = [1] * n
    for axis, size in zip(axes, x.shape):
      shape[axis] = size
    return jnp.broadcast_to(x.reshape(shape), index_shape)

  parts, operand_axes = [spread(rows, range(split + 1))], [row_axis]
  if at is not None:
    slots = at[..., None] + jnp.arange(index_shape[-1], dtype=at.dtype)
    parts.append(spread(slots, list(range(split + 1)) + [n - 1]))
    operand_axes.append(row_axis + 1 + heads)
  if layer is not None:
    parts.insert(0, jnp.broadcast_to(jnp.asarray(layer, parts[0].dtype), index_shape))
    operand_axes.insert(0, 0)
  indices = jnp.stack([p.astype(jnp.int32) for p in parts], axis=-1)
  # the batch dimensions, the block's and the heads', as axes of the indices and the cache
  index_batch = list(range(split)) + [split + 1 + h for h in range(heads)]
  cache_batch = [lead] * split + [row_axis + 1 + h for h in range(heads)]
  dims = jax.lax.ScatterDimensionNumbers(
      update_window_dims=tuple(range(n, new.ndim)), inserted_window_dims=tuple(operand_axes),
      scatter_dims_to_operand_dims=tuple(operand_axes), operand_batching_dims=tuple(cache_batch),
      scatter_indices_batching_dims=tuple(index_batch))
  return jax.lax.scatter(cache, indices, new.astype(cache.dtype), dims, unique_indices=True,
                         mode=jax.lax.GatherScatterMode.FILL_OR_DROP)


def _gather_rows(cache, rows, slots=None, layer=None, split=False, slot_axis=None):
  """rows[r] of `cache` (laid out as for _scatter_rows), only their first `slots` slots
  (None: all; the slots are axis slot_axis of a row): [blocks,] rows, a row's axes."""
  lead = int(layer is not None)
  row_axis = lead + split
  parts, operand_axes = [rows], [row_axis]
  if layer is not None:
    parts.insert(0, jnp.broadcast_to(jnp.asarray(layer, rows.dtype), rows.shape))
    operand_axes.insert(0, 0)
  sizes = [1 if axis in operand_axes or (split and axis == lead) else size
           for axis, size in enumerate(cache.shape)]
  if slots is not None:
    sizes[row_axis + slot_axis] = slots
  dims = jax.lax.GatherDimensionNumbers(
      offset_dims=tuple(range(rows.ndim, rows.ndim + cache.ndim - row_axis - 1)),
      collapsed_slice_dims=tuple(operand_axes), start_index_map=tuple(operand_axes),
      operand_batching_dims=(lead,) if split else (),
      start_indices_batching_dims=(0,) if split else ())
  indices = jnp.stack([p.astype(jnp.int32) for p in parts], axis=-1)
  return jax.lax.gather(cache, indices, dims, tuple(sizes), unique_indices=True,
                        mode=jax.lax.GatherScatterMode.PROMISE_IN_BOUNDS)


def check_blocks(chosen_B, cache, shards):
  """Stops, in one sentence, where chosen cache rows over a batch axis of `shards`
  shards are not in the blocks their call rows are (generate.Decoder.extend)."""
  total, b = row_count(cache), len(chosen_B)
  if (shards > 1 and total % shards == 0 and b % shards == 0
      and not in_own_blocks(chosen_B, total, shards)):
    raise ValueError(f"cache_rows {chosen_B.tolist()} over {shards} batch shards: row i of "
                     f"the {b} must be one of block i // {b // shards} of the cache's {total} "
                     f"rows ({total // shards} per block).")


def put_rows(cache, new, slots_N, shift_N):
  """`cache` with row slots_N[i] replaced by `new`'s row i moved shift_N[i] slots to the
  left (a left-padded prefill's padding goes to the end of the row, its tokens start at
  slot 0 and its index drops by the shift); rows with slots_N[i] out of range are not
  put anywhere. `new` may have fewer slots per row than `cache` (a prefill's cache of
  its prompt width): the rest of the row becomes empty (positions -1), and as nothing
  reads an empty slot's key or value, only the first slots of those are written."""
  return pinned(_put(cache, new, slots_N, shift_N))


def put_rows_locally(cache, new, slots_N, shift_N):
  """put_rows over a mesh whose batch axis is split in n shards, where row i of `new`
  goes to a slot of block i // (N / n) of the cache's rows or nowhere
  (generate.Decoder.put_rows checks): each shard puts its own rows of `new` into its own
  block (shard_map), so no row crosses devices (with global slots both jaxlib's XLA and
  libtpu all-gathered the new rows' keys, values and positions over the batch and
  tensor axes)."""
  mesh = jax.sharding.get_abstract_mesh()

  def specs(tree):
    return jax.tree.map(lambda s: s.spec, shardings(tree, mesh))
  row = sharding.logical_to_sharding(("batch",), slots_N.shape, mesh).spec
  block = row_count(cache) // sharding.batch_shards(mesh)

  def put(cache, new, slots_N, shift_N):  # this shard's rows, its slots within its block
    start = jax.lax.axis_index(row[0]) * block
    local = jnp.where((slots_N >= start) & (slots_N < start + block), slots_N - start, block)
    return _put(cache, new, local, shift_N)
  return pinned(jax.shard_map(put, mesh=mesh, in_specs=(specs(cache), specs(new), row, row),
                              out_specs=specs(cache))(cache, new, slots_N, shift_N))


def _put(cache, new, slots_N, shift_N):
  """put_rows' put, the layout left to the caller (both puts, and a shard's own)."""
  width = row_slots(new)

  def move(path, x):  # each row rolled left by its shift: a slice of the row twice over
    if path[-1].key == "index":
      return x - shift_N
    row, slot = _row_axis(path, x), _slot_axis(path, x)
    def roll(row_x, shift):
      return jax.lax.dynamic_slice_in_dim(row_x, shift, width, axis=slot - 1)
    return jax.vmap(roll, in_axes=(row, 0), out_axes=row)(
        jnp.concatenate([x, x], axis=slot), shift_N)

  def put(path, x, moved):
    index = (slice(None),) * _row_axis(path, x) + (slots_N,)
    if path[-1].key != "index":
      slots = x.shape[_slot_axis(path, x)]
      if path[-1].key in ("keys", "values"):
        slots = min(width, slots)
        index += (slice(None),) * (_slot_axis(path, x) - len(index)) + (slice(0, slots),)
      moved = _resized(path, moved, slots)
    return x.at[index].set(moved, mode="drop")
  return jax.tree_util.tree_map_with_path(put, cache, jax.tree_util.tree_map_with_path(move, new))


def _resized(path, x, slots):
  """Cache array x with `slots` slots per row: the first ones kept, invisible empty ones
  added at the end (an index is unchanged)."""
  if path[-1].key == "index":
    return x
  axis = _slot_axis(path, x)
  if slots <= x.shape[axis]:
    return jax.lax.slice_in_dim(x, 0, slots, axis=axis)
  pad = [(0, 0)] * x.ndim
  pad[axis] = (0, slots - x.shape[axis])
  return jnp.pad(x, pad, constant_values=_fill(path))


def resize_slots(cache, slots):
  """`cache` with `slots` slots per row (_resized)."""
  return jax.tree_util.tree_map_with_path(lambda path, x: _resized(path, x, slots), cache)


def move_rows(cache, from_N, to_N):
  """`cache` with row to_N[i] a copy of row from_N[i] (a server packing its rows into the
  first slots); pairs with to_N[i] out of range copy nothing."""
  def move(path, x):
    row = _row_axis(path, x)
    return x.at[(slice(None),) * row + (to_N,)].set(jnp.take(x, from_N, axis=row), mode="drop")
  return pinned(jax.tree_util.tree_map_with_path(move, cache))
