"""`attention(q, k, v, ..., impl=)`: the implementations by name, and what `auto` picks."""

import jax.numpy as jnp

from bigsci_jax.kernels import cudnn, pallas_gpu, pallas_tpu, partition, reference, xla

IMPLS = ("auto", "reference", "xla", "cudnn", "pallas_gpu", "pallas_tpu")
_FUNCTIONS = {"reference": reference.attention, "xla": xla.attention, "cudnn": cudnn.attention,
              "pallas_gpu": pallas_gpu.attention, "pallas_tpu": pallas_tpu.attention}


def auto_impl(platform=None, *, plain_causal=False, head_dim=128, dtype=None):
  """What impl='auto' runs on a platform (default: the one being compiled for), for
  attention of this kind (plain_causal: causal, no segments, prefix or ALiBi).

  TPU: pallas_tpu (Mosaic-compiled for v5e / v5p / v6e; the XLA path does not fit
  long sequences). CPU: xla (the Pallas kernels only run interpreted there). GPU, as
  measured on an H100 (benchmarks/RESULTS.md, "Attention kernels"): cuDNN for plain
  causal attention in bf16 / f16 (about 1.5x pallas_gpu there), pallas_gpu for
  everything else it takes (power-of-two head dims: packed, prefix and ALiBi, where
  cuDNN must materialise a bias and mask; 1.2x to 7x faster than cuDNN, 4x to 23x
  than xla, which runs out of memory first), xla otherwise.
  """
  platform = platform or partition.target()[0]
  if platform == "tpu":
    return "pallas_tpu"
  if platform != "gpu":
    return "xla"
  half = dtype is not None and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16)
  if plain_causal and half and head_dim <= 128 and head_dim % 8 == 0:
    return "cudnn"
  return "pallas_gpu" if head_dim & (head_dim - 1) == 0 else "xla"


def attention(q, k, v, *, segment_ids=None, prefix_mask=None, alibi_slopes=None,
              causal=True, sm_scale=None, impl="auto"):
  """Multi-head attention with packed, causal and prefix-LM masks and ALiBi.

  q: [B, T, H, K]; k, v: [B, T, G, K] with G dividing H (grouped-query).
  segment_ids: int [B, T], 0 = padding (None: one segment per row).
  prefix_mask: [B, T], 1 on each segment's bidirectional prefix (None: none).
  alibi_slopes: [H] floats; adds -slope[h] * |i - j| to the logits.
  A key j is visible to query i iff both are in the same non-zero segment and
  (j <= i or both are in the prefix); a query that sees no key returns 0.
  Returns [B, T, H, K] in q's dtype.

  impl: `reference` (the jnp oracle), `xla` (materialised mask and bias), `cudnn`
  (jax.nn.dot_product_attention's cuDNN path, GPU only), `pallas_tpu` / `pallas_gpu`
  (the fused Pallas kernels, forward and backward: Mosaic / Triton on their
  hardware, interpret mode elsewhere; under a mesh they wrap themselves in
  shard_map), `auto` (auto_impl()).
  """
  if impl not in IMPLS:
    raise ValueError(f"attention impl={impl!r} is not one of {', '.join(IMPLS)}.")
  h, g = q.shape[2], k.shape[2]
  if h % g:
    raise ValueError(f"attention: {h} query heads are not a multiple of {g} key/value heads.")
  if impl == "auto":
    plain = causal and segment_ids is None and prefix_mask is None and alibi_slopes is None
    impl = auto_impl(plain_causal=plain, head_dim=q.shape[3], dtype=q.dtype)
  fn = _FUNCTIONS[impl]
  return fn(q, k, v, segment_ids=segment_ids, prefix_mask=prefix_mask,
            alibi_slopes=alibi_slopes, causal=causal, sm_scale=sm_scale)

