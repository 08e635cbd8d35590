"""Attention for XLA on any backend: grouped heads without repeating k/v.

Logits and softmax in float32, or float64 for float64 inputs (matmuls accumulate in float32 from the compute
dtype); probabilities are cast to the value dtype for the second matmul. Memory
is O(T*S) per head, so long sequences want a fused kernel instead.
"""

import jax
import jax.numpy as jnp

from bigsci_jax.kernels.mask import distance_TxS, softmax_dtype, visibility_BxTxS

_MASKED = -0.7 * float(jnp.finfo(jnp.float32).max)  # finite: keeps gradients NaN-free


def attention(q_BxTxHxK, k_BxSxGxK, v_BxSxGxK, *, segment_ids=None,
              prefix_mask=None, alibi_slopes=None, causal=True, sm_scale=None):
  b, t, h, d = q_BxTxHxK.shape
  g = k_BxSxGxK.shape[2]
  r = h // g  # query heads per key/value head
  scale = d ** -0.5 if sm_scale is None else sm_scale
  wide = softmax_dtype(q_BxTxHxK.dtype)
  q_BxTxGxRxK = q_BxTxHxK.reshape(b, t, g, r, d)
  logits_BxGxRxTxS = jnp.einsum(
      "btgrd,bsgd->bgrts", q_BxTxGxRxK, k_BxSxGxK,
      preferred_element_type=wide) * scale
  if alibi_slopes is not None:
    slopes_GxR = jnp.asarray(alibi_slopes, wide).reshape(g, r)
    logits_BxGxRxTxS -= slopes_GxR[None, :, :, None, None] * distance_TxS(t)
  visible_BxTxS = visibility_BxTxS(segment_ids, prefix_mask, causal=causal, length=t)
  visible_Bx1x1xTxS = visible_BxTxS[:, None, None]
  logits_BxGxRxTxS = jnp.where(visible_Bx1x1xTxS, logits_BxGxRxTxS, _MASKED)
  probs_BxGxRxTxS = jax.nn.softmax(logits_BxGxRxTxS, axis=-1)
  # A row with no visible key would otherwise average all values.
  any_visible_Bx1x1xTx1 = jnp.any(visible_Bx1x1xTxS, axis=-1, keepdims=True)
  probs_BxGxRxTxS = jnp.where(any_visible_Bx1x1xTx1, probs_BxGxRxTxS, 0.0)
  out_BxTxGxRxK = jnp.einsum(
      "bgrts,bsgd->btgrd", probs_BxGxRxTxS.astype(v_BxSxGxK.dtype), v_BxSxGxK,
      preferred_element_type=wide)
  return out_BxTxGxRxK.reshape(b, t, h, d).astype(q_BxTxHxK.dtype)
