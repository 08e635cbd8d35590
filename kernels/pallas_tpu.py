"""Fused attention for TPU in Pallas (Mosaic), forward and backward: online softmax
over key blocks, ALiBi computed from block indices, masks from per-token codes,
skipped tiles neither computed nor fetched.

Three kernels, each a grid whose innermost axis is "arbitrary" (it carries f32
accumulators in VMEM scratch):
- forward, grid (batch, head, query block, key block): output and the row
  log-sum-exp `lse` (f32) kept for the backward;
- dq, the same grid: recomputes each tile's probabilities from `lse`;
- dk / dv, grid (batch, kv head, key block, query head of the group, query
  block): accumulates over every query head sharing the key/value head.
Prefetched to SMEM before a grid runs: each tile's kind (blocks.SKIP / PARTIAL /
FULL) and the block to fetch for it along the inner axis (a skipped tile re-uses
the block already in VMEM, so no copy is issued). Logits, softmax and every
accumulator are float32; the matmuls take the inputs' dtype (bf16 on the MXU).

Layouts Mosaic tiles without copies where it can:
- q, k, v, out and their gradients stay [B, T, H*D] (heads in lanes, a free
  reshape of [B, T, H, D]) when D is a multiple of 128; otherwise (D = 64) they
  are transposed to [B, H, T, D];
- per-token codes as [B, T, 128] (a column per tile, lane-broadcast) and
  [B, 8, T] (a row per tile, sublane-broadcast); `lse` and the backward's
  `delta = rowsum(out * d_out)` as rows [B, H, 8, T], turned into columns inside
  the kernel by one (128, block) transpose per query block.
Block sizes are multiples of 128 on TPU (interpret mode accepts any that divide
each other); rows shorter than a block get blocks of the next power of two (at
least 128). The prefetched tables take 8 * B * (T / block_q) * (T / block_k)
bytes of SMEM: per-device batches with very long rows want the larger blocks.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from bigsci_jax.kernels import blocks, partition

LANES, SUBLANES = 128, 8
DEFAULT_BLOCKS = {"v5e": (512, 512), "v5p": (512, 512), "v6e": (512, 1024), "cpu": (128, 128)}
KERNEL_NAMES = ("bigsci_attention_forward", "bigsci_attention_dq", "bigsci_attention_dkv")


def default_blocks(device_kind=None):
  kind = (device_kind or partition.target()[1]).lower()
  for name, sizes in DEFAULT_BLOCKS.items():
    if name in kind.replace(" ", "").replace("lite", "e"):
      return sizes
  return (512, 512)


def fetch_table(kinds_BxNxM):
  """The block each tile fetches along the last axis: its own unless skipped; a
  skipped tile fetches the last non-skipped block before it in the row (or the
  row's first one)."""
  m = kinds_BxNxM.shape[-1]
  own = jnp.where(kinds_BxNxM != blocks.SKIP, jnp.arange(m), -1)
  previous = jax.lax.cummax(own, axis=2)
  first = jnp.argmax(kinds_BxNxM != blocks.SKIP, axis=-1)[..., None]
  return jnp.where(previous >= 0, previous, first).astype(jnp.int32)


def attention(q_BxTxHxK, k_BxSxGxK, v_BxSxGxK, *, segment_ids=None, prefix_mask=None,
              alibi_slopes=None, causal=True, sm_scale=None, block_q=None, block_k=None,
              interpret=None):
  """The kernels.attention contract (any T: padded inside); sharded as partition.call
  says. Block sizes default to the target generation's (DEFAULT_BLOCKS)."""
  platform, kind = partition.target()
  default_q, default_k = default_blocks(kind)
  return partition.call(
      "pallas_tpu", _attention, q_BxTxHxK, k_BxSxGxK, v_BxSxGxK, segment_ids=segment_ids,
      prefix_mask=prefix_mask, alibi_slopes=alibi_slopes, causal=causal, sm_scale=sm_scale,
      block_q=block_q or default_q, block_k=block_k or default_k,
      interpret=platform != "tpu" if interpret is None else interpret)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _attention(static, q_BxTxHxK, k_BxSxGxK, v_BxSxGxK, codes_BxT, slopes_H):
  return _attention_fwd(static, q_BxTxHxK, k_BxSxGxK, v_BxSxGxK, codes_BxT, slopes_H)[0]


def _attention_fwd(static, q_BxTxHxK, k_BxSxGxK, v_BxSxGxK, codes_BxT, slopes_H):
  lay = _Layout.of(static, codes_BxT, q_BxTxHxK.shape[3])
  q, k, v = (lay.to_kernel(x) for x in (q_BxTxHxK, k_BxSxGxK, v_BxSxGxK))
  out, lse_BxHx8xT = _forward(lay, q, k, v, slopes_H)
  # Residuals in the kernels' layout: the caller's q / k / v may die after the forward.
  return lay.from_kernel(out), (q, k, v, codes_BxT, slopes_H, out, lse_BxHx8xT)


def _attention_bwd(static, residuals, d_out_BxTxHxK):
  q, k, v, codes_BxT, slopes_H, out, lse_BxHx8xT = residuals
  lay = _Layout.of(static, codes_BxT, d_out_BxTxHxK.shape[3])
  d_out = lay.to_kernel(d_out_BxTxHxK)
  dq, delta_BxHx8xT = _backward_dq(lay, q, k, v, out, d_out, lse_BxHx8xT, slopes_H)
  dk, dv = _backward_dkv(lay, q, k, v, d_out, lse_BxHx8xT, delta_BxHx8xT, slopes_H)
  return lay.from_kernel(dq), lay.from_kernel(dk), lay.from_kernel(dv), None, None


_attention.defvjp(_attention_fwd, _attention_bwd)


@dataclasses.dataclass(frozen=True)
class _Layout:
  """Padded sizes, block tables and array layouts shared by the three kernels."""
  static: blocks.Settings
  t: int
  tp: int              # T padded to a multiple of both blocks
  d: int
  heads_in_lanes: bool  # [B, T, H*D] (D % 128 == 0) instead of [B, H, T, D]
  block_q: int
  block_k: int
  kinds: jax.Array      # [B, Tp/block_q, Tp/block_k]
  code_columns: jax.Array  # [B, Tp, 128]: a tile's tokens down its rows
  code_rows: jax.Array     # [B, 8, Tp]: a tile's tokens along its columns

  @classmethod
  def of(cls, static, codes_BxT, d):
    b, t = codes_BxT.shape
    cap = max(LANES, 1 << (t - 1).bit_length())  # short rows: blocks no longer than needed
    block_q, block_k = min(static.block_q, cap), min(static.block_k, cap)
    tp = blocks.padded_length(t, block_q, block_k)
    codes_BxT = blocks.pad_codes(codes_BxT, tp)
    return cls(static=static, t=t, tp=tp, d=d, heads_in_lanes=d % LANES == 0,
               block_q=block_q, block_k=block_k,
               kinds=blocks.block_kinds(codes_BxT, block_q, block_k, static.causal),
               code_columns=jnp.broadcast_to(codes_BxT[:, :, None], (b, tp, LANES)),
               code_rows=jnp.broadcast_to(codes_BxT[:, None, :], (b, SUBLANES, tp)))

  def to_kernel(self, x_BxTxHxK):
    b, t, h, d = x_BxTxHxK.shape
    x = jnp.pad(x_BxTxHxK, ((0, 0), (0, self.tp - t), (0, 0), (0, 0)))
    return x.reshape(b, self.tp, h * d) if self.heads_in_lanes else x.transpose(0, 2, 1, 3)

  def heads(self, x):
    return x.shape[2] // self.d if self.heads_in_lanes else x.shape[1]

  def from_kernel(self, x):
    b, h = x.shape[0], self.heads(x)
    x_BxTxHxK = (x.reshape(b, self.tp, h, self.d) if self.heads_in_lanes
                 else x.transpose(0, 2, 1, 3))
    return x_BxTxHxK[:, :self.t]

  def tile(self, block, index):
    """BlockSpec of one head's [block, D] tile; index(grid..., prefetch...) -> (b, head, row)."""
    sq = pl.Squeezed()
    if self.heads_in_lanes:
      def in_lanes(*args):
        b, head, row = index(*args)
        return b, row, head
      return pl.BlockSpec((sq, block, self.d), in_lanes)
    def transposed(*args):
      b, head, row = index(*args)
      return b, head, row, 0
    return pl.BlockSpec((sq, sq, block, self.d), transposed)

  def compiler_params(self, inner_axes):
    return pltpu.CompilerParams(
        dimension_semantics=("parallel",) * 3 + ("arbitrary",) * inner_axes)


def _column(row_ref, block):
  """A [8, block] row tile as a [block, 128] lane-broadcast column (one transpose)."""
  return jnp.broadcast_to(row_ref[:1, :], (LANES, block)).T


def _forward_kernel(kinds_ref, fetch_ref, slopes_ref, qcode_ref, kcode_ref, q_ref, k_ref, v_ref,
                    o_ref, lse_ref, m_scr, l_scr, acc_scr, *, static, block_q, block_k):
  del fetch_ref  # used by the index maps only
  b, h, i, j = (pl.program_id(a) for a in range(4))

  @pl.when(j == 0)
  def _init():
    m_scr[...] = jnp.full(m_scr.shape, blocks.MASKED, jnp.float32)
    l_scr[...] = jnp.zeros(l_scr.shape, jnp.float32)
    acc_scr[...] = jnp.zeros(acc_scr.shape, jnp.float32)

  def tile(masked):
    s_QxK, visible_QxK = blocks.tile_logits(
        q_ref[...], k_ref[...], i * block_q, j * block_k, qcode_ref[:, :1], kcode_ref[:1, :],
        slopes_ref[h], static, masked=masked, a_is_query=True)
    m_prev_QxL = m_scr[...]
    m_new_QxL = jnp.maximum(m_prev_QxL, jnp.max(s_QxK, axis=1, keepdims=True))
    p_QxK = jnp.exp(s_QxK - m_new_QxL[:, :1])
    if masked:
      p_QxK = jnp.where(visible_QxK, p_QxK, 0.0)
    alpha_QxL = jnp.exp(m_prev_QxL - m_new_QxL)
    l_scr[...] = alpha_QxL * l_scr[...] + jnp.sum(p_QxK, axis=1, keepdims=True)
    m_scr[...] = m_new_QxL
    acc_scr[...] = alpha_QxL[:, :1] * acc_scr[...] + blocks.matmul(p_QxK.astype(v_ref.dtype), v_ref[...])

  kind = kinds_ref[b, i, j]
  pl.when(kind == blocks.PARTIAL)(functools.partial(tile, True))
  pl.when(kind == blocks.FULL)(functools.partial(tile, False))

  @pl.when(j == pl.num_programs(3) - 1)
  def _finish():
    l_QxL = l_scr[...]
    seen_QxL = l_QxL > 0
    safe_QxL = jnp.where(seen_QxL, l_QxL, 1.0)
    o_ref[...] = jnp.where(seen_QxL[:, :1], acc_scr[...] / safe_QxL[:, :1], 0.0).astype(o_ref.dtype)
    # A row that sees nothing keeps lse 0: its tiles are all masked, so p is 0 there.
    lse_QxL = jnp.where(seen_QxL, m_scr[...] + jnp.log(safe_QxL), 0.0)
    lse_ref[...] = lse_QxL.T[:SUBLANES, :]


def _query_tile(lay):
  """One query head's [block_q, D] tile, grid (batch, head, query block, key block)."""
  return lay.tile(lay.block_q, lambda b, h, i, j, kinds, fetch: (b, h, i))


def _query_row(lay):
  """One query head's [8, block_q] row of lse / delta, the same grid."""
  return pl.BlockSpec((pl.Squeezed(), pl.Squeezed(), SUBLANES, lay.block_q),
                      lambda b, h, i, j, kinds, fetch: (b, h, 0, i))


def _query_grid_specs(lay, r):
  """in_specs the forward and dq kernels share: tile tables, codes, q, and the k / v
  blocks (of kv head h // r) each tile fetches."""
  sq = pl.Squeezed()
  bk = lay.block_k

  def kv(b, h, i, j, kinds, fetch):
    return b, h // r, fetch[b, i, j]
  return [pl.BlockSpec(memory_space=pltpu.SMEM),
          pl.BlockSpec((sq, lay.block_q, LANES), lambda b, h, i, j, kinds, fetch: (b, i, 0)),
          pl.BlockSpec((sq, SUBLANES, bk), lambda b, h, i, j, kinds, fetch: (b, 0, fetch[b, i, j])),
          _query_tile(lay), lay.tile(bk, kv), lay.tile(bk, kv)]


def _forward(lay, q, k, v, slopes_H):
  b, h, g = q.shape[0], lay.heads(q), lay.heads(k)
  r = h // g
  bq, bk = lay.block_q, lay.block_k
  kernel = functools.partial(_forward_kernel, static=lay.static, block_q=bq, block_k=bk)
  grid_spec = pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=2, grid=(b, h, lay.tp // bq, lay.tp // bk),
      in_specs=_query_grid_specs(lay, r),
      out_specs=[_query_tile(lay), _query_row(lay)],
      scratch_shapes=[pltpu.VMEM((bq, LANES), jnp.float32), pltpu.VMEM((bq, LANES), jnp.float32),
                      pltpu.VMEM((bq, lay.d), jnp.float32)])
  return pl.pallas_call(
      kernel, grid_spec=grid_spec, name=KERNEL_NAMES[0],
      out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype),
                 jax.ShapeDtypeStruct((b, h, SUBLANES, lay.tp), jnp.float32)],
      compiler_params=lay.compiler_params(1), interpret=lay.static.interpret,
  )(lay.kinds, fetch_table(lay.kinds), slopes_H, lay.code_columns, lay.code_rows, q, k, v)


def _dq_kernel(kinds_ref, fetch_ref, slopes_ref, qcode_ref, kcode_ref, q_ref, k_ref, v_ref,
               o_ref, do_ref, lse_ref, dq_ref, delta_ref, lse_scr, delta_scr, acc_scr, *, static,
               block_q, block_k):
  """Also writes delta = rowsum(out * d_out) as rows, for the dk / dv kernel."""
  del fetch_ref
  b, h, i, j = (pl.program_id(a) for a in range(4))

  @pl.when(j == 0)
  def _init():
    lse_scr[...] = _column(lse_ref, block_q)
    product_QxD = o_ref[...].astype(jnp.float32) * do_ref[...].astype(jnp.float32)
    delta_scr[...] = jnp.broadcast_to(jnp.sum(product_QxD, axis=1, keepdims=True),
                                      delta_scr.shape)
    acc_scr[...] = jnp.zeros(acc_scr.shape, jnp.float32)

  def tile(masked):
    s_QxK, visible_QxK = blocks.tile_logits(
        q_ref[...], k_ref[...], i * block_q, j * block_k, qcode_ref[:, :1], kcode_ref[:1, :],
        slopes_ref[h], static, masked=masked, a_is_query=True)
    p_QxK = jnp.exp(s_QxK - lse_scr[:, :1])
    if masked:
      p_QxK = jnp.where(visible_QxK, p_QxK, 0.0)
    dp_QxK = blocks.matmul(do_ref[...], v_ref[...], contract_b=1)
    ds_QxK = p_QxK * (dp_QxK - delta_scr[:, :1])
    acc_scr[...] += blocks.matmul(ds_QxK.astype(k_ref.dtype), k_ref[...])

  kind = kinds_ref[b, i, j]
  pl.when(kind == blocks.PARTIAL)(functools.partial(tile, True))
  pl.when(kind == blocks.FULL)(functools.partial(tile, False))

  @pl.when(j == pl.num_programs(3) - 1)
  def _finish():
    dq_ref[...] = (acc_scr[...] * static.scale).astype(dq_ref.dtype)
    delta_ref[...] = delta_scr[...].T[:SUBLANES, :]


def _backward_dq(lay, q, k, v, out, d_out, lse_BxHx8xT, slopes_H):
  b, h, g = q.shape[0], lay.heads(q), lay.heads(k)
  r = h // g
  bq, bk = lay.block_q, lay.block_k
  kernel = functools.partial(_dq_kernel, static=lay.static, block_q=bq, block_k=bk)
  grid_spec = pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=2, grid=(b, h, lay.tp // bq, lay.tp // bk),
      in_specs=_query_grid_specs(lay, r) + [_query_tile(lay), _query_tile(lay), _query_row(lay)],
      out_specs=[_query_tile(lay), _query_row(lay)],
      scratch_shapes=[pltpu.VMEM((bq, LANES), jnp.float32), pltpu.VMEM((bq, LANES), jnp.float32),
                      pltpu.VMEM((bq, lay.d), jnp.float32)])
  return pl.pallas_call(
      kernel, grid_spec=grid_spec, name=KERNEL_NAMES[1],
      out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype),
                 jax.ShapeDtypeStruct(lse_BxHx8xT.shape, jnp.float32)],
      compiler_params=lay.compiler_params(1), interpret=lay.static.interpret,
  )(lay.kinds, fetch_table(lay.kinds), slopes_H, lay.code_columns, lay.code_rows, q, k, v, out,
    d_out, lse_BxHx8xT)


def _dkv_kernel(kinds_ref, fetch_ref, slopes_ref, kcode_ref, qcode_ref, q_ref, k_ref, v_ref,
                do_ref, lse_ref, delta_ref, dk_ref, dv_ref, dk_scr, dv_scr, *, static, block_q,
                block_k, group):
  """Transposed tiles (keys x queries): lse and delta broadcast as rows, no transpose."""
  del fetch_ref
  b, g, j, r, i = (pl.program_id(a) for a in range(5))

  @pl.when((r == 0) & (i == 0))
  def _init():
    dk_scr[...] = jnp.zeros(dk_scr.shape, jnp.float32)
    dv_scr[...] = jnp.zeros(dv_scr.shape, jnp.float32)

  def tile(masked):
    s_KxQ, visible_KxQ = blocks.tile_logits(
        k_ref[...], q_ref[...], j * block_k, i * block_q, kcode_ref[:, :1], qcode_ref[:1, :],
        slopes_ref[g * group + r], static, masked=masked, a_is_query=False)
    p_KxQ = jnp.exp(s_KxQ - lse_ref[:1, :])
    if masked:
      p_KxQ = jnp.where(visible_KxQ, p_KxQ, 0.0)
    dv_scr[...] += blocks.matmul(p_KxQ.astype(do_ref.dtype), do_ref[...])
    dp_KxQ = blocks.matmul(v_ref[...], do_ref[...], contract_b=1)
    ds_KxQ = p_KxQ * (dp_KxQ - delta_ref[:1, :])
    dk_scr[...] += blocks.matmul(ds_KxQ.astype(q_ref.dtype), q_ref[...])

  kind = kinds_ref[b, j, i]
  pl.when(kind == blocks.PARTIAL)(functools.partial(tile, True))
  pl.when(kind == blocks.FULL)(functools.partial(tile, False))

  @pl.when((r == pl.num_programs(3) - 1) & (i == pl.num_programs(4) - 1))
  def _finish():
    dk_ref[...] = (dk_scr[...] * static.scale).astype(dk_ref.dtype)
    dv_ref[...] = dv_scr[...].astype(dv_ref.dtype)


def _backward_dkv(lay, q, k, v, d_out, lse_BxHx8xT, delta_BxHx8xT, slopes_H):
  b, h, g = q.shape[0], lay.heads(q), lay.heads(k)
  r = h // g
  bq, bk = lay.block_q, lay.block_k
  kinds_T = lay.kinds.transpose(0, 2, 1)   # [B, key blocks, query blocks]
  kernel = functools.partial(_dkv_kernel, static=lay.static, block_q=bq, block_k=bk, group=r)
  sq = pl.Squeezed()

  def query_side(b, g, j, r_, i, kinds, fetch):
    return b, g * r + r_, fetch[b, j, i]

  def key_side(b, g, j, r_, i, kinds, fetch):
    return b, g, j

  def row(b, g, j, r_, i, kinds, fetch):
    return b, g * r + r_, 0, fetch[b, j, i]
  grid_spec = pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=2, grid=(b, g, lay.tp // bk, r, lay.tp // bq),
      in_specs=[
          pl.BlockSpec(memory_space=pltpu.SMEM),
          pl.BlockSpec((sq, bk, LANES), lambda b, g, j, r_, i, kinds, fetch: (b, j, 0)),
          pl.BlockSpec((sq, SUBLANES, bq),
                       lambda b, g, j, r_, i, kinds, fetch: (b, 0, fetch[b, j, i])),
          lay.tile(bq, query_side), lay.tile(bk, key_side), lay.tile(bk, key_side),
          lay.tile(bq, query_side),
          pl.BlockSpec((sq, sq, SUBLANES, bq), row), pl.BlockSpec((sq, sq, SUBLANES, bq), row),
      ],
      out_specs=[lay.tile(bk, key_side), lay.tile(bk, key_side)],
      scratch_shapes=[pltpu.VMEM((bk, lay.d), jnp.float32), pltpu.VMEM((bk, lay.d), jnp.float32)])
  return pl.pallas_call(
      kernel, grid_spec=grid_spec, name=KERNEL_NAMES[2],
      out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
      compiler_params=lay.compiler_params(2), interpret=lay.static.interpret,
  )(kinds_T, fetch_table(kinds_T), slopes_H, lay.code_columns, lay.code_rows, q, k, v, d_out,
    lse_BxHx8xT, delta_BxHx8xT)
