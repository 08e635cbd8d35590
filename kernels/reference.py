"""The attention oracle: plain jnp, float32 (float64 for float64 inputs) throughout, key/value heads repeated.

Slow and memory-hungry on purpose (it builds the full [B, H, T, S] logits); every
other implementation is tested against it.
"""

import jax.numpy as jnp

from bigsci_jax.kernels.mask import distance_TxS, softmax_dtype, visibility_BxTxS


def attention(q_BxTxHxK, k_BxSxGxK, v_BxSxGxK, *, segment_ids=None,
              prefix_mask=None, alibi_slopes=None, causal=True, sm_scale=None):
  b, t, h, d = q_BxTxHxK.shape
  g = k_BxSxGxK.shape[2]
  scale = d ** -0.5 if sm_scale is None else sm_scale
  wide = softmax_dtype(q_BxTxHxK.dtype)
  k_BxSxHxK = jnp.repeat(k_BxSxGxK, h // g, axis=2).astype(wide)
  v_BxSxHxK = jnp.repeat(v_BxSxGxK, h // g, axis=2).astype(wide)
  logits_BxHxTxS = jnp.einsum(
      "bthd,bshd->bhts", q_BxTxHxK.astype(wide), k_BxSxHxK) * scale
  if alibi_slopes is not None:
    slopes_H = jnp.asarray(alibi_slopes, wide)
    logits_BxHxTxS -= slopes_H[None, :, None, None] * distance_TxS(t)[None, None]
  visible_BxTxS = visibility_BxTxS(segment_ids, prefix_mask, causal=causal, length=t)
  visible_BxHxTxS = jnp.broadcast_to(visible_BxTxS[:, None], logits_BxHxTxS.shape)
  logits_BxHxTxS = jnp.where(visible_BxHxTxS, logits_BxHxTxS, -jnp.inf)
  row_max = jnp.max(logits_BxHxTxS, axis=-1, keepdims=True)
  row_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)
  weights = jnp.where(visible_BxHxTxS, jnp.exp(logits_BxHxTxS - row_max), 0.0)
  denom = jnp.sum(weights, axis=-1, keepdims=True)
  probs_BxHxTxS = weights / jnp.where(denom > 0, denom, 1.0)
  out_BxTxHxK = jnp.einsum("bhts,bshd->bthd", probs_BxHxTxS, v_BxSxHxK)
  return out_BxTxHxK.astype(q_BxTxHxK.dtype)
