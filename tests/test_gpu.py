"""On a CUDA device: bf16 compute trains and attention matches its oracle.

Run with `JAX_PLATFORMS=cuda python -m pytest -m gpu` on a machine with a GPU.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bigsci_jax import kernels, loop
from bigsci_jax.config import BatchConfig, MeshConfig, ModelConfig, RunConfig, TrainConfig
from bigsci_jax.metrics import read_metrics
from bigsci_jax.model import compute_dtype

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a CUDA device")]


def test_bf16_attention_close_to_float32_oracle():
  keys = jax.random.split(jax.random.key(0), 3)
  q, k, v = (jax.random.normal(key, (2, 256, 8, 64)) for key in keys)
  seg = jnp.concatenate([jnp.ones((2, 200), jnp.int32), jnp.full((2, 56), 2, jnp.int32)], axis=1)
  ref = kernels.attention(q, k, v, segment_ids=seg, impl="reference")
  out = kernels.attention(*(x.astype(jnp.bfloat16) for x in (q, k, v)), segment_ids=seg, impl="xla")
  np.testing.assert_allclose(np.asarray(out, np.float32), ref, atol=3e-2)


def test_bf16_training_learns(tmp_path):
  run = RunConfig(model=ModelConfig(num_layers=2, d_model=128, num_heads=4, vocab_size=256,
                                    max_len=512, dtype="auto"),
                  batch=BatchConfig(batch_size=16, seq_len=128), mesh=MeshConfig(1, 1, 1),
                  train=TrainConfig(train_steps=150, eval_every=0))
  assert compute_dtype(run.model) == jnp.bfloat16  # 'auto' means bf16 off the CPU
  loop.train(run, str(tmp_path), progress=False)
  losses = [r["loss"] for r in read_metrics(str(tmp_path), "train")]
  assert np.mean(losses[-5:]) < 0.7 * np.mean(losses[:5])
  assert read_metrics(str(tmp_path), "train")[-1]["mfu"] is not None
