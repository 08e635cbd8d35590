"""Fused attention for GPU in Pallas (Triton lowering), forward and backward:
online softmax over key blocks, ALiBi computed from indices, masks from per-token
codes, and per query block only the range of key blocks that the block tables
(blocks.tile_ranges) say can hold a visible key; the FULL tiles of that range
run in a loop of their own without the mask. Default tiles
from a sweep on an H100 (benchmarks/RESULTS.md).

Pallas's Triton lowering works on jax 0.10 and 0.11 but is deprecated in 0.11;
everything that depends on it lives in this module.

Three kernels; each program owns one output block and loops over the other side
inside the program (Triton has no sequential grid axis to accumulate over):
- forward, grid (batch, head, query block): output and the row log-sum-exp
  `lse` [B, H, T] f32 kept for the backward;
- dq, the same grid: recomputes each tile's probabilities from `lse`, and writes
  delta = rowsum(out * d_out) for the next kernel;
- dk / dv, grid (batch, kv head, key block): loops over the query heads of the
  group and the query blocks that can see the key block, keys x queries tiles.
Arrays stay in [B, T, H, D] (the kernels index heads directly); T is padded to a
multiple of both block sizes. D must be a power of two (Triton's tile shapes).
"""

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from bigsci_jax.kernels import blocks, partition

# (block_q, block_k, num_warps, num_stages) by head dim, for sm80+ (A100 / H100).
DEFAULT_TUNING = {64: (64, 64, 4, 3), 128: (128, 64, 8, 3)}
KERNEL_NAMES = ("bigsci_gpu_attention_forward", "bigsci_gpu_attention_dq",
                "bigsci_gpu_attention_dkv")


def attention(q_BxTxHxK, k_BxSxGxK, v_BxSxGxK, *, segment_ids=None, prefix_mask=None,
              alibi_slopes=None, causal=True, sm_scale=None, block_q=None, block_k=None,
              num_warps=None, num_stages=None, interpret=None):
  """The kernels.attention contract (any T: padded inside); sharded as partition.call
  says; interpret mode off a GPU."""
  d = q_BxTxHxK.shape[3]
  if d & (d - 1):
    raise ValueError(f"pallas_gpu attention: head dim {d} is not a power of two.")
  default_q, default_k, warps, stages = DEFAULT_TUNING.get(d, (64, 64, 4, 2))
  platform, _ = partition.target()
  return partition.call(
      "pallas_gpu", _attention, q_BxTxHxK, k_BxSxGxK, v_BxSxGxK, segment_ids=segment_ids,
      prefix_mask=prefix_mask, alibi_slopes=alibi_slopes, causal=causal, sm_scale=sm_scale,
      block_q=block_q or default_q, block_k=block_k or default_k,
      interpret=platform != "gpu" if interpret is None else interpret,
      num_warps=num_warps or warps, num_stages=num_stages or stages)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _attention(static, q_BxTxHxK, k_BxSxGxK, v_BxSxGxK, codes_BxT, slopes_H):
  return _attention_fwd(static, q_BxTxHxK, k_BxSxGxK, v_BxSxGxK, codes_BxT, slopes_H)[0]


def _attention_fwd(static, q_BxTxHxK, k_BxSxGxK, v_BxSxGxK, codes_BxT, slopes_H):
  plan = _Plan.of(static, codes_BxT)
  q, k, v = (plan.pad(x) for x in (q_BxTxHxK, k_BxSxGxK, v_BxSxGxK))
  out, lse_BxHxT = _forward(plan, q, k, v, slopes_H)
  return out[:, :plan.t], (q, k, v, codes_BxT, slopes_H, out, lse_BxHxT)


def _attention_bwd(static, residuals, d_out_BxTxHxK):
  q, k, v, codes_BxT, slopes_H, out, lse_BxHxT = residuals
  plan = _Plan.of(static, codes_BxT)
  d_out = plan.pad(d_out_BxTxHxK)
  dq, delta_BxHxT = _backward_dq(plan, q, k, v, out, d_out, lse_BxHxT, slopes_H)
  dk, dv = _backward_dkv(plan, q, k, v, d_out, lse_BxHxT, delta_BxHxT, slopes_H)
  return dq[:, :plan.t], dk[:, :plan.t], dv[:, :plan.t], None, None


_attention.defvjp(_attention_fwd, _attention_bwd)


class _Plan:
  """Padded length, padded codes and the block ranges shared by the three kernels."""

  def __init__(self, static, t, tp, codes_BxT, kinds):
    self.static, self.t, self.tp, self.codes_BxT = static, t, tp, codes_BxT
    self.key_ranges = blocks.tile_ranges(kinds)                           # [B, nq, 4]
    self.query_ranges = blocks.tile_ranges(kinds.transpose(0, 2, 1))      # [B, nk, 4]

  @classmethod
  def of(cls, static, codes_BxT):
    t = codes_BxT.shape[1]
    tp = blocks.padded_length(t, static.block_q, static.block_k)
    codes_BxT = blocks.pad_codes(codes_BxT, tp)
    return cls(static, t, tp, codes_BxT,
               blocks.block_kinds(codes_BxT, static.block_q, static.block_k, static.causal))

  def pad(self, x_BxTxHxK):
    return jnp.pad(x_BxTxHxK, ((0, 0), (0, self.tp - x_BxTxHxK.shape[1]), (0, 0), (0, 0)))

  def params(self):
    return dict(interpret=self.static.interpret,
                compiler_params=plgpu.CompilerParams(num_warps=self.static.num_warps,
                                                     num_stages=self.static.num_stages))


def _logits(a_AxD, b_BxD, a_first, b_first, a_codes_A, b_codes_B, slope, static, a_is_query,
            masked):
  return blocks.tile_logits(a_AxD, b_BxD, a_first, b_first, a_codes_A[:, None],
                            b_codes_B[None, :], slope, static, masked=masked,
                            a_is_query=a_is_query)


def _probabilities(s_AxB, visible_AxB, offset_A):
  """exp(s - offset) per row, 0 where masked (visible_AxB None: a FULL tile)."""
  p_AxB = jnp.exp(s_AxB - offset_A)
  return p_AxB if visible_AxB is None else jnp.where(visible_AxB, p_AxB, 0.0)


def _tiles(ranges_ref, step, init):
  """Runs step(j, masked, carry) over a program's tiles: the partial ones before and
  after its FULL run with the mask, the FULL run without."""
  first, full_first, full_end, end = (ranges_ref[n] for n in range(4))
  carry = jax.lax.fori_loop(first, full_first, functools.partial(step, masked=True), init)
  carry = jax.lax.fori_loop(full_first, full_end, functools.partial(step, masked=False), carry)
  return jax.lax.fori_loop(full_end, end, functools.partial(step, masked=True), carry)


def _forward_kernel(ranges_ref, slopes_ref, qcode_ref, kcode_ref, q_ref, k_ref, v_ref,
                    o_ref, lse_ref, *, static):
  i = pl.program_id(2)
  bq, bk = static.block_q, static.block_k
  q_QxD, q_codes_Q = q_ref[...], qcode_ref[...]
  d = q_QxD.shape[1]

  def step(j, carry, masked):
    m_Q, l_Q, acc_QxD = carry
    keys = pl.ds(j * bk, bk)
    s_QxK, visible_QxK = _logits(q_QxD, k_ref[keys, :], i * bq, j * bk, q_codes_Q,
                                 kcode_ref[keys], slopes_ref[0], static, True, masked)
    m_new_Q = jnp.maximum(m_Q, jnp.max(s_QxK, axis=1))
    p_QxK = _probabilities(s_QxK, visible_QxK, m_new_Q[:, None])
    alpha_Q = jnp.exp(m_Q - m_new_Q)
    acc_QxD = alpha_Q[:, None] * acc_QxD + blocks.matmul(p_QxK.astype(v_ref.dtype), v_ref[keys, :])
    return m_new_Q, alpha_Q * l_Q + jnp.sum(p_QxK, axis=1), acc_QxD

  init = (jnp.full((bq,), blocks.MASKED, jnp.float32), jnp.zeros((bq,), jnp.float32),
          jnp.zeros((bq, d), jnp.float32))
  m_Q, l_Q, acc_QxD = _tiles(ranges_ref, step, init)
  seen_Q = l_Q > 0
  safe_Q = jnp.where(seen_Q, l_Q, 1.0)
  o_ref[...] = jnp.where(seen_Q[:, None], acc_QxD / safe_Q[:, None], 0.0).astype(o_ref.dtype)
  lse_ref[...] = jnp.where(seen_Q, m_Q + jnp.log(safe_Q), 0.0)


def _query_grid_specs(plan, q, k, r, extra_query_tiles=0, rows=0):
  """in_specs shared by the forward and dq kernels (grid (batch, head, query block))."""
  bq, tp, d = plan.static.block_q, plan.tp, q.shape[3]
  query_tile = pl.BlockSpec((None, bq, None, d), lambda b, h, i: (b, i, h, 0))
  whole_kv = pl.BlockSpec((None, tp, None, d), lambda b, h, i: (b, 0, h // r, 0))
  row = pl.BlockSpec((None, None, bq), lambda b, h, i: (b, h, i))
  return [pl.BlockSpec((None, None, 4), lambda b, h, i: (b, i, 0)),
          pl.BlockSpec((1,), lambda b, h, i: (h,)),
          pl.BlockSpec((None, bq), lambda b, h, i: (b, i)),
          pl.BlockSpec((None, tp), lambda b, h, i: (b, 0)),
          query_tile, whole_kv, whole_kv] + [query_tile] * extra_query_tiles + [row] * rows


def _forward(plan, q, k, v, slopes_H):
  b, tp, h, d = q.shape
  r = h // k.shape[2]
  bq = plan.static.block_q
  return pl.pallas_call(
      functools.partial(_forward_kernel, static=plan.static), grid=(b, h, tp // bq),
      in_specs=_query_grid_specs(plan, q, k, r),
      out_specs=[pl.BlockSpec((None, bq, None, d), lambda b, h, i: (b, i, h, 0)),
                 pl.BlockSpec((None, None, bq), lambda b, h, i: (b, h, i))],
      out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype),
                 jax.ShapeDtypeStruct((b, h, tp), jnp.float32)],
      name=KERNEL_NAMES[0], **plan.params(),
  )(plan.key_ranges, slopes_H, plan.codes_BxT, plan.codes_BxT, q, k, v)


def _dq_kernel(ranges_ref, slopes_ref, qcode_ref, kcode_ref, q_ref, k_ref, v_ref, o_ref,
               do_ref, lse_ref, dq_ref, delta_ref, *, static):
  i = pl.program_id(2)
  bq, bk = static.block_q, static.block_k
  q_QxD, q_codes_Q, do_QxD, lse_Q = q_ref[...], qcode_ref[...], do_ref[...], lse_ref[...]
  delta_Q = jnp.sum(o_ref[...].astype(jnp.float32) * do_QxD.astype(jnp.float32), axis=1)

  def step(j, acc_QxD, masked):
    keys = pl.ds(j * bk, bk)
    k_KxD = k_ref[keys, :]
    s_QxK, visible_QxK = _logits(q_QxD, k_KxD, i * bq, j * bk, q_codes_Q, kcode_ref[keys],
                                 slopes_ref[0], static, True, masked)
    p_QxK = _probabilities(s_QxK, visible_QxK, lse_Q[:, None])
    dp_QxK = blocks.matmul(do_QxD, v_ref[keys, :], contract_b=1)
    ds_QxK = p_QxK * (dp_QxK - delta_Q[:, None])
    return acc_QxD + blocks.matmul(ds_QxK.astype(k_KxD.dtype), k_KxD)

  acc_QxD = _tiles(ranges_ref, step, jnp.zeros(q_QxD.shape, jnp.float32))
  dq_ref[...] = (acc_QxD * static.scale).astype(dq_ref.dtype)
  delta_ref[...] = delta_Q


def _backward_dq(plan, q, k, v, out, d_out, lse_BxHxT, slopes_H):
  b, tp, h, d = q.shape
  r = h // k.shape[2]
  bq = plan.static.block_q
  return pl.pallas_call(
      functools.partial(_dq_kernel, static=plan.static), grid=(b, h, tp // bq),
      in_specs=_query_grid_specs(plan, q, k, r, extra_query_tiles=2, rows=1),
      out_specs=[pl.BlockSpec((None, bq, None, d), lambda b, h, i: (b, i, h, 0)),
                 pl.BlockSpec((None, None, bq), lambda b, h, i: (b, h, i))],
      out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype),
                 jax.ShapeDtypeStruct((b, h, tp), jnp.float32)],
      name=KERNEL_NAMES[1], **plan.params(),
  )(plan.key_ranges, slopes_H, plan.codes_BxT, plan.codes_BxT, q, k, v, out, d_out, lse_BxHxT)


def _dkv_kernel(ranges_ref, slopes_ref, kcode_ref, qcode_ref, q_ref, k_ref, v_ref, do_ref,
                lse_ref, delta_ref, dk_ref, dv_ref, *, static, group):
  g, j = pl.program_id(1), pl.program_id(2)
  bq, bk = static.block_q, static.block_k
  k_KxD, v_KxD, k_codes_K = k_ref[...], v_ref[...], kcode_ref[...]

  def head(r, carry):
    def step(i, carry, masked):
      dk_KxD, dv_KxD = carry
      queries = pl.ds(i * bq, bq)
      q_QxD, do_QxD = q_ref[queries, r, :], do_ref[queries, r, :]
      s_KxQ, visible_KxQ = _logits(k_KxD, q_QxD, j * bk, i * bq, k_codes_K, qcode_ref[queries],
                                   slopes_ref[g * group + r], static, False, masked)
      p_KxQ = _probabilities(s_KxQ, visible_KxQ, lse_ref[r, queries][None, :])
      dv_KxD = dv_KxD + blocks.matmul(p_KxQ.astype(do_QxD.dtype), do_QxD)
      dp_KxQ = blocks.matmul(v_KxD, do_QxD, contract_b=1)
      ds_KxQ = p_KxQ * (dp_KxQ - delta_ref[r, queries][None, :])
      return dk_KxD + blocks.matmul(ds_KxQ.astype(q_QxD.dtype), q_QxD), dv_KxD
    return _tiles(ranges_ref, step, carry)

  zeros = jnp.zeros(k_KxD.shape, jnp.float32)
  dk_KxD, dv_KxD = jax.lax.fori_loop(0, group, head, (zeros, zeros))
  dk_ref[...] = (dk_KxD * static.scale).astype(dk_ref.dtype)
  dv_ref[...] = dv_KxD.astype(dv_ref.dtype)


def _backward_dkv(plan, q, k, v, d_out, lse_BxHxT, delta_BxHxT, slopes_H):
  b, tp, h, d = q.shape
  g = k.shape[2]
  r = h // g
  bk = plan.static.block_k
  # Query-side arrays with the group's heads together: [B, T, G, R, D], [B, G, R, T].
  grouped = [x.reshape(b, tp, g, r, d) for x in (q, d_out)]
  rows = [x.reshape(b, g, r, tp) for x in (lse_BxHxT, delta_BxHxT)]
  key_tile = pl.BlockSpec((None, bk, None, d), lambda b, g, j: (b, j, g, 0))
  whole_group = pl.BlockSpec((None, tp, None, r, d), lambda b, g, j: (b, 0, g, 0, 0))
  group_rows = pl.BlockSpec((None, None, r, tp), lambda b, g, j: (b, g, 0, 0))
  return pl.pallas_call(
      functools.partial(_dkv_kernel, static=plan.static, group=r), grid=(b, g, tp // bk),
      in_specs=[pl.BlockSpec((None, None, 4), lambda b, g, j: (b, j, 0)),
                pl.BlockSpec((h,), lambda b, g, j: (0,)),
                pl.BlockSpec((None, bk), lambda b, g, j: (b, j)),
                pl.BlockSpec((None, tp), lambda b, g, j: (b, 0)),
                whole_group, key_tile, key_tile, whole_group, group_rows, group_rows],
      out_specs=[key_tile, key_tile],
      out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
      name=KERNEL_NAMES[2], **plan.params(),
  )(plan.query_ranges, slopes_H, plan.codes_BxT, plan.codes_BxT, grouped[0], k, v,
    grouped[1], rows[0], rows[1])
