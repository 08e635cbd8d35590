"""Attention through `jax.nn.dot_product_attention(implementation="cudnn")`: cuDNN's
fused flash attention on NVIDIA GPUs.

cuDNN takes no segment ids, prefix or ALiBi of its own here: packed or prefix-LM
masks and ALiBi are materialised as a [B, 1, T, T] mask and a [1, H, T, T] bias
(O(T^2) memory, the bias' gradient computed too: the cost the Pallas kernels
avoid). Plain causal attention uses cuDNN's own causal mask. Rows that see no
key (padding) are zeroed, as the contract says. GPU only: elsewhere jax raises.
"""

import jax
import jax.numpy as jnp

from bigsci_jax.kernels.mask import distance_TxS, visibility_BxTxS


def attention(q_BxTxHxK, k_BxSxGxK, v_BxSxGxK, *, segment_ids=None, prefix_mask=None,
              alibi_slopes=None, causal=True, sm_scale=None):
  t = q_BxTxHxK.shape[1]
  bias_1xHxTxS = None
  if alibi_slopes is not None:
    slopes_H = jnp.asarray(alibi_slopes, jnp.float32)
    bias_1xHxTxS = (-slopes_H[:, None, None] * distance_TxS(t)[None]).astype(q_BxTxHxK.dtype)[None]
  plain = segment_ids is None and prefix_mask is None
  visible_Bx1xTxS = None
  if not plain or not causal:
    visible_Bx1xTxS = visibility_BxTxS(segment_ids, prefix_mask, causal=causal, length=t)[:, None]
  out_BxTxHxK = jax.nn.dot_product_attention(
      q_BxTxHxK, k_BxSxGxK, v_BxSxGxK, bias=bias_1xHxTxS, mask=visible_Bx1xTxS,
      is_causal=plain and causal, scale=sm_scale, implementation="cudnn")
  if segment_ids is not None:
    seen_BxT = jnp.any(visible_Bx1xTxS[:, 0], axis=-1)
    out_BxTxHxK = jnp.where(seen_BxT[:, :, None, None], out_BxTxHxK, 0)
  return out_BxTxHxK.astype(q_BxTxHxK.dtype)
