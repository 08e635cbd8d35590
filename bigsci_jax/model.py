"""Decoder-only and prefix-LM transformer in Flax linen.

Dimension legend (suffixes on tensor names):
  B batch   L length   D d_model   H query heads   G key/value heads
  K head dim   F ffn hidden   V vocab

Parameters carry logical axis names (`embed`, `mlp`, `heads`, `kv_heads`, `kv`,
`vocab`, `layers`); sharding.py maps them to mesh axes. Activations are
constrained only at block boundaries, through `sharding.constrain`.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from bigsci_jax import kernels, kv_cache
from bigsci_jax.config import ModelConfig
from bigsci_jax.kernels.mask import softmax_dtype
from bigsci_jax.sharding import batch_shards, constrain, offloaded, reshard

SOFT_PROMPT = "soft_prompt"  # the params entry of an attached soft prompt [P, D]


def soft_prompt_ids(params):
  """The token ids standing for the virtual tokens of the soft prompt attached to params
  (-1, -2, ..., -P), to put after BOS in every row; [] when none is attached."""
  if SOFT_PROMPT not in params:
    return []
  return [-1 - i for i in range(params[SOFT_PROMPT].shape[0])]


def _to_device(tree):
  """Inside jit: copies of the arrays in device memory (a no-op for arrays already there)."""
  return jax.tree.map(lambda x: jax.device_put(x, jax.memory.Space.Device), tree)


def fetched(module_class, offload):
  """module_class, or for offload="host" the class whose parameters are copied from host
  to device memory each time it runs (so only the running module's weights occupy the
  device: inside the layer scan, one layer's). The layer blocks are wrapped: they hold
  every weight that sharding.offloaded puts in host memory."""
  if offload == "none":
    return module_class
  return nn.map_variables(module_class, "params", trans_in_fn=_to_device)


def compute_dtype(cfg: ModelConfig):
  """The activations' dtype: float64 only for exactness tests (needs jax_enable_x64)."""
  if cfg.dtype == "auto":
    return jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16
  return jnp.dtype(cfg.dtype)


def _init(cfg, axes, scale=1.0):
  return nn.with_logical_partitioning(nn.initializers.normal(cfg.init_std * scale), axes)


def _zeros(axes):
  return nn.with_logical_partitioning(nn.initializers.zeros_init(), axes)


def _norm(cfg, name):
  dtype, pdtype = compute_dtype(cfg), jnp.dtype(cfg.param_dtype)
  scale_init = nn.with_logical_partitioning(nn.initializers.ones_init(), ("embed",))
  if cfg.norm == "rmsnorm":
    return nn.RMSNorm(epsilon=cfg.norm_eps, dtype=dtype, param_dtype=pdtype,
                      scale_init=scale_init, name=name)
  return nn.LayerNorm(epsilon=cfg.norm_eps, dtype=dtype, param_dtype=pdtype,
                      scale_init=scale_init, bias_init=_zeros(("embed",)), name=name)


def sinusoidal_BxLxD(positions_BxL, d_model):
  """Vaswani et al.'s fixed encoding: sin on the first half, cos on the second."""
  half = d_model // 2
  inv_freq = 1.0 / (10000.0 ** (jnp.arange(half, dtype=jnp.float32) / half))
  angle_BxLxh = positions_BxL[..., None].astype(jnp.float32) * inv_freq
  enc = jnp.concatenate([jnp.sin(angle_BxLxh), jnp.cos(angle_BxLxh)], axis=-1)
  return jnp.pad(enc, ((0, 0), (0, 0), (0, d_model - 2 * half)))


def rotary(x_BxLxNxK, positions_BxL, theta):
  """RoFormer rotary embedding, rotating (first half, second half) pairs, in f32."""
  half = x_BxLxNxK.shape[-1] // 2
  inv_freq = 1.0 / (theta ** (jnp.arange(half, dtype=jnp.float32) / half))
  angle_BxLx1xh = (positions_BxL[..., None].astype(jnp.float32) * inv_freq)[:, :, None, :]
  cos, sin = jnp.cos(angle_BxLx1xh), jnp.sin(angle_BxLx1xh)
  x1, x2 = jnp.split(x_BxLxNxK.astype(jnp.float32), 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x_BxLxNxK.dtype)


class Linear(nn.Module):
  """y = x . W + b, contracting x's trailing len(in_shape) axes with W's leading ones.

  `axes` names the kernel's logical axes (in_shape + out_shape); the bias takes
  the output ones. Residual output projections pass `init_scale` (GPT-2's
  1 / sqrt(2 * num_layers)).
  """
  cfg: ModelConfig
  in_shape: tuple
  out_shape: tuple
  axes: tuple
  init_scale: float = 1.0

  @nn.compact
  def __call__(self, x):
    cfg, dtype = self.cfg, compute_dtype(self.cfg)
    kernel = self.param("kernel", _init(cfg, self.axes, self.init_scale),
                        tuple(self.in_shape) + tuple(self.out_shape), jnp.dtype(cfg.param_dtype))
    n_in = len(self.in_shape)
    contract = (tuple(range(x.ndim - n_in, x.ndim)), tuple(range(n_in)))
    y = jax.lax.dot_general(x.astype(dtype), kernel.astype(dtype), (contract, ((), ())))
    if cfg.use_bias:
      bias = self.param("bias", _zeros(self.axes[n_in:]), tuple(self.out_shape),
                        jnp.dtype(cfg.param_dtype))
      y = y + bias.astype(dtype)
    return y


class Attention(nn.Module):
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_BxLxD, positions_BxL, segment_ids_BxL, prefix_BxL, decode=False,
               layer=None, reads=None, cache_rows=None):
    cfg = self.cfg
    d, h, g, k = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    q_BxLxHxK = Linear(cfg, (d,), (h, k), ("embed", "heads", "kv"), name="query")(x_BxLxD)
    k_BxLxGxK = Linear(cfg, (d,), (g, k), ("embed", "kv_heads", "kv"), name="key")(x_BxLxD)
    v_BxLxGxK = Linear(cfg, (d,), (g, k), ("embed", "kv_heads", "kv"), name="value")(x_BxLxD)
    if cfg.position == "rotary":
      q_BxLxHxK = rotary(q_BxLxHxK, positions_BxL, cfg.rope_theta)
      k_BxLxGxK = rotary(k_BxLxGxK, positions_BxL, cfg.rope_theta)
    if decode:
      out_BxLxHxK = self._cached(layer, reads, cache_rows, q_BxLxHxK, k_BxLxGxK, v_BxLxGxK,
                                 positions_BxL, segment_ids_BxL, prefix_BxL)
    else:
      out_BxLxHxK = kernels.attention(
          q_BxLxHxK, k_BxLxGxK, v_BxLxGxK, segment_ids=segment_ids_BxL,
          prefix_mask=prefix_BxL if cfg.mask == "prefix" else None,
          alibi_slopes=cfg.alibi_slopes if cfg.position == "alibi" else None,
          causal=True, impl=cfg.attention_impl)
    return Linear(cfg, (h, k), (d,), ("heads", "kv", "embed"), (2 * cfg.num_layers) ** -0.5,
                  name="out")(out_BxLxHxK)


  def _cached(self, layer, reads, cache_rows, q_BxTxHxK, k_BxTxGxK, v_BxTxGxK, positions_BxT,
              segment_ids_BxT, prefix_BxT):
    """Decoding: append this call's keys / values to the cache ("cache" collection,
    max_len slots per row) and attend over its first `reads` slots (None: all), which
    must hold every filled one: key j is visible to query i iff j holds a real token
    and (pos_j <= pos_i, or both are in the prompt prefix of a prefix LM). Each row
    fills its slots in order from its own `index` (rows of a server's batch join at
    different times) up to its last real token; positions come per token. `layer`: this layer's row of the
    stacked cache the layer scan carries (None: the cache variables are this layer's).
    cache_rows [B]: the cache rows the call's rows are (default: kv_cache.Entry's step rows)."""
    cfg = self.cfg
    b, t = q_BxTxHxK.shape[:2]
    g, k = k_BxTxGxK.shape[2:]
    variables = {
        "keys": (2, jnp.zeros, (b, g, cfg.max_len, k), k_BxTxGxK.dtype),
        "values": (2, jnp.zeros, (b, g, cfg.max_len, k), v_BxTxGxK.dtype),
        "positions": (1, lambda: jnp.full((b, cfg.max_len), -1, jnp.int32)),
        "prefix": (1, lambda: jnp.zeros((b, cfg.max_len), jnp.bool_)),
        "index": (None, lambda: jnp.zeros((b,), jnp.int32))}
    variables = {name: (self.variable("cache", name, *spec[1:]), spec[0])
                 for name, spec in variables.items()}
    rows = variables["index"][0].value.shape[-1]  # the cache's (a server's: its most)
    if b > rows:
      raise ValueError(f"a decoding call of {b} rows on a cache of {rows}.")
    shards = batch_shards()
    blocks = shards if rows % shards == 0 and b % shards == 0 else 1
    keys, values, pos, prefix, index = (
        kv_cache.Entry(variable, layer, slot_axis, b, blocks, cache_rows)
        for variable, slot_axis in variables.values())
    real_BxT = (segment_ids_BxT > 0) if segment_ids_BxT is not None else jnp.ones((b, t), bool)
    in_prefix_BxT = (prefix_BxT > 0) & real_BxT if (cfg.mask == "prefix" and prefix_BxT is not None) \
        else jnp.zeros((b, t), bool)
    at_B = index.read()
    keys.write(k_BxTxGxK.transpose(0, 2, 1, 3), at_B)
    values.write(v_BxTxGxK.transpose(0, 2, 1, 3), at_B)
    pos.write(jnp.where(real_BxT, positions_BxT, -1).astype(jnp.int32), at_B)
    prefix.write(in_prefix_BxT, at_B)
    # the index moves past the row's last real token: a left-padded prefill's whole width,
    # a chunk's tokens (right-padded), nothing for a row with none (it keeps its slots)
    index.set(at_B + jnp.max(jnp.where(real_BxT, jnp.arange(1, t + 1), 0), axis=1))
    return kernels.cached_attention(
        q_BxTxHxK, keys.read(reads), values.read(reads), query_positions=positions_BxT,
        key_positions=pos.read(reads), query_prefix=in_prefix_BxT, key_prefix=prefix.read(reads),
        alibi_slopes=cfg.alibi_slopes if cfg.position == "alibi" else None)


class Mlp(nn.Module):
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_BxLxD):
    cfg = self.cfg
    up = functools.partial(Linear, cfg, (cfg.d_model,), (cfg.d_ff,), ("embed", "mlp"))
    if cfg.activation in ("geglu", "swiglu"):  # Shazeer 2020: two separate input kernels
      gate = jax.nn.gelu if cfg.activation == "geglu" else jax.nn.silu
      h_BxLxF = gate(up(name="wi_gate")(x_BxLxD)) * up(name="wi_up")(x_BxLxD)
    elif cfg.activation == "relu2":  # So et al. 2021, Primer
      h_BxLxF = jnp.square(jax.nn.relu(up(name="wi")(x_BxLxD)))
    else:
      h_BxLxF = jax.nn.gelu(up(name="wi")(x_BxLxD))
    return Linear(cfg, (cfg.d_ff,), (cfg.d_model,), ("mlp", "embed"), (2 * cfg.num_layers) ** -0.5,
                  name="wo")(h_BxLxF)


WHOLE = ("batch", "length", "act_embed")  # [B, L, D] with its length whole on every device


def residual_axes(cfg):
  """The logical layout of the residual stream [B, L, D] between blocks: with
  cfg.sequence_parallel its length is split over tensor (rule "act_length")."""
  return ("batch", "act_length", "act_embed") if cfg.sequence_parallel else WHOLE


def _whole(cfg, x_BxLxD):
  """A sequence-parallel model's norm output gathered along its length, the input the
  tensor-parallel projections need (its gradient reduce-scattered back); as it is
  otherwise. Megatron-SP's operator g."""
  return reshard(x_BxLxD, WHOLE, residual_axes(cfg)) if cfg.sequence_parallel else x_BxLxD


def _split(cfg, y_BxLxD):
  """A tensor-parallel projection's output (a partial sum over tensor) reduce-scattered
  along its length for a sequence-parallel model instead of all-reduced whole (its
  gradient gathered whole); as it is otherwise. Megatron-SP's operator g-bar."""
  return reshard(y_BxLxD, residual_axes(cfg), WHOLE) if cfg.sequence_parallel else y_BxLxD


class Block(nn.Module):
  """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x)).

  cfg.sequence_parallel (Korthikanti et al. 2022): x arrives split along its length over
  tensor; each norm runs on its shard, its output is gathered whole for the projections
  and their outputs are reduce-scattered back: Megatron's all-reduce of a projection's
  output in its two halves, the same bytes, with the norms, dropout, residual adds and
  what remat keeps between blocks at 1 / tensor of their size per device."""
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_BxLxD, positions_BxL, segment_ids_BxL, prefix_BxL, deterministic,
               decode=False, layer=None, reads=None, cache_rows=None):
    cfg = self.cfg
    drop = nn.Dropout(cfg.dropout, broadcast_dims=(), deterministic=deterministic)
    h = Attention(cfg, name="attention")(_whole(cfg, _norm(cfg, "attention_norm")(x_BxLxD)),
                                         positions_BxL, segment_ids_BxL, prefix_BxL, decode,
                                         layer, reads, cache_rows)
    x_BxLxD = x_BxLxD + drop(_split(cfg, h))
    h = Mlp(cfg, name="mlp")(_whole(cfg, _norm(cfg, "mlp_norm")(x_BxLxD)))
    x_BxLxD = constrain(x_BxLxD + drop(_split(cfg, h)), residual_axes(cfg))
    return x_BxLxD


class ScannedBlock(nn.Module):
  """A Block with the (carry, xs) -> (carry, ys) signature nn.scan needs."""
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_BxLxD, positions_BxL, segment_ids_BxL, prefix_BxL, deterministic,
               decode=False, reads=None, cache_rows=None, layer=None):
    x_BxLxD = _block_class(self.cfg)(self.cfg, name="block")(
        x_BxLxD, positions_BxL, segment_ids_BxL, prefix_BxL, deterministic, decode, layer, reads,
        cache_rows)
    return x_BxLxD, None


_REMAT_POLICIES = {
    "full": None,  # save nothing, recompute the whole block
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


def _block_class(cfg):
  if cfg.remat == "none":
    return Block
  return nn.remat(Block, policy=_REMAT_POLICIES[cfg.remat], static_argnums=(5, 6, 8))


def _lookup(table_NxD, ids_BxL, dtype, rows):
  """Rows of an embedding table for batch-sharded ids, in the block-boundary layout.

  The table is gathered over `embed` first, as FSDP gathers every weight (its `rows`
  axis keeps its sharding: a vocabulary split over tensor is looked up in parts and
  summed). Looked up in its stored layout, XLA's partitioner gave every device all
  rows of the micro-batch with the model dimension split over fsdp, and when data and
  fsdp were both > 1 reached the block layout only by replicating that [B, L, D] (and
  its gradient) over the whole mesh, across slices too. The gathered table and its
  gradient cost BLOOM-176B 0.7-0.8 GiB more per chip with data = 1 and up to 2.5 GiB
  across two slices (benchmarks/RESULTS.md)."""
  table_NxD = constrain(table_NxD.astype(dtype), (rows, None))
  return constrain(jnp.take(table_NxD, ids_BxL, axis=0), WHOLE)


class Transformer(nn.Module):
  """tokens [B, L] -> float32 logits [B, L, V].

  positions: per-token position within its document (packing restarts it);
  segment_ids: document id per token, 0 = padding; prefix: 1 on the
  bidirectional prefix (used only when cfg.mask == 'prefix'). A negative token
  -1 - i is virtual token i of a soft prompt attached to the params
  (adapt.soft_prompt). decode: append to the KV cache ("cache" collection, mutable)
  and attend over it; `reads`: only its first `reads` slots per row, which must hold
  every filled one (a cheaper step early in a long window); `cache_rows` [B]: the cache
  rows the call's rows are (default: the first ones, kv_cache.Entry). hidden: the
  final norm's output [B, L, D] instead of the logits (head_logits and over_logits turn
  some or all of its columns into logits).

  offload="host": the layers' weight matrices stay in host memory (the caller places
  them there: sharding.offloaded, `offload_params`) and the layer scan copies one
  layer's weights to the device per iteration, so a model larger than device memory
  still runs, at the cost of reading every weight over the host link on every call.
  For inference; the parameter tree is the same either way.
  """
  cfg: ModelConfig
  offload: str = "none"

  @nn.compact
  def __call__(self, tokens_BxL, positions_BxL=None, segment_ids_BxL=None, prefix_BxL=None,
               deterministic=True, decode=False, reads=None, cache_rows=None, hidden=False):
    cfg = self.cfg
    dtype = compute_dtype(cfg)
    if positions_BxL is None:
      positions_BxL = jnp.broadcast_to(jnp.arange(tokens_BxL.shape[1]), tokens_BxL.shape)
    embed = nn.Embed(cfg.vocab_size, cfg.d_model, dtype=dtype, param_dtype=jnp.dtype(cfg.param_dtype),
                     embedding_init=_init(cfg, ("vocab", "embed")), name="embed")
    # Negative ids are soft-prompt slots (adapt.soft_prompt): slot -1 - i takes row i of the
    # `soft_prompt` parameter, present only when a tuned prompt is attached to the params.
    x_BxLxD = _lookup(embed.embedding, jnp.maximum(tokens_BxL, 0), dtype, "vocab")
    if self.has_variable("params", SOFT_PROMPT):
      prompt_PxD = self.get_variable("params", SOFT_PROMPT).astype(dtype)
      slot_BxL = jnp.clip(-tokens_BxL - 1, 0, prompt_PxD.shape[0] - 1)
      x_BxLxD = jnp.where((tokens_BxL < 0)[..., None], prompt_PxD[slot_BxL], x_BxLxD)
    if cfg.position == "learned":
      pos_embed = nn.Embed(cfg.max_len, cfg.d_model, dtype=dtype, param_dtype=jnp.dtype(cfg.param_dtype),
                           embedding_init=_init(cfg, ("position", "embed")), name="pos_embed")
      x_BxLxD = x_BxLxD + _lookup(pos_embed.embedding, jnp.maximum(positions_BxL, 0), dtype,
                                  "position")
    elif cfg.position == "sinusoidal":
      enc_BxLxD = sinusoidal_BxLxD(positions_BxL, cfg.d_model // cfg.sinusoid_tiles)
      x_BxLxD = x_BxLxD + jnp.tile(enc_BxLxD, (1, 1, cfg.sinusoid_tiles)).astype(dtype)
    # Looked up whole (a vocabulary split over tensor is looked up in parts and summed:
    # looked up split along the length, the partitioner gathered the whole table instead).
    x_BxLxD = _split(cfg, x_BxLxD)
    # A zero-valued hook: gradients w.r.t. it are gradients w.r.t. the input embeddings.
    x_BxLxD = self.perturb("input_embeddings", x_BxLxD)
    if cfg.embedding_norm:
      x_BxLxD = _norm(cfg, "embed_norm")(x_BxLxD)
    x_BxLxD = nn.Dropout(cfg.dropout, deterministic=deterministic)(x_BxLxD)
    x_BxLxD = constrain(x_BxLxD, residual_axes(cfg))

    offload = "none" if self.is_initializing() else self.offload  # init creates, not reads
    if cfg.scan_layers:
      # Decoding carries the layers' stacked cache through the scan (each layer updates
      # its row in place); init creates it as scanned variables, one row per layer.
      carry = decode and not self.is_initializing()
      stack = nn.scan(fetched(ScannedBlock, offload),
                      variable_axes={"params": 0} if carry else {"params": 0, "cache": 0},
                      variable_carry="cache" if carry else False,
                      split_rngs={"params": True, "dropout": True},
                      in_axes=(nn.broadcast,) * 7 + (0,), length=cfg.num_layers,
                      metadata_params={nn.PARTITION_NAME: "layers"})
      layer_L = jnp.arange(cfg.num_layers) if carry else None
      x_BxLxD, _ = stack(cfg, name="layers")(x_BxLxD, positions_BxL, segment_ids_BxL, prefix_BxL,
                                              deterministic, decode, reads, cache_rows, layer_L)
    else:
      for i in range(cfg.num_layers):
        x_BxLxD = fetched(_block_class(cfg), offload)(cfg, name=f"layer_{i}")(
            x_BxLxD, positions_BxL, segment_ids_BxL, prefix_BxL, deterministic, decode, None,
            reads, cache_rows)

    x_BxLxD = _whole(cfg, _norm(cfg, "final_norm")(x_BxLxD))
    weight = embed.embedding if cfg.tie_embeddings else self.param(
        "head", _init(cfg, ("embed", "vocab")), (cfg.d_model, cfg.vocab_size),
        jnp.dtype(cfg.param_dtype))
    return x_BxLxD if hidden else _project(cfg, x_BxLxD, weight)


def _project(cfg, x_BxLxD, weight):
  """The output head: the tied embedding table [V, D] or the untied head [D, V]."""
  dtype = compute_dtype(cfg)
  spec = "bld,vd->blv" if cfg.tie_embeddings else "bld,dv->blv"
  logits_BxLxV = jnp.einsum(spec, x_BxLxD.astype(dtype), weight.astype(dtype),
                            preferred_element_type=softmax_dtype(dtype))
  return constrain(logits_BxLxV, ("batch", "length", "vocab"))


def head_weight(cfg, params):
  """The output head's weight in params: the embedding table [V, D] when tied, else
  the head [D, V]."""
  return nn.meta.unbox(params["embed"]["embedding"] if cfg.tie_embeddings else params["head"])


def head_logits(cfg, params, x_BxLxD):
  """Final hidden states (Transformer(..., hidden=True)) of any columns -> their logits
  [B, L, V], as the full call computes them."""
  return _project(cfg, x_BxLxD, head_weight(cfg, params))


def over_logits(cfg, params, x_BxLxD, fn, *columns_BxL):
  """fn(logits_BxCxV, *columns_BxC) -> arrays [B, C, ...], evaluated on the logits of
  the hidden states x_BxLxD cfg.logits_chunk columns at a time (0: all at once) and
  joined back to [B, L, ...]: only one chunk's logits exist at a time, in the forward
  and, recomputed, in the backward pass (a large vocabulary's [B, L, V] logits are
  the largest activation of a small model). A last short chunk is padded (fn must
  not mix columns)."""
  chunk = cfg.logits_chunk
  length = x_BxLxD.shape[1]
  if not chunk or chunk >= length:
    return fn(head_logits(cfg, params, x_BxLxD), *columns_BxL)
  weight = head_weight(cfg, params)
  # Gathered over fsdp once, not in every chunk (the logits' own layout otherwise).
  weight = constrain(weight, ("vocab", None) if cfg.tie_embeddings else (None, "vocab"))
  count = -(-length // chunk)

  def chunks(a_BxL):  # [B, L, ...] -> [N, B, C, ...]
    pad = [(0, 0), (0, count * chunk - length)] + [(0, 0)] * (a_BxL.ndim - 2)
    a = jnp.pad(a_BxL, pad).reshape((a_BxL.shape[0], count, chunk) + a_BxL.shape[2:])
    return jnp.moveaxis(a, 1, 0)

  @jax.checkpoint
  def one(args):
    x_BxCxD, *cols = args
    return fn(_project(cfg, x_BxCxD, weight), *cols)

  out = jax.lax.map(one, (chunks(x_BxLxD),) + tuple(chunks(c) for c in columns_BxL))

  def joined(a_NxBxC):
    a = jnp.moveaxis(a_NxBxC, 0, 1)
    return a.reshape((a.shape[0], count * chunk) + a.shape[3:])[:, :length]
  return jax.tree.map(joined, out)


def offload_params(params, offload):
  """Concrete params placed where Transformer(cfg, offload) expects them: as they are for
  "none"; for "host", copies in pinned host memory with the same sharding."""
  if offload == "none":
    return params
  default = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  shardings = jax.tree.map(lambda x: getattr(x, "sharding", None) or default, params)
  return jax.device_put(params, offloaded(shardings, offload))


def init_params(model: Transformer, key, length=8):
  """Unsharded float parameters as a plain pytree (tests, notebooks, small models).

  Large models are initialised sharded by step.init_state instead.
  """
  tokens_1xL = jnp.zeros((1, length), jnp.int32)
  return nn.meta.unbox(model.init({"params": key}, tokens_1xL)["params"])
