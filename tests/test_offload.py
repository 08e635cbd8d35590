"""Weights from host memory: a Transformer with offload="host" reads its layers' weight
matrices from pinned host memory, one layer at a time on the device, and computes
exactly what the same model with its parameters on the device computes."""

import dataclasses

import jax
import numpy as np
import optax
import pytest

from bigsci_jax import data, generate, likelihood, loop, sharding
from bigsci_jax import step as steps
from bigsci_jax.config import (BatchConfig, ConfigError, DataConfig, MeshConfig, ModelConfig,
                               RunConfig, TrainConfig)
from bigsci_jax.model import Transformer, init_params, offload_params

BASE = ModelConfig(num_layers=2, d_model=32, num_heads=4, num_kv_heads=2, d_ff=64, vocab_size=64,
                   max_len=32, dtype="float32", init_std=0.3)
VARIANTS = {
    "scanned-alibi-prefix": dict(position="alibi", mask="prefix"),
    "unrolled-learned-untied": dict(position="learned", scan_layers=False, tie_embeddings=False,
                                    embedding_norm=True, norm="rmsnorm", activation="swiglu",
                                    use_bias=True),
}
PROMPTS = [[5, 9, 3, 7, 11], [8, 2], [4, 4, 6, 13]]


def _memory_kinds(params):
  return {jax.tree_util.keystr(path): x.sharding.memory_kind
          for path, x in jax.tree_util.tree_flatten_with_path(params)[0]}


@pytest.mark.parametrize("variant", [
    "scanned-alibi-prefix",
    pytest.param("unrolled-learned-untied", marks=pytest.mark.slow)])
def test_offloaded_model_reads_host_weights_and_computes_the_same(variant):
  cfg = dataclasses.replace(BASE, **VARIANTS[variant])
  model, offloaded = Transformer(cfg), Transformer(cfg, offload="host")
  params = init_params(model, jax.random.key(0))
  host = offload_params(params, "host")
  kinds = _memory_kinds(host)
  kernels = [k for k in kinds if k.endswith("['kernel']")]
  mlp = 3 if cfg.activation == "swiglu" else 2
  assert len(kernels) == (4 + mlp) * (1 if cfg.scan_layers else cfg.num_layers)
  assert all(kinds[k] == "pinned_host" for k in kernels)
  assert all(v == "device" for k, v in kinds.items() if k not in kernels)  # embeddings, norms
  tokens = np.arange(24, dtype=np.int32).reshape(2, 12) % cfg.vocab_size
  want = jax.jit(model.apply)({"params": params}, tokens)
  got = jax.jit(offloaded.apply)({"params": host}, tokens)
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  # KV-cache decoding with sampling: the same tokens and logits.
  sampling = generate.Sampling(temperature=0.8, top_k=20)
  out, logits = generate.generate(model, params, PROMPTS, 5, sampling, return_logits=True)
  out_host, logits_host = generate.generate(offloaded, host, PROMPTS, 5, sampling,
                                            return_logits=True)
  assert out_host == out
  np.testing.assert_array_equal(np.stack(logits_host), np.stack(logits))


def test_offloaded_params_keep_their_mesh_layout_and_score_the_same():
  """On an 8-device mesh (fsdp 2 x tensor 4), host copies keep each array's sharding;
  the Scorer's log-likelihoods match the on-device model's."""
  mesh = sharding.make_mesh(MeshConfig(1, 2, 4))
  cfg = dataclasses.replace(BASE, num_heads=4, num_kv_heads=4)
  model = Transformer(cfg)
  _, shardings = steps.abstract_state(model, optax.identity(), mesh, 8)
  params = jax.device_put(init_params(model, jax.random.key(0)), shardings.params)
  host = offload_params(params, "host")
  for on_device, on_host in zip(jax.tree.leaves(params), jax.tree.leaves(host)):
    assert on_host.sharding.spec == on_device.sharding.spec
    assert on_host.sharding.mesh == on_device.sharding.mesh
  assert any(len(x.sharding.device_set) == 8 and x.sharding.memory_kind == "pinned_host"
             for x in jax.tree.leaves(host))
  pairs = [([5, 9, 3], [7, 11]), ([8], [2, 4, 6]), ([4, 4], [13]), ([6], [1, 2])] * 2

  def scores(m, p):
    rows = likelihood.token_rows(pairs, 16, prefix_lm=False)
    return np.asarray(sharding.call_with_rows(
        mesh, jax.jit(lambda p, r: likelihood.row_logliks(p, r, model=m)[0]), p, rows=rows))
  np.testing.assert_allclose(scores(Transformer(cfg, offload="host"), host),
                             scores(model, params), rtol=0, atol=1e-6)


def test_unknown_offload_is_one_sentence():
  with pytest.raises(ConfigError, match="offload='disk': it is one of none, host"):
    sharding.offloaded({}, "disk")


def test_a_checkpoint_restores_its_params_alone_into_host_memory(tmp_path):
  """Runtime(run, offload="host").restore_params reads only the parameters, straight into
  pinned host memory on the run's mesh; its eval step gives the on-device losses."""
  run = RunConfig(model=dataclasses.replace(BASE, vocab_size=64), mesh=MeshConfig(2, 2, 1),
                  batch=BatchConfig(batch_size=8, seq_len=16, micro_batch_size=4),
                  data=DataConfig(mean_doc_len=8),
                  train=TrainConfig(train_steps=2, checkpoint_every=2, eval_every=0))
  model_dir = str(tmp_path / "run")
  trained = loop.train(run, model_dir, progress=False)
  on_device, host = loop.Runtime(run), loop.Runtime(run, offload="host")
  params, step = on_device.restore_params(model_dir)
  host_params, host_step = host.restore_params(model_dir)
  assert step == host_step == 2
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(host_params),
               jax.device_get(trained["state"].params))
  kinds = _memory_kinds(host_params)
  assert {v for k, v in kinds.items() if k.endswith("['kernel']")} == {"pinned_host"}
  assert {x.sharding.mesh.devices.size for x in jax.tree.leaves(host_params)} == {4}
  batches = [data.SyntheticLM(64, 16, seed=3, split="validation").rows(0, 4)]
  assert host.loss(host_params, batches) == on_device.loss(params, batches)
