"""Checkpoints: bit-exact resume, a kill between checkpoints, restore onto another mesh."""

import dataclasses
import shutil

import jax
import numpy as np
import pytest

from bigsci_jax import checkpoint, loop
from bigsci_jax import step as steps
from bigsci_jax.config import (BatchConfig, DataConfig, MeshConfig, ModelConfig,
                               OptimizerConfig, RunConfig, TrainConfig)
from bigsci_jax.metrics import read_metrics
from bigsci_jax.model import Transformer
from bigsci_jax.optim import make_optimizer
from bigsci_jax.sharding import make_mesh

N = 6
RUN = RunConfig(
    model=ModelConfig(num_layers=2, d_model=32, num_heads=4, d_ff=64, vocab_size=64, max_len=64,
                      dtype="float32", dropout=0.1),
    optimizer=OptimizerConfig(learning_rate=3e-3, warmup_steps=2, decay_steps=2 * N),
    batch=BatchConfig(batch_size=8, seq_len=32, micro_batch_size=4, warmup_start=4,
                      warmup_tokens=256),
    mesh=MeshConfig(2, 2, 1),
    data=DataConfig(mean_doc_len=12),
    train=TrainConfig(train_steps=2 * N, checkpoint_every=N, eval_every=0))


def _losses(model_dir):
  return [(r["step"], r["loss"], r["batch_tokens"]) for r in read_metrics(model_dir, "train")]


def _with(run, **train_fields):
  return dataclasses.replace(run, train=dataclasses.replace(run.train, **train_fields))


def test_resumed_run_logs_identical_losses(tmp_path):
  straight = loop.train(RUN, str(tmp_path / "straight"), progress=False)
  resumed_dir = str(tmp_path / "resumed")
  loop.train(_with(RUN, train_steps=N), resumed_dir, progress=False)
  resumed = loop.train(RUN, resumed_dir, progress=False)
  expected = _losses(str(tmp_path / "straight"))
  assert [s for s, _, _ in expected] == list(range(1, 2 * N + 1))
  assert _losses(resumed_dir) == expected  # equality, not closeness
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(resumed["state"].params),
               jax.device_get(straight["state"].params))


@pytest.mark.slow  # the fast suite kills a real train.py mid-save (test_reliability.py)
def test_kill_after_unsaved_steps_recomputes_them_identically(tmp_path):
  """Steps logged after the last checkpoint are dropped and recomputed on restart."""
  model_dir = str(tmp_path / "killed")
  loop.train(_with(RUN, train_steps=N + 3), model_dir, progress=False)
  shutil.rmtree(f"{model_dir}/checkpoints/{N + 3}")  # as if killed before that save
  assert [s for s, _, _ in _losses(model_dir)][-1] == N + 3
  loop.train(RUN, model_dir, progress=False)
  loop.train(RUN, str(tmp_path / "straight"), progress=False)
  assert _losses(model_dir) == _losses(str(tmp_path / "straight"))


@pytest.mark.slow  # the fast suite restores a 2-process checkpoint on 8 and 1 devices (test_multiprocess)
def test_restore_onto_a_different_mesh(tmp_path):
  model_dir = str(tmp_path / "run")
  saved = loop.train(_with(RUN, train_steps=N), model_dir, progress=False)
  saved_params = jax.device_get(saved["state"].params)
  model = Transformer(RUN.model)
  tx, _ = make_optimizer(RUN.optimizer, RUN.train.train_steps)
  for shape in ((2, 2, 2), (1, 2, 4), (1, 1, 1)):
    mesh = make_mesh(MeshConfig(*shape), jax.devices()[:int(np.prod(shape))])
    abstract, shardings = steps.abstract_state(model, tx, mesh, RUN.batch.seq_len)
    ckpts = checkpoint.Checkpoints(f"{model_dir}/checkpoints", every=N, keep=3)
    state, data_state = ckpts.restore(abstract)
    ckpts.close()
    assert int(state.step) == N and data_state["rows"] > 0
    kernel = state.params["layers"]["block"]["mlp"]["wi"]["kernel"]
    assert kernel.sharding == shardings.params["layers"]["block"]["mlp"]["wi"]["kernel"]
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(state.params), saved_params)
  # And training continues on the new mesh.
  loop.train(dataclasses.replace(RUN, mesh=MeshConfig(1, 2, 4)), model_dir, progress=False)
  assert [s for s, _, _ in _losses(model_dir)] == list(range(1, 2 * N + 1))
