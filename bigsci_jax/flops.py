"""Parameter and FLOP accounting: the one function training MFU and the scaling fits use.

Conventions for training FLOPs per token (forward + backward = 3 x forward):
  kaplan      6 N, N = non-embedding parameters (Kaplan et al. 2020), plus the
              attention context term 6 n_layer n_ctx d_attn if `attention`.
  chinchilla  Hoffmann et al. 2022, appendix F, counted op by op: embeddings,
              QKV, logits, softmax, attention over values, output projection,
              dense block, final logits; then x 3.
  porian      6 (N + N_head) with N_head the output head's V x D (Porian et al.
              2024: counting the last layer removes much of the Kaplan/Chinchilla
              gap), plus the attention context term.
"""

import dataclasses

from bigsci_jax.config import ModelConfig

CONVENTIONS = ("kaplan", "chinchilla", "porian")


@dataclasses.dataclass(frozen=True)
class ParamCounts:
  embedding: int       # token (+ learned position) embeddings
  non_embedding: int   # blocks, norms, biases
  head: int            # the output projection V x D (shared with the embedding when tied)
  total: int           # distinct parameters


def param_counts(cfg: ModelConfig) -> ParamCounts:
  d, f, v = cfg.d_model, cfg.d_ff, cfg.vocab_size
  qkv_out = d * cfg.head_dim * (2 * cfg.num_heads + 2 * cfg.num_kv_heads)
  ffn_kernels = 3 if cfg.activation in ("geglu", "swiglu") else 2
  mlp = ffn_kernels * d * f
  norm_params = d * (2 if cfg.norm == "layernorm" else 1)
  block = qkv_out + mlp + 2 * norm_params
  if cfg.use_bias:
    block += cfg.head_dim * (cfg.num_heads + 2 * cfg.num_kv_heads) + d  # q, k, v, out
    block += (ffn_kernels - 1) * f + d                                 # mlp in, out
  non_embedding = cfg.num_layers * block + norm_params * (1 + int(cfg.embedding_norm))
  embedding = v * d + (cfg.max_len * d if cfg.position == "learned" else 0)
  head = v * d
  total = embedding + non_embedding + (0 if cfg.tie_embeddings else head)
  return ParamCounts(embedding, non_embedding, head, total)


def flops_per_token(cfg: ModelConfig, seq_len: int, convention: str = "chinchilla",
                    attention: bool = True) -> float:
  """Training (forward + backward) FLOPs per token of a seq_len-long sequence."""
  if convention not in CONVENTIONS:
    raise ValueError(f"convention={convention!r} is not one of {', '.join(CONVENTIONS)}.")
  counts = param_counts(cfg)
  d_attn = cfg.num_heads * cfg.head_dim
  context = 6 * cfg.num_layers * seq_len * d_attn if attention else 0
  if convention == "kaplan":
    return 6.0 * counts.non_embedding + context
  if convention == "porian":
    return 6.0 * (counts.non_embedding + counts.head) + context
  d, f, v, t = cfg.d_model, cfg.d_ff, cfg.vocab_size, seq_len
  kv_attn = cfg.num_kv_heads * cfg.head_dim
  embeddings = 2 * v * d
  qkv = 2 * d * (d_attn + 2 * kv_attn)
  scores = 2 * t * d_attn
  softmax = 3 * cfg.num_heads * t
  reduce = 2 * t * d_attn
  project = 2 * d_attn * d
  ffn_kernels = 3 if cfg.activation in ("geglu", "swiglu") else 2
  dense = 2 * ffn_kernels * d * f
  attention_ops = qkv + project + ((scores + softmax + reduce) if attention else 0)
  logits = 2 * d * v
  forward = embeddings + cfg.num_layers * (attention_ops + dense) + logits
  return 3.0 * forward


# Dense bf16 peak FLOP/s per device, by jax device_kind prefix (vendor figures).
PEAK_FLOPS = (
    ("NVIDIA H200", 989e12), ("NVIDIA H100", 989e12), ("NVIDIA A100", 312e12),
    ("TPU v6", 918e12), ("TPU v5p", 459e12), ("TPU v5 lite", 197e12), ("TPU v5e", 197e12),
    ("TPU v4", 275e12),
)


def peak_flops(device_kind: str):
  """Per-device dense bf16 peak, or None where unknown (CPUs)."""
  for prefix, peak in PEAK_FLOPS:
    if device_kind.startswith(prefix):
      return peak
  return None
