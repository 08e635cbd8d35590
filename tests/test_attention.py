"""kernels.attention: the xla path against the reference oracle; the mask contract."""

import pathlib
import subprocess
import sys
from importlib import metadata

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bigsci_jax import kernels
from bigsci_jax.config import default_alibi_slopes


def _inputs(b=2, t=12, h=4, g=2, d=8, seed=0):
  kq, kk, kv = jax.random.split(jax.random.key(seed), 3)
  q = jax.random.normal(kq, (b, t, h, d))
  k = jax.random.normal(kk, (b, t, g, d))
  v = jax.random.normal(kv, (b, t, g, d))
  segment_ids = jnp.array([[1] * 5 + [2] * 5 + [0] * 2, [1] * 12])[:b]
  prefix = jnp.array([[1, 1, 0, 0, 0, 1, 1, 1, 0, 0, 0, 0], [1] * 4 + [0] * 8])[:b]
  return q, k, v, segment_ids, prefix


def test_mask_matches_docstring_example():
  seg = jnp.array([[1, 1, 1, 1, 2, 2, 0]])
  prefix = jnp.array([[1, 1, 0, 0, 1, 0, 0]])
  expected = np.array([
      [1, 1, 0, 0, 0, 0, 0],
      [1, 1, 0, 0, 0, 0, 0],
      [1, 1, 1, 0, 0, 0, 0],
      [1, 1, 1, 1, 0, 0, 0],
      [0, 0, 0, 0, 1, 0, 0],
      [0, 0, 0, 0, 1, 1, 0],
      [0, 0, 0, 0, 0, 0, 0]], bool)
  np.testing.assert_array_equal(kernels.visibility_BxTxS(seg, prefix)[0], expected)


@pytest.mark.parametrize("use_prefix", [False, True])
@pytest.mark.parametrize("use_alibi", [False, True])
def test_xla_matches_reference_values_and_gradients(use_prefix, use_alibi):
  q, k, v, seg, prefix = _inputs()
  kwargs = dict(segment_ids=seg, prefix_mask=prefix if use_prefix else None,
                alibi_slopes=default_alibi_slopes(4) if use_alibi else None)

  def loss(impl, q, k, v):
    out = kernels.attention(q, k, v, impl=impl, **kwargs)
    return jnp.sum(out * jnp.cos(jnp.arange(out.size).reshape(out.shape)))

  with jax.default_matmul_precision("highest"):
    ref = kernels.attention(q, k, v, impl="reference", **kwargs)
    out = kernels.attention(q, k, v, impl="xla", **kwargs)
    g_ref = jax.grad(loss, argnums=(1, 2, 3))("reference", q, k, v)
    g_xla = jax.grad(loss, argnums=(1, 2, 3))("xla", q, k, v)
  np.testing.assert_allclose(out, ref, atol=1e-5, rtol=1e-5)
  for a, b in zip(g_xla, g_ref):
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("impl", ["reference", "xla", "pallas_tpu", "pallas_gpu"])
def test_padding_rows_return_zero_and_have_finite_gradients(impl):
  q, k, v, seg, _ = _inputs()
  out = kernels.attention(q, k, v, segment_ids=seg, impl=impl)
  np.testing.assert_array_equal(out[0, 10:], 0.0)  # segment 0
  grads = jax.grad(lambda q: kernels.attention(q, k, v, segment_ids=seg, impl=impl).sum())(q)
  assert np.isfinite(np.asarray(grads)).all()


def test_alibi_bias_equals_explicit_softmax():
  """One head, no mask: out = softmax(qk/sqrt(d) - slope|i-j|) v, computed by hand."""
  q, k, v, _, _ = _inputs(b=1, t=6, h=1, g=1, d=4)
  slope = 0.37
  out = kernels.attention(q, k, v, alibi_slopes=[slope], causal=False, impl="xla")
  logits = np.einsum("td,sd->ts", q[0, :, 0], k[0, :, 0]) / 2.0
  logits -= slope * np.abs(np.arange(6)[:, None] - np.arange(6)[None, :])
  p = np.exp(logits - logits.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  np.testing.assert_allclose(out[0, :, 0], p @ np.asarray(v[0, :, 0]), atol=1e-5)


def test_bfloat16_inputs_keep_dtype_and_stay_close():
  q, k, v, seg, prefix = _inputs()
  ref = kernels.attention(q, k, v, segment_ids=seg, prefix_mask=prefix, impl="reference")
  out = kernels.attention(q.astype(jnp.bfloat16), k.astype(jnp.bfloat16), v.astype(jnp.bfloat16),
                          segment_ids=seg, prefix_mask=prefix, impl="xla")
  assert out.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(out, np.float32), ref, atol=5e-2)


def test_unknown_impl_is_rejected():
  q, k, v, _, _ = _inputs()
  with pytest.raises(ValueError, match="impl='flash' is not one of"):
    kernels.attention(q, k, v, impl="flash")


def test_auto_picks_the_measured_fastest_kernel_per_platform_and_features():
  bf16 = jnp.bfloat16
  assert kernels.auto_impl("tpu") == "pallas_tpu" and kernels.auto_impl("cpu") == "xla"
  assert kernels.auto_impl("gpu", plain_causal=True, head_dim=128, dtype=bf16) == "cudnn"
  assert kernels.auto_impl("gpu", plain_causal=False, head_dim=128, dtype=bf16) == "pallas_gpu"
  assert kernels.auto_impl("gpu", plain_causal=True, head_dim=64, dtype=jnp.float32) == "pallas_gpu"
  assert kernels.auto_impl("gpu", plain_causal=False, head_dim=96, dtype=bf16) == "xla"


REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("elsewhere", [True, False])
def test_the_kernels_folder_does_not_hide_a_pip_package_named_kernels(elsewhere):
  """From the repository root (sys.path[0] = ''), `import kernels` is the pip package of
  that name (Hugging Face's, which transformers >= 5 imports: `from kernels import
  CUDAProperties` failed on this folder), or no module where none is installed; this
  folder stays bigsci_jax.kernels."""
  if elsewhere:
    try:
      metadata.distribution("kernels")
    except metadata.PackageNotFoundError:
      pytest.skip("no pip package named kernels is installed")
  hide = "" if elsewhere else "sys.path = [p for p in sys.path if 'site-packages' not in p]; "
  code = (f"import sys; {hide}"
          "import importlib\n"
          "try:\n  k = importlib.import_module('kernels'); print(k.__file__)\n"
          "except ModuleNotFoundError as e:\n  print('missing', e.name)\n")
  out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                       check=True).stdout.split()
  if elsewhere:
    assert "site-packages" in out[-1] and not out[-1].startswith(str(REPO / "kernels")), out
    assert kernels.__file__.startswith(str(REPO / "kernels"))
  else:
    assert out == ["missing", "kernels"], out
