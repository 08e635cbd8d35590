"""What the fused kernels (pallas_tpu, pallas_gpu) share: their static settings, the
mask and ALiBi of one tile, and the cheap prepass: which (query block, key block) tiles can
be skipped, which are fully visible (no mask needed) and which need the per-token
mask, computed from per-block summaries of the segment ids and prefix flags.

Per token the kernels read one int32 `code = 2 * segment_id + in_prefix`; a key
j is visible to query i iff codes' segments are equal and non-zero and (j <= i or
both are in the prefix) -- the rule of mask.visibility_BxTxS.

A tile is SKIP only when no pair in it can be visible (sound, not exact: the
kernel still masks partial tiles token by token), FULL only when every pair is
visible.
"""

import dataclasses

import jax
import jax.numpy as jnp

SKIP, PARTIAL, FULL = 0, 1, 2
MASKED = -1e30   # finite: exp(MASKED - m) underflows to 0 without inf - inf


@dataclasses.dataclass(frozen=True)
class Settings:
  """Hashable static settings of one kernel call (a custom_vjp's non-differentiable
  argument). num_warps / num_stages: Triton's, for pallas_gpu only."""
  scale: float
  causal: bool
  alibi: bool
  block_q: int
  block_k: int
  interpret: bool
  num_warps: int = 4
  num_stages: int = 2


def token_codes(segment_ids_BxT, prefix_BxT, batch, length):
  """int32 [B, T]: 2 * segment + prefix bit (segment 1 everywhere when None)."""
  seg = (jnp.ones((batch, length), jnp.int32) if segment_ids_BxT is None
         else segment_ids_BxT.astype(jnp.int32))
  pre = (jnp.zeros((batch, length), jnp.int32) if prefix_BxT is None
         else (prefix_BxT != 0).astype(jnp.int32))
  return 2 * seg + pre


def padded_length(length, block_q, block_k):
  """length rounded up to a multiple of both block sizes (which divide each other)."""
  step = max(block_q, block_k)
  return -(-length // step) * step


def pad_codes(codes_BxT, padded_length):
  """Padding tokens get code 0 (segment 0: visible to nothing, seeing nothing)."""
  return jnp.pad(codes_BxT, ((0, 0), (0, padded_length - codes_BxT.shape[1])))


def _summaries(codes_BxT, block):
  """Per block: min / max non-zero segment, any / all in prefix, any non-padding."""
  b, t = codes_BxT.shape
  c = codes_BxT.reshape(b, t // block, block)
  seg, pre = c // 2, c % 2
  live = seg > 0
  big = jnp.iinfo(jnp.int32).max
  return dict(seg_min=jnp.min(jnp.where(live, seg, big), axis=-1),
              seg_max=jnp.max(jnp.where(live, seg, 0), axis=-1),
              all_live=jnp.all(live, axis=-1), any_live=jnp.any(live, axis=-1),
              any_prefix=jnp.any(pre & live, axis=-1), all_prefix=jnp.all(pre & live, axis=-1))


def block_kinds(codes_BxT, block_q, block_k, causal=True):
  """int32 [B, T / block_q, T / block_k] of SKIP / PARTIAL / FULL (T divisible by both)."""
  q, k = _summaries(codes_BxT, block_q), _summaries(codes_BxT, block_k)
  nq, nk = codes_BxT.shape[1] // block_q, codes_BxT.shape[1] // block_k
  qs = {name: v[:, :, None] for name, v in q.items()}
  ks = {name: v[:, None, :] for name, v in k.items()}
  # Segments: ranges that cannot share a value, or a side that is all padding.
  overlap = ((qs["seg_min"] <= ks["seg_max"]) & (ks["seg_min"] <= qs["seg_max"])
             & qs["any_live"] & ks["any_live"])
  one_segment = ((qs["seg_min"] == qs["seg_max"]) & (ks["seg_min"] == ks["seg_max"])
                 & (qs["seg_min"] == ks["seg_min"]) & qs["all_live"] & ks["all_live"])
  if causal:
    q_first = (jnp.arange(nq) * block_q)[None, :, None]
    q_last = q_first + block_q - 1
    k_first = (jnp.arange(nk) * block_k)[None, None, :]
    k_last = k_first + block_k - 1
    reachable = (k_first <= q_last) | (qs["any_prefix"] & ks["any_prefix"])
    all_reachable = (k_last <= q_first) | (qs["all_prefix"] & ks["all_prefix"])
  else:
    reachable = all_reachable = jnp.ones((1, nq, nk), bool)
  kinds = jnp.where(overlap & reachable, PARTIAL, SKIP)
  return jnp.where(one_segment & all_reachable, FULL, kinds).astype(jnp.int32)


def matmul(a, b, contract_b=0):
  """a @ b (contract_b=0) or a @ b.T (contract_b=1), f32 accumulation, in a kernel."""
  return jax.lax.dot_general(a, b, (((1,), (contract_b,)), ((), ())),
                             preferred_element_type=jnp.float32)


def tile_logits(a_AxD, b_BxD, a_first, b_first, a_codes_Ax1, b_codes_1xB, slope, settings, *,
                masked, a_is_query):
  """One tile's scaled f32 logits a @ b.T with ALiBi and, if `masked`, the mask.

  Rows are a's tokens from position a_first, columns b's from b_first (queries x
  keys, or keys x queries in a dk / dv kernel); codes as a column and a row.
  Returns (logits with masked entries at MASKED, visibility or None when not
  `masked`)."""
  s_AxB = matmul(a_AxD, b_BxD, contract_b=1) * settings.scale
  a_pos = a_first + jax.lax.broadcasted_iota(jnp.int32, s_AxB.shape, 0)
  b_pos = b_first + jax.lax.broadcasted_iota(jnp.int32, s_AxB.shape, 1)
  if settings.alibi:
    s_AxB = s_AxB - slope * jnp.abs(a_pos - b_pos).astype(jnp.float32)
  if not masked:
    return s_AxB, None
  visible_AxB = (a_codes_Ax1 // 2 == b_codes_1xB // 2) & (a_codes_Ax1 >= 2)
  if settings.causal:
    both_prefix = (a_codes_Ax1 % 2 == 1) & (b_codes_1xB % 2 == 1)
    ordered = b_pos <= a_pos if a_is_query else a_pos <= b_pos
    visible_AxB = visible_AxB & (ordered | both_prefix)
  return jnp.where(visible_AxB, s_AxB, MASKED), visible_AxB


def block_ranges(kinds_BxNxM):
  """Per row of tiles, the half-open range [first, last + 1) of non-SKIP blocks
  along the last axis ((0, 0) when all are skipped): int32 [B, N] twice."""
  m = kinds_BxNxM.shape[-1]
  live = kinds_BxNxM != SKIP
  first = jnp.where(live.any(-1), jnp.argmax(live, axis=-1), 0)
  last = jnp.where(live.any(-1), m - jnp.argmax(live[..., ::-1], axis=-1), 0)
  return first.astype(jnp.int32), last.astype(jnp.int32)


def tile_ranges(kinds_BxNxM):
  """Per row of tiles, int32 [B, N, 4]: first, full_first, full_end, end. [first, end)
  holds every non-SKIP tile (block_ranges); [full_first, full_end) inside it is the run
  from the first FULL tile to the last when no other kind lies between them, else empty
  (end, end). A kernel runs its tiles in three loops, the middle one without the mask."""
  first, end = block_ranges(kinds_BxNxM)
  m = kinds_BxNxM.shape[-1]
  full = kinds_BxNxM == FULL
  count = full.sum(-1)
  lo = jnp.argmax(full, axis=-1)
  hi = m - jnp.argmax(full[..., ::-1], axis=-1)
  run = (count > 0) & (count == hi - lo)
  full_first, full_end = jnp.where(run, lo, end), jnp.where(run, hi, end)
  return jnp.stack([first, full_first, full_end, end], axis=-1).astype(jnp.int32)
