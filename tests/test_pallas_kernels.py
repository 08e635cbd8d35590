"""The Pallas attention kernels, TPU (Mosaic) and GPU (Triton) flavours, in interpret
mode on CPU against the reference oracle; the block tables that let them skip
tiles; the sharded call; the GPU kernels' lowering to Triton for CUDA."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bigsci_jax.config import default_alibi_slopes
from bigsci_jax.kernels import blocks, mask, pallas_gpu, pallas_tpu, reference

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


# (impl, block_q, block_k, dtype, head dim, tolerance); the second settings run with -m slow.
SETTINGS = [("pallas_tpu", 64, 128, jnp.float32, 64, 2e-5),
            ("pallas_tpu", 128, 64, jnp.bfloat16, 128, 2e-2),
            ("pallas_gpu", 32, 64, jnp.float32, 128, 2e-5),
            ("pallas_gpu", 64, 32, jnp.bfloat16, 64, 2e-2),
            pytest.param("pallas_tpu", 128, 64, jnp.float32, 128, 2e-5, marks=pytest.mark.slow),
            pytest.param("pallas_tpu", 64, 128, jnp.bfloat16, 64, 2e-2, marks=pytest.mark.slow),
            pytest.param("pallas_gpu", 64, 32, jnp.float32, 64, 2e-5, marks=pytest.mark.slow),
            pytest.param("pallas_gpu", 32, 64, jnp.bfloat16, 128, 2e-2, marks=pytest.mark.slow)]
KERNELS = {"pallas_tpu": pallas_tpu.attention, "pallas_gpu": pallas_gpu.attention}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("impl, block_q, block_k, dtype, d, tol", SETTINGS)
def test_forward_and_gradients_match_reference(case, impl, block_q, block_k, dtype, d, tol):
  """Output and dq, dk, dv of the fused kernels (interpret mode) against the oracle;
  for pallas_tpu, D=64 runs the transposed [B, H, T, D] layout, D=128 the
  heads-in-lanes one."""
  kwargs = dict(CASES[case])
  if kwargs.pop("alibi", False):
    kwargs["alibi_slopes"] = default_alibi_slopes(4)
  q, k, v = _inputs(dtype, d=d)
  d_out = jax.random.normal(jax.random.key(7), q.shape, dtype)

  def run(fn):
    out, vjp = jax.vjp(lambda q, k, v: fn(q, k, v, **kwargs), q, k, v)
    return (out, *vjp(d_out))

  with jax.default_matmul_precision("highest"):
    expected = run(reference.attention)
    got = jax.jit(lambda: run(functools.partial(
        KERNELS[impl], block_q=block_q, block_k=block_k, interpret=True)))()
  for name, a, b in zip(("out", "dq", "dk", "dv"), got, expected):
    assert a.shape == b.shape and a.dtype == dtype, name
    np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32),
                               atol=tol, rtol=tol, err_msg=name)
  if "segment_ids" in kwargs:  # padding rows are 0 and receive no gradient
    assert not np.asarray(got[0][0, 190:], np.float32).any()
    assert not np.asarray(got[1][0, 190:], np.float32).any()


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
  # The GPU kernels loop over [first, end): every tile outside is SKIP.
  for table in (kinds, kinds.transpose(0, 2, 1)):
    first, full_first, full_end, end = np.moveaxis(
        np.asarray(blocks.tile_ranges(jnp.asarray(table))), -1, 0)
    index = np.arange(table.shape[-1])
    outside = (index < first[..., None]) | (index >= end[..., None])
    assert (table[outside] == blocks.SKIP).all()
    assert (end > first).any()
    assert ((table != blocks.SKIP).any(-1) == (end > first)).all()
    # ... and run the tiles of [full_first, full_end) without the mask: all FULL, inside.
    assert ((first <= full_first) & (full_first <= full_end) & (full_end <= end)).all()
    unmasked = (index >= full_first[..., None]) & (index < full_end[..., None])
    assert (table[unmasked] == blocks.FULL).all()
    if case == "causal":  # below the diagonal every tile goes unmasked
      assert (unmasked == (table == blocks.FULL)).all()


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


def test_sharded_calls_match_one_device():
  """Under a (data, fsdp, tensor) mesh the call wraps itself in shard_map (batch over
  data x fsdp, heads over tensor); inside a caller's shard_map it runs on the local
  shards. Both give the one-device output and gradients."""
  from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
  mesh = Mesh(np.array(jax.devices()[:8]).reshape(2, 2, 2), ("data", "fsdp", "tensor"))
  q, k, v = _inputs(jnp.float32, b=4, h=4, g=2)
  seg, prefix = np.tile(_packed(), (2, 1)), np.tile(_prefix(30, 20), (2, 1))
  d_out = jax.random.normal(jax.random.key(7), q.shape)
  attend = functools.partial(pallas_tpu.attention, alibi_slopes=default_alibi_slopes(4),
                             block_q=64, block_k=64, interpret=True)

  def run(q, k, v, seg, prefix, fn=attend):
    out, vjp = jax.vjp(lambda q, k, v: fn(q, k, v, segment_ids=seg, prefix_mask=prefix), q, k, v)
    return (out, *vjp(d_out))

  heads, rows = P(("data", "fsdp"), None, "tensor"), P(("data", "fsdp"))
  sharded = [jax.device_put(x, NamedSharding(mesh, spec))
             for x, spec in zip((q, k, v, seg, prefix), (heads, heads, heads, rows, rows))]
  local = jax.shard_map(lambda q, k, v, seg, prefix: attend(q, k, v, segment_ids=seg,
                                                           prefix_mask=prefix), mesh=mesh, in_specs=(heads,) * 3 + (rows,) * 2,
                        out_specs=heads, check_vma=False)
  with jax.default_matmul_precision("highest"):
    expected = jax.jit(run)(q, k, v, seg, prefix)
    with jax.set_mesh(mesh):
      automatic = jax.jit(run)(*sharded)
      inside = jax.jit(functools.partial(run, fn=lambda q, k, v, **kw: local(
          q, k, v, kw["segment_ids"], kw["prefix_mask"])))(*sharded)
  for got in (automatic, inside):
    for a, b in zip(got, expected):
      np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5, err_msg=str(got is inside))
  assert automatic[0].sharding.spec[0] == ("data", "fsdp")


def test_gpu_kernels_lower_to_triton_for_cuda():
  """No GPU needed: jax lowers the three GPU kernels (forward and backward, bf16,
  ALiBi + packed prefix-LM + grouped heads, default tuning) to Triton IR for CUDA,
  which checks their block shapes and ops; Triton compiles them on the device."""
  b, t, h, g, d = 2, 1000, 8, 2, 128
  spec = jax.ShapeDtypeStruct

  def forward_backward(q, k, v, seg, prefix, d_out):
    out, vjp = jax.vjp(lambda q, k, v: pallas_gpu.attention(
        q, k, v, segment_ids=seg, prefix_mask=prefix, alibi_slopes=default_alibi_slopes(h),
        interpret=False), q, k, v)
    return out, vjp(d_out)

  args = (spec((b, t, h, d), jnp.bfloat16), spec((b, t, g, d), jnp.bfloat16),
          spec((b, t, g, d), jnp.bfloat16), spec((b, t), jnp.int32), spec((b, t), jnp.int32),
          spec((b, t, h, d), jnp.bfloat16))
  text = jax.jit(forward_backward).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
  assert text.count("__gpu$xla.gpu.triton") == 3
  assert all(name in text for name in pallas_gpu.KERNEL_NAMES)
