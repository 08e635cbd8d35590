"""Which keys each query may attend to, computed from per-token indices.

Shapes: B batch, T query length, S key length (T == S for self-attention).
"""

import jax.numpy as jnp


def softmax_dtype(dtype):
  """float32 for bf16 / f32 inputs (logits, softmax and losses never go below it);
  float64 for float64 inputs (exactness tests under jax_enable_x64)."""
  return jnp.promote_types(dtype, jnp.float32)


def visibility_BxTxS(segment_ids_BxT=None, prefix_BxT=None, *, causal=True,
                     length=None):
  """Boolean mask: key j is visible to query i.

  The rule (DESIGN.md, "Attention"): j is visible to i iff both tokens are in
  the same non-zero segment and (j <= i, or both are in the prefix). Without
  `causal` every key of the same segment is visible. `segment_ids` None means
  one segment covering the whole row; `prefix` None means no prefix.

  Worked example: one row packing two documents, the first a prefix-LM example
  with a 2-token prefix, the second a plain causal one, then one pad token::

      segment_ids = [1, 1, 1, 1, 2, 2, 0]
      prefix      = [1, 1, 0, 0, 1, 0, 0]     (t5x `decoder_causal_attention`)

      query \\ key  0 1 2 3 4 5 6
          0         1 1 . . . . .    prefix token: sees the whole prefix
          1         1 1 . . . . .
          2         1 1 1 . . . .    target token: causal within its segment
          3         1 1 1 1 . . .
          4         . . . . 1 . .    new segment: nothing from segment 1
          5         . . . . 1 1 .
          6         . . . . . . .    padding (segment 0) sees nothing

  A fully masked row (padding) is all False; attention returns 0 there.
  """
  if segment_ids_BxT is None and prefix_BxT is None and length is None:
    raise ValueError("visibility_BxTxS needs segment_ids, prefix or length.")
  if segment_ids_BxT is None:
    batch = 1 if prefix_BxT is None else prefix_BxT.shape[0]
    length = length if prefix_BxT is None else prefix_BxT.shape[1]
    segment_ids_BxT = jnp.ones((batch, length), jnp.int32)
  seg_q = segment_ids_BxT[:, :, None]
  seg_k = segment_ids_BxT[:, None, :]
  visible_BxTxS = (seg_q == seg_k) & (seg_q != 0)
  if causal:
    t = segment_ids_BxT.shape[1]
    order_TxS = jnp.arange(t)[:, None] >= jnp.arange(t)[None, :]
    if prefix_BxT is not None:
      in_prefix = prefix_BxT.astype(bool)
      order_TxS = order_TxS[None] | (in_prefix[:, :, None] & in_prefix[:, None, :])
    visible_BxTxS = visible_BxTxS & order_TxS
  return visible_BxTxS


def distance_TxS(length):
  """|i - j| for ALiBi, as float32."""
  idx = jnp.arange(length, dtype=jnp.float32)
  return jnp.abs(idx[:, None] - idx[None, :])
