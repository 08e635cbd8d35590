"""The cheap prepass of the fused kernels: which (query block, key block) tiles can
be skipped, which are fully visible (no mask needed) and which need the per-token
mask, computed from per-block summaries of the segment ids and prefix flags.

Per token the kernels read one int32 `code = 2 * segment_id + in_prefix`; a key
j is visible to query i iff codes' segments are equal and non-zero and (j <= i or
both are in the prefix) -- the rule of mask.visibility_BxTxS.

A tile is SKIP only when no pair in it can be visible (sound, not exact: the
kernel still masks partial tiles token by token), FULL only when every pair is
visible.
"""

import jax.numpy as jnp

SKIP, PARTIAL, FULL = 0, 1, 2


def token_codes(segment_ids_BxT, prefix_BxT, batch, length):
  """int32 [B, T]: 2 * segment + prefix bit (segment 1 everywhere when None)."""
  seg = (jnp.ones((batch, length), jnp.int32) if segment_ids_BxT is None
         else segment_ids_BxT.astype(jnp.int32))
  pre = (jnp.zeros((batch, length), jnp.int32) if prefix_BxT is None
         else (prefix_BxT != 0).astype(jnp.int32))
  return 2 * seg + pre


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
