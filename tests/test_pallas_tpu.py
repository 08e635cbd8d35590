"""The Pallas TPU attention kernel (interpret mode on CPU) against the reference
oracle, and the block tables that let it skip tiles."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bigsci_jax.config import default_alibi_slopes
from bigsci_jax.kernels import blocks, mask, pallas_tpu, reference

T = 200  # not a multiple of any block size


def _inputs(dtype, b=2, h=4, g=2, d=64, seed=0):
  kq, kk, kv = jax.random.split(jax.random.key(seed), 3)
  q = jax.random.normal(kq, (b, T, h, d), dtype)
  k = jax.random.normal(kk, (b, T, g, d), dtype)
  v = jax.random.normal(kv, (b, T, g, d), dtype)
  return q, k, v


def _packed():
  """Row 0: 3 segments and padding; row 1: one segment."""
  seg = np.zeros((2, T), np.int32)
  seg[0, :80], seg[0, 80:150], seg[0, 150:190], seg[1] = 1, 2, 3, 1
  return seg


def _prefix(p_first, p_second=0):
  prefix = np.zeros((2, T), np.int32)
  prefix[0, :p_first], prefix[0, 80:80 + p_second] = 1, 1
  prefix[1, :p_first] = 1
  return prefix


CASES = {
    "causal": dict(),
    "prefix empty": dict(prefix_mask=_prefix(0)),
    "prefix mid": dict(prefix_mask=_prefix(70)),
    "prefix whole": dict(prefix_mask=np.ones((2, T), np.int32)),
    "packed": dict(segment_ids=_packed()),
    "packed prefix alibi": dict(segment_ids=_packed(), prefix_mask=_prefix(30, 20), alibi=True),
    "alibi": dict(alibi=True),
    "bidirectional packed": dict(segment_ids=_packed(), causal=False),
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("blocks_qk, dtype, tol", [
    ((64, 128), jnp.float32, 2e-5), ((128, 64), jnp.bfloat16, 2e-2),
    pytest.param((128, 64), jnp.float32, 2e-5, marks=pytest.mark.slow)])
def test_forward_matches_reference(case, blocks_qk, dtype, tol):
  kwargs = dict(CASES[case])
  if kwargs.pop("alibi", False):
    kwargs["alibi_slopes"] = default_alibi_slopes(4)
  q, k, v = _inputs(dtype)
  with jax.default_matmul_precision("highest"):
    ref = reference.attention(q, k, v, **kwargs)
    out = pallas_tpu.attention(q, k, v, block_q=blocks_qk[0], block_k=blocks_qk[1],
                               interpret=True, **kwargs)
  assert out.shape == q.shape and out.dtype == dtype
  np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref, np.float32),
                             atol=tol, rtol=tol)
  if "segment_ids" in kwargs:
    assert not np.asarray(out[0, 190:], np.float32).any()  # padding rows are 0


@pytest.mark.parametrize("case", sorted(CASES))
def test_block_kinds_are_sound_and_full_tiles_are_fully_visible(case):
  """No visible pair lies in a SKIP tile; every pair of a FULL tile is visible."""
  kwargs = CASES[case]
  seg, prefix = kwargs.get("segment_ids"), kwargs.get("prefix_mask")
  causal = kwargs.get("causal", True)
  codes = blocks.pad_codes(blocks.token_codes(seg, prefix, 2, T), 256)
  kinds = np.asarray(blocks.block_kinds(codes, 32, 64, causal))
  visible = np.asarray(mask.visibility_BxTxS(codes // 2, codes % 2, causal=causal))
  tiles = visible.reshape(2, 8, 32, 4, 64)
  any_visible, all_visible = tiles.any(axis=(2, 4)), tiles.all(axis=(2, 4))
  assert not (any_visible & (kinds == blocks.SKIP)).any()
  assert all_visible[kinds == blocks.FULL].all()
  if case == "causal":  # nothing above the diagonal is computed
    assert (kinds == blocks.SKIP).sum() >= 2 * (8 * 4 - 8 * 4 // 2 - 4)


def test_skipped_tiles_fetch_a_block_already_loaded():
  kinds = jnp.array([[[0, 1, 2, 0, 0], [2, 0, 0, 1, 0]]])
  np.testing.assert_array_equal(pallas_tpu.fetch_table(kinds), [[[1, 1, 2, 2, 2],
                                                                 [0, 0, 0, 3, 3]]])


def test_gradients_and_the_model_through_the_kernel():
  """impl='pallas_tpu' in the model: same logits and parameter gradients as 'xla'
  (packed prefix-LM rows, ALiBi, grouped-query heads)."""
  import dataclasses
  from bigsci_jax.config import ModelConfig
  from bigsci_jax.model import Transformer, init_params
  cfg = ModelConfig(num_layers=2, d_model=64, num_heads=4, num_kv_heads=2, d_ff=128,
                    vocab_size=64, max_len=T, dtype="float32", position="alibi", mask="prefix")
  seg, prefix = _packed(), _prefix(30, 20)
  tokens = np.asarray(jax.random.randint(jax.random.key(1), (2, T), 2, 64))
  positions = np.broadcast_to(np.arange(T), (2, T))
  params = init_params(Transformer(cfg), jax.random.key(0))

  def loss(params, impl):
    model = Transformer(dataclasses.replace(cfg, attention_impl=impl))
    logits = model.apply({"params": params}, tokens, positions, seg, prefix)
    return jnp.sum(jnp.where(seg[..., None] > 0, logits, 0.0) ** 2) / 1e3, logits

  with jax.default_matmul_precision("highest"):
    (_, xla_logits), xla_grads = jax.value_and_grad(loss, has_aux=True)(params, "xla")
    (_, pallas_logits), pallas_grads = jax.jit(
        jax.value_and_grad(loss, has_aux=True), static_argnums=1)(params, "pallas_tpu")
  np.testing.assert_allclose(pallas_logits, xla_logits, atol=2e-5, rtol=2e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=2e-5, rtol=2e-4),
               pallas_grads, xla_grads)
