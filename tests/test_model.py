"""Model properties: causality through gradients, packing, scan/remat equivalence."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bigsci_jax import flops
from bigsci_jax.config import ModelConfig
from bigsci_jax.model import Transformer, init_params
from bigsci_jax.step import token_losses

POSITIONS = ("learned", "sinusoidal", "rotary", "alibi", "none")
# Every position with the default attention; ALiBi (the fused kernels' bias) with each
# Pallas kernel in interpret mode (the GPU one, the same math, with -m slow; Triton-compiled
# on a GPU) and, on a GPU, with the cuDNN path (bf16 only: it takes no f32).
_ON_GPU = pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a CUDA device")
POSITION_IMPLS = [(p, "auto") for p in POSITIONS] + [
    ("alibi", "pallas_tpu"), pytest.param("alibi", "pallas_gpu", marks=pytest.mark.slow),
    pytest.param("alibi", "xla", marks=[pytest.mark.gpu, _ON_GPU]),
    pytest.param("alibi", "cudnn", marks=[pytest.mark.gpu, _ON_GPU])]


def _cfg(**kw):
  base = dict(num_layers=2, d_model=32, num_heads=4, d_ff=64, vocab_size=64, max_len=32,
              dtype="bfloat16" if kw.get("attention_impl") == "cudnn" else "float32")
  base.update(kw)
  return ModelConfig(**base)


def _influence_TxS(cfg, tokens_1xL, prefix_1xL=None):
  """|d loss_t / d input_embedding_s|, summed over the embedding dimension."""
  model = Transformer(cfg)
  variables = model.init(jax.random.key(0), tokens_1xL)
  targets = jnp.roll(tokens_1xL, -1, axis=1)

  def losses_L(perturbations):
    logits = model.apply({"params": variables["params"], "perturbations": perturbations},
                         tokens_1xL, prefix_BxL=prefix_1xL)
    return token_losses(logits, targets, 0.0)[0][0]

  jac = jax.jit(jax.jacrev(losses_L))(variables["perturbations"])["input_embeddings"]  # [L, 1, L, D]
  return np.abs(np.asarray(jac[:, 0])).sum(-1)


@pytest.mark.parametrize("position, impl", POSITION_IMPLS)
def test_causal_loss_never_depends_on_later_tokens(position, impl):
  cfg = _cfg(position=position, attention_impl=impl)
  tokens = jax.random.randint(jax.random.key(1), (1, 10), 0, 64)
  influence = _influence_TxS(cfg, tokens)
  later = np.triu(np.ones((10, 10), bool), k=1)
  assert (influence[later] == 0.0).all()          # exactly zero, not just small
  assert (np.diag(influence) > 0).all()           # and each position does see itself
  assert (influence[np.tril(np.ones((10, 10), bool), k=-1)] > 0).all()


@pytest.mark.parametrize("position, impl", POSITION_IMPLS)
def test_prefix_lm_prefix_is_bidirectional_targets_are_causal(position, impl):
  cfg = _cfg(position=position, mask="prefix", attention_impl=impl)
  tokens = jax.random.randint(jax.random.key(2), (1, 10), 0, 64)
  prefix = jnp.array([[1, 1, 1, 1, 0, 0, 0, 0, 0, 0]])
  influence = _influence_TxS(cfg, tokens, prefix)
  in_prefix = np.asarray(prefix[0], bool)
  both_prefix = in_prefix[:, None] & in_prefix[None, :]
  later = np.triu(np.ones((10, 10), bool), k=1)
  assert (influence[later & both_prefix] > 0).all()   # prefix tokens see later prefix tokens
  assert (influence[later & ~both_prefix] == 0.0).all()  # nothing sees a later target token


def _row(segments, length, prefix_lens=None):
  """Pack token lists into one row: tokens, positions, segment ids, prefix mask."""
  tokens, positions, seg, prefix = (np.zeros(length, np.int32) for _ in range(4))
  at = 0
  for i, doc in enumerate(segments):
    n = len(doc)
    tokens[at:at + n], positions[at:at + n], seg[at:at + n] = doc, np.arange(n), i + 1
    if prefix_lens:
      prefix[at:at + prefix_lens[i]] = 1
    at += n
  return [jnp.asarray(x)[None] for x in (tokens, positions, seg, prefix)]


@pytest.mark.parametrize("mask", ["causal", "prefix"])
@pytest.mark.parametrize("position, impl", POSITION_IMPLS)
def test_packed_rows_give_the_same_token_losses_as_separate_rows(position, impl, mask):
  cfg = _cfg(position=position, mask=mask, attention_impl=impl)
  rng = np.random.default_rng(0)
  a, b = rng.integers(2, 64, 5), rng.integers(2, 64, 7)
  prefix_lens = (2, 3) if mask == "prefix" else None
  model = Transformer(cfg)
  params = init_params(model, jax.random.key(0))

  @jax.jit
  def losses_L(tok, pos, seg, pre):
    logits = model.apply({"params": params}, tok, pos, seg, pre)
    return token_losses(logits, jnp.roll(tok, -1, axis=1), 0.0)[0][0]

  losses = lambda *row: np.asarray(losses_L(*row))

  with jax.default_matmul_precision("highest"):
    packed = losses(*_row([a, b], 14, prefix_lens))
    alone_a = losses(*_row([a], 14, prefix_lens and prefix_lens[:1]))
    alone_b = losses(*_row([b], 14, prefix_lens and prefix_lens[1:]))
  # Within each document, positions 0..n-2 predict tokens of the same document.
  tol = 1e-5 if cfg.dtype == "float32" else 2e-2
  np.testing.assert_allclose(packed[:4], alone_a[:4], rtol=tol, atol=tol)
  np.testing.assert_allclose(packed[5:11], alone_b[:6], rtol=tol, atol=tol)


@pytest.mark.parametrize("remat", [pytest.param("none", marks=pytest.mark.slow), pytest.param("full", marks=pytest.mark.slow), "dots"])
def test_scanned_and_unrolled_layers_compute_the_same_function(remat):
  cfg = _cfg(remat=remat, activation="swiglu", norm="rmsnorm", position="rotary")
  tokens = jax.random.randint(jax.random.key(3), (2, 8), 0, 64)
  scanned = Transformer(cfg)
  params = init_params(scanned, jax.random.key(0))
  unrolled = Transformer(dataclasses.replace(cfg, scan_layers=False))
  layer = lambda i: jax.tree.map(lambda x: x[i], params["layers"]["block"])
  unrolled_params = {k: v for k, v in params.items() if k != "layers"}
  unrolled_params.update({f"layer_{i}": layer(i) for i in range(cfg.num_layers)})

  @functools.partial(jax.jit, static_argnums=0)
  def loss(model, p):
    return jnp.sum(model.apply({"params": p}, tokens) ** 2)

  with jax.default_matmul_precision("highest"):
    np.testing.assert_allclose(loss(scanned, params), loss(unrolled, unrolled_params), rtol=1e-6)
    g = jax.grad(lambda p: loss(scanned, p))(params)
  assert np.isfinite(np.asarray(g["layers"]["block"]["mlp"]["wo"]["kernel"])).all()


VARIANTS = [
    dict(),
    dict(activation="swiglu", norm="rmsnorm", use_bias=False, tie_embeddings=False, position="rotary"),
    dict(activation="geglu", num_kv_heads=2, embedding_norm=True, position="alibi"),
    dict(activation="relu2", position="sinusoidal", scan_layers=False),
]


@pytest.mark.parametrize("variant", VARIANTS)
def test_param_counts_match_the_parameter_tree(variant):
  cfg = _cfg(**variant)
  shapes = jax.eval_shape(Transformer(cfg).init, jax.random.key(0), jnp.zeros((1, 8), jnp.int32))
  n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes["params"]))
  assert flops.param_counts(cfg).total == n


def test_default_alibi_slopes_and_custom_slopes_are_used():
  cfg = _cfg(position="alibi")
  assert cfg.alibi_slopes[0] == pytest.approx(2 ** -2) and len(cfg.alibi_slopes) == 4
  tokens = jax.random.randint(jax.random.key(4), (1, 8), 0, 64)
  model = Transformer(cfg)
  params = init_params(model, jax.random.key(0))
  other = Transformer(dataclasses.replace(cfg, alibi_slopes=(1.0, 0.5, 0.25, 0.125)))
  assert not np.allclose(model.apply({"params": params}, tokens), other.apply({"params": params}, tokens))
