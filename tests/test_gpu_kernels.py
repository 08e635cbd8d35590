"""On a CUDA device: the Triton-compiled pallas_gpu kernels and the cuDNN path against
the oracle, forward and gradients (bf16). Imports only bigsci_jax.kernels, so it
runs where TensorFlow / seqio are absent.

Run with `JAX_PLATFORMS=cuda python -m pytest -m gpu tests/test_gpu_kernels.py`.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bigsci_jax import kernels
from bigsci_jax.config import default_alibi_slopes

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a CUDA device")]

B, T, H, G = 2, 1000, 8, 2


def _features(name):
  seg = np.zeros((B, T), np.int32)
  seg[0, :400], seg[0, 400:900], seg[1] = 1, 2, 1
  prefix = np.zeros((B, T), np.int32)
  prefix[0, :100], prefix[0, 400:450], prefix[1, :300] = 1, 1, 1
  return {"causal": {},
          "alibi packed prefix": dict(segment_ids=seg, prefix_mask=prefix,
                                      alibi_slopes=default_alibi_slopes(H))}[name]


def _run(impl, q, k, v, d_out, kwargs):
  out, vjp = jax.vjp(lambda q, k, v: kernels.attention(q, k, v, impl=impl, **kwargs), q, k, v)
  return (out, *vjp(d_out))


@pytest.mark.parametrize("impl", ["pallas_gpu", "cudnn"])
@pytest.mark.parametrize("features", ["causal", "alibi packed prefix"])
@pytest.mark.parametrize("d", [64, 128])
def test_gpu_attention_matches_reference(impl, features, d):
  keys = jax.random.split(jax.random.key(0), 4)
  q = jax.random.normal(keys[0], (B, T, H, d), jnp.bfloat16)
  k, v = (jax.random.normal(key, (B, T, G, d), jnp.bfloat16) for key in keys[1:3])
  d_out = jax.random.normal(keys[3], q.shape, jnp.bfloat16)
  kwargs = _features(features)
  expected = jax.jit(functools.partial(_run, "reference", kwargs=kwargs))(q, k, v, d_out)
  got = jax.jit(functools.partial(_run, impl, kwargs=kwargs))(q, k, v, d_out)
  for name, a, b in zip(("out", "dq", "dk", "dv"), got, expected):
    np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32),
                               atol=2e-2, rtol=2e-2, err_msg=f"{impl} {name}")
