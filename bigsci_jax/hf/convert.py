"""The library's parameters and ModelConfig as transformers' BLOOM and Llama, and back.

Pure numpy and dictionaries: no transformers, torch or jax here. A model is one of the
two architectures when its ModelConfig says so field by field (`architecture`); every
other model is refused with the one feature the target cannot express.

Tensor layouts. Ours: a Linear's kernel is [inputs..., outputs...] (query [D, H, K],
out [H, K, D], MLP [D, F] / [F, D]); layers stacked on a leading axis when scanned
(params["layers"]["block"]), else params["layer_<i>"]. transformers': nn.Linear weight
[out, in]. BLOOM fuses query, key and value into one [H * 3 * K, D] matrix, head by head
(each head's q, k, v rows together). Rotary needs no permutation: both sides rotate
(first half, second half) pairs of each head (transformers' rotate_half).
"""

import numpy as np

from bigsci_jax.config import ModelConfig, default_alibi_slopes

ARCHS = ("bloom", "llama")
CLASSES = {"bloom": "BloomForCausalLM", "llama": "LlamaForCausalLM"}


class ConversionError(ValueError):
  """The model cannot be converted as asked; the message says why and what to do."""


def _bloom_refusal(cfg: ModelConfig):
  """The first feature of cfg that transformers' BLOOM cannot express, or None."""
  checks = [
      (cfg.mask == "causal", "it is a prefix LM (BLOOM is causal only)"),
      (cfg.position == "alibi", f"its positions are {cfg.position!r} (BLOOM uses ALiBi)"),
      (cfg.activation == "gelu", f"its MLP is {cfg.activation!r} (BLOOM's is GELU)"),
      (cfg.norm == "layernorm", f"its norm is {cfg.norm!r} (BLOOM's is LayerNorm)"),
      (cfg.embedding_norm, "it has no embedding LayerNorm (BLOOM has one)"),
      (cfg.use_bias, "it has no biases (BLOOM's layers all have them)"),
      (cfg.tie_embeddings, "its output head is untied (BLOOM's is the embedding)"),
      (cfg.num_kv_heads == cfg.num_heads, "it uses grouped-query attention (BLOOM does not)"),
      (cfg.head_dim * cfg.num_heads == cfg.d_model,
       f"its head_dim {cfg.head_dim} x {cfg.num_heads} heads is not d_model {cfg.d_model}"),
      (cfg.d_ff == 4 * cfg.d_model, f"its d_ff {cfg.d_ff} is not 4 x d_model (BLOOM's MLP)"),
      (cfg.alibi_slopes is None or np.allclose(cfg.alibi_slopes,
                                               default_alibi_slopes(cfg.num_heads), rtol=1e-6),
       "its ALiBi slopes are not the standard ones of its head count (BLOOM computes them)"),
  ]
  return _first_unmet(checks)


def _llama_refusal(cfg: ModelConfig):
  checks = [
      (cfg.mask == "causal", "it is a prefix LM (Llama is causal only)"),
      (cfg.position == "rotary", f"its positions are {cfg.position!r} (Llama uses rotary)"),
      (cfg.activation == "swiglu", f"its MLP is {cfg.activation!r} (Llama's is SwiGLU)"),
      (cfg.norm == "rmsnorm", f"its norm is {cfg.norm!r} (Llama's is RMSNorm)"),
      (not cfg.embedding_norm, "it has an embedding norm (Llama has none)"),
  ]
  return _first_unmet(checks)


def _first_unmet(checks):
  """The reason of the first (condition, reason) pair whose condition fails, or None."""
  return next((why for ok, why in checks if not ok), None)


_REFUSALS = {"bloom": _bloom_refusal, "llama": _llama_refusal}


def architecture(cfg: ModelConfig, arch="auto"):
  """The transformers architecture cfg is exported as ("auto": the one that fits)."""
  if arch == "auto":
    fits = [a for a in ARCHS if _REFUSALS[a](cfg) is None]
    if not fits:
      raise ConversionError(
          "the model is neither a BLOOM nor a Llama: as BLOOM, "
          f"{_bloom_refusal(cfg)}; as Llama, {_llama_refusal(cfg)}.")
    return fits[0]
  if arch not in ARCHS:
    raise ConversionError(f"--arch={arch!r} is not one of auto, {', '.join(ARCHS)}.")
  why = _REFUSALS[arch](cfg)
  if why:
    raise ConversionError(f"the model cannot be exported as {arch}: {why}.")
  return arch


def hf_config(cfg: ModelConfig, arch, *, bos_id, eos_id, pad_id, dtype="float32"):
  """transformers' config.json for cfg as arch."""
  common = {"architectures": [CLASSES[arch]], "model_type": arch, "vocab_size": cfg.vocab_size,
            "hidden_size": cfg.d_model, "initializer_range": cfg.init_std,
            "tie_word_embeddings": cfg.tie_embeddings, "bos_token_id": bos_id,
            "eos_token_id": eos_id, "pad_token_id": pad_id, "use_cache": True,
            "torch_dtype": dtype}
  if arch == "bloom":
    return {**common, "n_layer": cfg.num_layers, "n_head": cfg.num_heads,
            "layer_norm_epsilon": cfg.norm_eps, "apply_residual_connection_post_layernorm": False,
            "hidden_dropout": 0.0, "attention_dropout": 0.0, "pretraining_tp": 1,
            "slow_but_exact": False}
  return {**common, "num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.num_heads,
          "num_key_value_heads": cfg.num_kv_heads, "head_dim": cfg.head_dim,
          "intermediate_size": cfg.d_ff, "max_position_embeddings": cfg.max_len,
          "rms_norm_eps": cfg.norm_eps, "rope_theta": cfg.rope_theta,
          "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
          "hidden_act": "silu", "attention_bias": cfg.use_bias,
          "mlp_bias": cfg.use_bias, "attention_dropout": 0.0, "pretraining_tp": 1}


def model_config(config: dict, max_len=None):
  """The ModelConfig of a transformers config.json (BLOOM or Llama), f32 parameters."""
  arch = config.get("model_type")
  if arch not in ARCHS:
    raise ConversionError(f"config.json's model_type is {arch!r}; only {', '.join(ARCHS)} "
                          f"checkpoints can be imported.")
  try:
    if arch == "bloom":
      if config.get("apply_residual_connection_post_layernorm"):
        raise ConversionError("this BLOOM applies its residuals after the norm "
                              "(apply_residual_connection_post_layernorm), which the library's "
                              "pre-norm blocks do not.")
      if not config.get("tie_word_embeddings", True):
        raise ConversionError("this BLOOM has an untied output head; the library's BLOOM "
                              "recipe ties it to the embedding.")
      d, h = config["hidden_size"], config["n_head"]
      return ModelConfig(num_layers=config["n_layer"], d_model=d, num_heads=h, d_ff=4 * d,
                         vocab_size=config["vocab_size"], max_len=max_len or 2048,
                         position="alibi", activation="gelu", norm="layernorm",
                         norm_eps=config.get("layer_norm_epsilon", 1e-5), embedding_norm=True,
                         tie_embeddings=True, use_bias=True,
                         init_std=config.get("initializer_range", 0.02), param_dtype="float32")
    # transformers 4 writes rope_theta and rope_scaling; 5 writes rope_parameters.
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type", "default")) != "default":
      raise ConversionError(f"this Llama scales its rotary positions ({rope}); only plain "
                            f"rotary (rope_type default) can be imported.")
    theta = config.get("rope_theta", rope.get("rope_theta", 10000.0))
    if config.get("attention_bias", False) != config.get("mlp_bias", False):
      raise ConversionError("this Llama has biases in only one of attention and MLP; the "
                            "library's use_bias covers both.")
    if config.get("hidden_act", "silu") != "silu":
      raise ConversionError(f"this Llama's activation is {config['hidden_act']!r}, not silu.")
    d, h = config["hidden_size"], config["num_attention_heads"]
    return ModelConfig(num_layers=config["num_hidden_layers"], d_model=d, num_heads=h,
                       num_kv_heads=config.get("num_key_value_heads") or h,
                       head_dim=config.get("head_dim") or d // h, d_ff=config["intermediate_size"],
                       vocab_size=config["vocab_size"],
                       max_len=max_len or config.get("max_position_embeddings", 2048),
                       position="rotary", rope_theta=float(theta), activation="swiglu",
                       norm="rmsnorm", norm_eps=config.get("rms_norm_eps", 1e-6),
                       tie_embeddings=bool(config.get("tie_word_embeddings", False)),
                       use_bias=bool(config.get("attention_bias", False)),
                       init_std=config.get("initializer_range", 0.02), param_dtype="float32")
  except KeyError as e:
    raise ConversionError(f"config.json of this {arch} lacks {e.args[0]!r}.") from None


# --- tensors ---------------------------------------------------------------------------------

def _linear_in(kernel):
  """Our [D, out...] kernel -> transformers' [out, D] weight."""
  return kernel.reshape(kernel.shape[0], -1).T


def _linear_out(kernel):
  """Our [in..., D] kernel -> transformers' [D, in] weight."""
  return kernel.reshape(-1, kernel.shape[-1]).T


def _layer_tensors(cfg: ModelConfig, arch):
  """[(transformers name within layer i, shape, to_hf(layer) -> array,
  from_hf(array, layer) -> None)]: layer is our one layer's nested dict."""
  d, h, g, k, f = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.d_ff

  def put(path, value):
    def setter(layer):
      node = layer
      for key in path[:-1]:
        node = node.setdefault(key, {})
      node[path[-1]] = value(layer)
    return setter

  def get(layer, *path):
    for key in path:
      layer = layer[key]
    return layer

  def plain(hf, shape, path, to_hf=lambda x: x, from_hf=lambda w: w):
    return (hf, shape, lambda layer: to_hf(get(layer, *path)),
            lambda w, layer: put(path, lambda _: from_hf(w))(layer))

  def dense_in(hf, path, n_out):  # [D] -> n_out features
    return plain(hf, (n_out, d), path, _linear_in, lambda w: w.T)

  tensors = []
  if arch == "bloom":
    def qkv_to_hf(layer):
      att = layer["attention"]
      stacked = np.stack([att[n]["kernel"] for n in ("query", "key", "value")], axis=2)
      return stacked.reshape(d, h * 3 * k).T             # [D, H, 3, K] -> [H*3*K, D]

    def qkv_from_hf(w, layer):
      parts = w.T.reshape(d, h, 3, k)
      for i, n in enumerate(("query", "key", "value")):
        layer.setdefault("attention", {}).setdefault(n, {})["kernel"] = parts[:, :, i]

    def qkv_bias_to_hf(layer):
      att = layer["attention"]
      return np.stack([att[n]["bias"] for n in ("query", "key", "value")], axis=1).reshape(-1)

    def qkv_bias_from_hf(w, layer):
      parts = w.reshape(h, 3, k)
      for i, n in enumerate(("query", "key", "value")):
        layer.setdefault("attention", {}).setdefault(n, {})["bias"] = parts[:, i]

    tensors += [
        plain("input_layernorm.weight", (d,), ("attention_norm", "scale")),
        plain("input_layernorm.bias", (d,), ("attention_norm", "bias")),
        ("self_attention.query_key_value.weight", (3 * d, d), qkv_to_hf, qkv_from_hf),
        ("self_attention.query_key_value.bias", (3 * d,), qkv_bias_to_hf, qkv_bias_from_hf),
        plain("self_attention.dense.weight", (d, d), ("attention", "out", "kernel"), _linear_out,
              lambda w: w.T.reshape(h, k, d)),
        plain("self_attention.dense.bias", (d,), ("attention", "out", "bias")),
        plain("post_attention_layernorm.weight", (d,), ("mlp_norm", "scale")),
        plain("post_attention_layernorm.bias", (d,), ("mlp_norm", "bias")),
        dense_in("mlp.dense_h_to_4h.weight", ("mlp", "wi", "kernel"), f),
        plain("mlp.dense_h_to_4h.bias", (f,), ("mlp", "wi", "bias")),
        plain("mlp.dense_4h_to_h.weight", (d, f), ("mlp", "wo", "kernel"), _linear_out,
              lambda w: w.T),
        plain("mlp.dense_4h_to_h.bias", (d,), ("mlp", "wo", "bias")),
    ]
    return tensors

  heads = {"q_proj": ("query", h), "k_proj": ("key", g), "v_proj": ("value", g)}
  for hf, (ours, n) in heads.items():
    tensors.append(plain(f"self_attn.{hf}.weight", (n * k, d), ("attention", ours, "kernel"),
                         _linear_in, lambda w, n=n: w.T.reshape(d, n, k)))
  tensors.append(plain("self_attn.o_proj.weight", (d, h * k), ("attention", "out", "kernel"),
                       _linear_out, lambda w: w.T.reshape(h, k, d)))
  mlp = {"gate_proj": "wi_gate", "up_proj": "wi_up"}
  for hf, ours in mlp.items():
    tensors.append(dense_in(f"mlp.{hf}.weight", ("mlp", ours, "kernel"), f))
  tensors.append(plain("mlp.down_proj.weight", (d, f), ("mlp", "wo", "kernel"), _linear_out,
                       lambda w: w.T))
  if cfg.use_bias:
    for hf, (ours, n) in heads.items():
      tensors.append(plain(f"self_attn.{hf}.bias", (n * k,), ("attention", ours, "bias"),
                           lambda x: x.reshape(-1), lambda w, n=n: w.reshape(n, k)))
    tensors.append(plain("self_attn.o_proj.bias", (d,), ("attention", "out", "bias")))
    for hf, ours in {**mlp, "down_proj": "wo"}.items():
      size = d if hf == "down_proj" else f
      tensors.append(plain(f"mlp.{hf}.bias", (size,), ("mlp", ours, "bias")))
  tensors += [plain("input_layernorm.weight", (d,), ("attention_norm", "scale")),
              plain("post_attention_layernorm.weight", (d,), ("mlp_norm", "scale"))]
  return tensors


def _global_tensors(cfg: ModelConfig, arch):
  """[(transformers name, shape, our path, to_hf, from_hf)] outside the layers."""
  v, d = cfg.vocab_size, cfg.d_model
  same = (lambda x: x, lambda w: w)
  if arch == "bloom":
    return [("transformer.word_embeddings.weight", (v, d), ("embed", "embedding"), *same),
            ("transformer.word_embeddings_layernorm.weight", (d,), ("embed_norm", "scale"), *same),
            ("transformer.word_embeddings_layernorm.bias", (d,), ("embed_norm", "bias"), *same),
            ("transformer.ln_f.weight", (d,), ("final_norm", "scale"), *same),
            ("transformer.ln_f.bias", (d,), ("final_norm", "bias"), *same)]
  tensors = [("model.embed_tokens.weight", (v, d), ("embed", "embedding"), *same),
             ("model.norm.weight", (d,), ("final_norm", "scale"), *same)]
  if not cfg.tie_embeddings:
    tensors.append(("lm_head.weight", (v, d), ("head",), lambda x: x.T, lambda w: w.T))
  return tensors


def _layer_prefix(arch, i):
  return f"transformer.h.{i}." if arch == "bloom" else f"model.layers.{i}."


def tensor_shapes(cfg: ModelConfig, arch):
  """{transformers name: shape} of every tensor a checkpoint of cfg as arch holds."""
  shapes = {name: shape for name, shape, *_ in _global_tensors(cfg, arch)}
  for i in range(cfg.num_layers):
    shapes.update({_layer_prefix(arch, i) + name: shape
                   for name, shape, *_ in _layer_tensors(cfg, arch)})
  return shapes


def _tree_map(fn, *trees):
  """fn over the leaves of nested dicts of the same structure."""
  if isinstance(trees[0], dict):
    return {k: _tree_map(fn, *(t[k] for t in trees)) for k in trees[0]}
  return fn(*trees)


def _layer(params, cfg: ModelConfig, i):
  """Our layer i as numpy arrays, from scanned or unrolled params (numpy or jax)."""
  if cfg.scan_layers:
    return _tree_map(lambda x: np.asarray(x[i]), params["layers"]["block"])
  return _tree_map(np.asarray, params[f"layer_{i}"])


def _at(tree, path):
  for key in path:
    tree = tree[key]
  return tree


def to_hf(params, cfg: ModelConfig, arch):
  """Yields (transformers name, numpy array) one tensor at a time (params: numpy or host
  arrays in our layout), so a writer never holds a second copy of the whole model."""
  for name, _, path, forward, _ in _global_tensors(cfg, arch):
    yield name, np.ascontiguousarray(forward(np.asarray(_at(params, path))))
  layer_tensors = _layer_tensors(cfg, arch)
  for i in range(cfg.num_layers):
    layer = _layer(params, cfg, i)
    for name, _, forward, _ in layer_tensors:
      yield _layer_prefix(arch, i) + name, np.ascontiguousarray(forward(layer))


def from_hf(read, cfg: ModelConfig, arch, dtype=np.float32):
  """Our params (numpy, scanned layout when cfg.scan_layers) from read(name) -> array,
  each tensor cast to dtype."""
  params = {}
  for name, _, path, _, backward in _global_tensors(cfg, arch):
    node = params
    for key in path[:-1]:
      node = node.setdefault(key, {})
    node[path[-1]] = backward(np.asarray(read(name), dtype))
  layers = []
  for i in range(cfg.num_layers):
    layer = {}
    for name, _, _, backward in _layer_tensors(cfg, arch):
      backward(np.asarray(read(_layer_prefix(arch, i) + name), dtype), layer)
    layers.append(layer)
  if cfg.scan_layers:
    params["layers"] = {"block": _tree_map(lambda *xs: np.stack(xs), *layers)}
  else:
    params.update({f"layer_{i}": layer for i, layer in enumerate(layers)})
  return params
