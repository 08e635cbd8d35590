"""Fused attention for TPU in Pallas (Mosaic): online softmax over key blocks, ALiBi
computed from block indices, masks from per-token codes, skipped tiles never
computed nor fetched.

Grid (batch, head, query block, key block), the key-block axis last and
"arbitrary" (it carries the running max, sum and accumulator in VMEM scratch).
Prefetched to SMEM before the grid runs: each tile's kind (blocks.SKIP / PARTIAL
/ FULL) and the key block to fetch for it (a skipped tile re-uses the block
already in VMEM, so no copy is issued). Logits, softmax and the accumulator are
float32; the matmuls take the inputs' dtype (bf16 on the MXU).

Per-token codes reach the kernel in the layouts Mosaic tiles: queries' as
[B, T, 128] (lane-broadcast), keys' as [B, 8, T] (sublane-broadcast).

The backward pass is, for now, the VJP of the `xla` implementation recomputed
from q, k, v (correct gradients, O(T^2) memory); the fused backward kernel is
the next step of the kernels issue.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from bigsci_jax.kernels import blocks, xla

LANES, SUBLANES = 128, 8
_MASK = -1e30   # finite: exp(_MASK - m) underflows to 0 without inf - inf
DEFAULT_BLOCKS = {"v5e": (512, 512), "v5p": (512, 512), "v6e": (512, 1024), "cpu": (128, 128)}


def default_blocks(device_kind=None):
  kind = (device_kind or jax.devices()[0].device_kind).lower()
  for name, sizes in DEFAULT_BLOCKS.items():
    if name in kind.replace(" ", "").replace("lite", "e"):
      return sizes
  return (512, 512)


def fetch_table(kinds_BxNqxNk):
  """The key block each tile fetches: its own unless skipped; a skipped tile fetches
  the last non-skipped block before it in the row (or the row's first one)."""
  nk = kinds_BxNqxNk.shape[-1]
  own = jnp.where(kinds_BxNqxNk != blocks.SKIP, jnp.arange(nk), -1)
  previous = jax.lax.cummax(own, axis=2)
  first = jnp.argmax(kinds_BxNqxNk != blocks.SKIP, axis=-1)[..., None]
  return jnp.where(previous >= 0, previous, first).astype(jnp.int32)


def _forward_kernel(kinds_ref, fetch_ref, slopes_ref, qcode_ref, kcode_ref, q_ref, k_ref, v_ref,
                    o_ref, m_scr, l_scr, acc_scr, *, scale, causal, alibi, block_q, block_k):
  del fetch_ref  # used by the index maps only
  b, h, i, j = (pl.program_id(a) for a in range(4))

  @pl.when(j == 0)
  def _init():
    m_scr[...] = jnp.full(m_scr.shape, _MASK, jnp.float32)
    l_scr[...] = jnp.zeros(l_scr.shape, jnp.float32)
    acc_scr[...] = jnp.zeros(acc_scr.shape, jnp.float32)

  kind = kinds_ref[b, i, j]

  def tile(masked):
    s_QxK = jax.lax.dot_general(q_ref[...], k_ref[...], (((1,), (1,)), ((), ())),
                                preferred_element_type=jnp.float32) * scale
    rows_QxK = i * block_q + jax.lax.broadcasted_iota(jnp.int32, s_QxK.shape, 0)
    cols_QxK = j * block_k + jax.lax.broadcasted_iota(jnp.int32, s_QxK.shape, 1)
    if alibi:
      s_QxK = s_QxK - slopes_ref[h] * jnp.abs(rows_QxK - cols_QxK).astype(jnp.float32)
    if masked:
      q_code_Qx1 = qcode_ref[:, :1]
      k_code_1xK = kcode_ref[:1, :]
      visible_QxK = (q_code_Qx1 // 2 == k_code_1xK // 2) & (q_code_Qx1 >= 2)
      if causal:
        both_prefix = (q_code_Qx1 % 2 == 1) & (k_code_1xK % 2 == 1)
        visible_QxK = visible_QxK & ((cols_QxK <= rows_QxK) | both_prefix)
      s_QxK = jnp.where(visible_QxK, s_QxK, _MASK)
    m_prev_QxL = m_scr[...]
    m_new_QxL = jnp.maximum(m_prev_QxL, jnp.max(s_QxK, axis=1, keepdims=True))
    p_QxK = jnp.exp(s_QxK - m_new_QxL[:, :1])
    if masked:
      p_QxK = jnp.where(visible_QxK, p_QxK, 0.0)
    alpha_QxL = jnp.exp(m_prev_QxL - m_new_QxL)
    l_scr[...] = alpha_QxL * l_scr[...] + jnp.sum(p_QxK, axis=1, keepdims=True)
    m_scr[...] = m_new_QxL
    pv_QxD = jax.lax.dot_general(p_QxK.astype(v_ref.dtype), v_ref[...], (((1,), (0,)), ((), ())),
                                 preferred_element_type=jnp.float32)
    acc_scr[...] = alpha_QxL[:, :1] * acc_scr[...] + pv_QxD

  pl.when(kind == blocks.PARTIAL)(functools.partial(tile, True))
  pl.when(kind == blocks.FULL)(functools.partial(tile, False))

  @pl.when(j == pl.num_programs(3) - 1)
  def _finish():
    l_Qx1 = l_scr[:, :1]
    o_ref[...] = jnp.where(l_Qx1 > 0, acc_scr[...] / jnp.where(l_Qx1 > 0, l_Qx1, 1.0),
                           0.0).astype(o_ref.dtype)


def attention(q_BxTxHxK, k_BxSxGxK, v_BxSxGxK, *, segment_ids=None, prefix_mask=None,
              alibi_slopes=None, causal=True, sm_scale=None, block_q=None, block_k=None,
              interpret=None):
  """The kernels.attention contract on one device's arrays (any T: padded inside)."""
  b, t, h, d = q_BxTxHxK.shape
  if interpret is None:
    interpret = jax.devices()[0].platform != "tpu"
  default_q, default_k = default_blocks()
  block_q, block_k = block_q or default_q, block_k or default_k
  if max(block_q, block_k) % min(block_q, block_k):
    raise ValueError(f"pallas_tpu attention: block sizes {block_q} and {block_k} must divide "
                     f"each other.")
  codes_BxT = blocks.token_codes(segment_ids, prefix_mask, b, t)
  slopes_H = (jnp.zeros((h,), jnp.float32) if alibi_slopes is None
              else jnp.asarray(alibi_slopes, jnp.float32))
  static = _Static(scale=d ** -0.5 if sm_scale is None else sm_scale, causal=causal,
                   alibi=alibi_slopes is not None, block_q=block_q, block_k=block_k,
                   interpret=interpret)
  return _attention(static, q_BxTxHxK, k_BxSxGxK, v_BxSxGxK, codes_BxT, slopes_H)


@dataclasses.dataclass(frozen=True)
class _Static:
  """Hashable static settings of one call (the custom_vjp's non-differentiable argument)."""
  scale: float
  causal: bool
  alibi: bool
  block_q: int
  block_k: int
  interpret: bool


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _attention(static, q_BxTxHxK, k_BxSxGxK, v_BxSxGxK, codes_BxT, slopes_H):
  return _forward(static, q_BxTxHxK, k_BxSxGxK, v_BxSxGxK, codes_BxT, slopes_H)


def _attention_fwd(static, q, k, v, codes, slopes):
  return _forward(static, q, k, v, codes, slopes), (q, k, v, codes, slopes)


def _attention_bwd(static, residuals, d_out):
  q, k, v, codes, slopes = residuals

  def recompute(q, k, v):
    return xla.attention(q, k, v, segment_ids=codes // 2, prefix_mask=codes % 2,
                         alibi_slopes=slopes if static.alibi else None, causal=static.causal,
                         sm_scale=static.scale)
  _, vjp = jax.vjp(recompute, q, k, v)
  return (*vjp(d_out), None, None)


_attention.defvjp(_attention_fwd, _attention_bwd)


def _forward(static, q_BxTxHxK, k_BxSxGxK, v_BxSxGxK, codes_BxT, slopes_H):
  b, t, h, d = q_BxTxHxK.shape
  g = k_BxSxGxK.shape[2]
  step = max(static.block_q, static.block_k)
  tp = -(-t // step) * step
  block_q, block_k = min(static.block_q, tp), min(static.block_k, tp)
  codes_BxT = blocks.pad_codes(codes_BxT, tp)
  kinds = blocks.block_kinds(codes_BxT, block_q, block_k, static.causal)
  fetch = fetch_table(kinds)
  pad = ((0, 0), (0, 0), (0, tp - t), (0, 0))
  q_BxHxTxK = jnp.pad(q_BxTxHxK.transpose(0, 2, 1, 3), pad)
  k_BxGxTxK = jnp.pad(k_BxSxGxK.transpose(0, 2, 1, 3), pad)
  v_BxGxTxK = jnp.pad(v_BxSxGxK.transpose(0, 2, 1, 3), pad)
  q_codes_BxTxL = jnp.broadcast_to(codes_BxT[:, :, None], (b, tp, LANES))
  k_codes_BxSxT = jnp.broadcast_to(codes_BxT[:, None, :], (b, SUBLANES, tp))
  r = h // g
  kernel = functools.partial(_forward_kernel, scale=static.scale, causal=static.causal,
                             alibi=static.alibi, block_q=block_q, block_k=block_k)
  sq = pl.Squeezed()

  def kv_map(b, h, i, j, kinds, fetch):
    return (b, h // r, fetch[b, i, j], 0)
  grid_spec = pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=2, grid=(b, h, tp // block_q, tp // block_k),
      in_specs=[
          pl.BlockSpec(memory_space=pltpu.SMEM),
          pl.BlockSpec((sq, block_q, LANES), lambda b, h, i, j, kinds, fetch: (b, i, 0)),
          pl.BlockSpec((sq, SUBLANES, block_k),
                       lambda b, h, i, j, kinds, fetch: (b, 0, fetch[b, i, j])),
          pl.BlockSpec((sq, sq, block_q, d), lambda b, h, i, j, kinds, fetch: (b, h, i, 0)),
          pl.BlockSpec((sq, sq, block_k, d), kv_map),
          pl.BlockSpec((sq, sq, block_k, d), kv_map),
      ],
      out_specs=pl.BlockSpec((sq, sq, block_q, d), lambda b, h, i, j, kinds, fetch: (b, h, i, 0)),
      scratch_shapes=[pltpu.VMEM((block_q, LANES), jnp.float32),
                      pltpu.VMEM((block_q, LANES), jnp.float32),
                      pltpu.VMEM((block_q, d), jnp.float32)])
  out_BxHxTxK = pl.pallas_call(
      kernel, grid_spec=grid_spec,
      out_shape=jax.ShapeDtypeStruct((b, h, tp, d), q_BxTxHxK.dtype),
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
      interpret=static.interpret,
  )(kinds, fetch, slopes_H, q_codes_BxTxL, k_codes_BxSxT, q_BxHxTxK, k_BxGxTxK, v_BxGxTxK)
  return out_BxHxTxK[:, :, :t].transpose(0, 2, 1, 3)
