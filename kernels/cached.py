"""Attention of new queries over a decoding cache (KV cache), in plain jnp.

Queries [B, T, H, K] at `query_positions`; cache slots [B, G, S, K] holding keys
at `key_positions` [B, S] (-1: empty or padding). Heads come before slots so that
the slots and the head dimension are the two minor axes, whatever the number of
heads per device (on TPU a few heads there would be padded to a tile and the
compiler would copy the cache to another layout). Key j is visible to query i iff it
holds a real token and (pos_j <= pos_i, or both are in the prompt prefix of a
prefix LM): the same rule as training's packed masks, expressed by positions.
"""

import jax
import jax.numpy as jnp

from bigsci_jax.kernels.mask import softmax_dtype


def cached_attention(q_BxTxHxK, k_BxGxSxK, v_BxGxSxK, *, query_positions, key_positions,
                     query_prefix=None, key_prefix=None, alibi_slopes=None, sm_scale=None):
  b, t, h, d = q_BxTxHxK.shape
  g = k_BxGxSxK.shape[1]
  wide = softmax_dtype(q_BxTxHxK.dtype)
  scale = d ** -0.5 if sm_scale is None else sm_scale
  q_BxTxGxRxK = q_BxTxHxK.reshape(b, t, g, h // g, d)
  logits_BxGxRxTxS = jnp.einsum("btgrd,bgsd->bgrts", q_BxTxGxRxK, k_BxGxSxK,
                                preferred_element_type=wide) * scale
  qpos_BxTx1, kpos_Bx1xS = query_positions[:, :, None], key_positions[:, None, :]
  if alibi_slopes is not None:
    slopes_GxR = jnp.asarray(alibi_slopes, wide).reshape(g, h // g)
    distance_BxTxS = jnp.abs(qpos_BxTx1 - kpos_Bx1xS).astype(wide)
    logits_BxGxRxTxS -= slopes_GxR[None, :, :, None, None] * distance_BxTxS[:, None, None]
  visible_BxTxS = (kpos_Bx1xS >= 0) & (kpos_Bx1xS <= qpos_BxTx1)
  if query_prefix is not None and key_prefix is not None:
    visible_BxTxS |= (kpos_Bx1xS >= 0) & query_prefix[:, :, None] & key_prefix[:, None, :]
  visible = visible_BxTxS[:, None, None]
  logits_BxGxRxTxS = jnp.where(visible, logits_BxGxRxTxS, -jnp.inf)
  probs = jax.nn.softmax(logits_BxGxRxTxS, axis=-1)
  probs = jnp.where(jnp.any(visible, axis=-1, keepdims=True), probs, 0.0)
  out_BxTxGxRxK = jnp.einsum("bgrts,bgsd->btgrd", probs.astype(v_BxGxSxK.dtype), v_BxGxSxK,
                             preferred_element_type=wide)
  return out_BxTxGxRxK.reshape(b, t, h, d).astype(q_BxTxHxK.dtype)
