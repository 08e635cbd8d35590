"""Per-layer weight, gradient and update norms (TrainConfig.watch_every): the step's
numbers against second computations (the loop's watch lines: test_train's smoke run)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from bigsci_jax import data, sharding
from bigsci_jax import step as steps
from bigsci_jax.config import MeshConfig, ModelConfig, OptimizerConfig, TrainConfig
from bigsci_jax.model import Transformer, init_params
from bigsci_jax.optim import make_optimizer
from bigsci_jax.scaling.layer_norms import QUANTITIES

CFG = ModelConfig(num_layers=3, d_model=32, num_heads=4, d_ff=64, vocab_size=64, max_len=32,
                  dtype="float32", scan_layers=False)
MODULES = ("attention", "attention_norm", "mlp", "mlp_norm")
GROUPS = [f"layer_{i:02d}/{m}" for i in range(3) for m in MODULES] + [
    "embed", "final_norm", "pos_embed"]


def _norm(*trees):
  return float(np.sqrt(sum(np.sum(np.square(np.asarray(x, np.float64)))
                           for t in trees for x in jax.tree.leaves(t))))


def _step(cfg, params, mesh):
  """Two steps from `params`, watch on, the second logging the norms: (state before the
  second, after it, its metrics, the first's, (the step function, the batch))."""
  model = Transformer(cfg)
  tx, schedule = make_optimizer(OptimizerConfig(learning_rate=1e-2, warmup_steps=0), 10)
  _, shardings = steps.abstract_state(model, tx, mesh, 32)
  state = steps.init_state(model, tx, mesh, 0, 32, params=jax.device_put(params, shardings.params))
  train_step = steps.make_train_step(model, tx, schedule, mesh, shardings,
                                     TrainConfig(watch_every=1))
  rows = data.SyntheticLM(64, 32, mean_doc_len=10).take(8)
  batch = data.to_global(data.split_micro_batches(rows, 2),
                         sharding.batch_sharding(mesh, 3, batch_axis=1), 4)
  state, first = train_step(state, batch)  # step 1: no norms asked for
  before = jax.device_get(state)
  after, metrics = train_step(state, batch, watch=True)
  return before, after, jax.device_get(metrics), jax.device_get(first["layers"]), (
      train_step, batch)


def test_layer_norms_add_up_name_each_module_and_agree_scanned_over_a_mesh_or_not():
  """AdamW steps of a 3-layer model, unscanned on one device and scanned on a 2x1x2 mesh
  from the same weights: at step 2 (watched) the same groups and norms; each quantity's
  group norms add up (in squares) to its global norm; a group's update norm is the norm
  of what that module's weights moved. Step 1 (not watched) has only zero gradient
  norms. A step skipped for a NaN weight reports its gradient's norms unwatched, and
  watched no update."""
  unscanned = init_params(Transformer(CFG), jax.random.key(0))
  stacked = {k: v for k, v in unscanned.items() if not k.startswith("layer_")}
  stacked["layers"] = {"block": jax.tree.map(lambda *xs: jnp.stack(xs),
                                             *[unscanned[f"layer_{i}"] for i in range(3)])}
  one = sharding.make_mesh(MeshConfig(1, 1, 1), jax.devices()[:1])
  split = sharding.make_mesh(MeshConfig(2, 1, 2), jax.devices()[:4])
  before, after, metrics, first, (train_step, batch) = _step(
      CFG, jax.tree.map(jnp.copy, unscanned), one)
  _, _, scanned, _, _ = _step(dataclasses.replace(CFG, scan_layers=True), stacked, split)
  assert sorted(first) == sorted(f"grad_norm/{g}" for g in GROUPS)
  assert not any(float(v) for v in first.values())

  layers = metrics["layers"]
  assert sorted(layers) == sorted(f"{q}/{g}" for q in QUANTITIES for g in GROUPS)
  assert sorted(scanned["layers"]) == sorted(layers)
  for key, value in layers.items():
    np.testing.assert_allclose(scanned["layers"][key], value, rtol=1e-4, err_msg=key)

  moved = jax.tree.map(lambda a, b: np.asarray(a, np.float64) - np.asarray(b, np.float64),
                       jax.device_get(after.params), before.params)
  for quantity, whole in (("grad_norm", float(metrics["grad_norm"])),
                          ("param_norm", _norm(jax.device_get(after.params))),
                          ("update_norm", _norm(moved))):
    total = np.sqrt(sum(np.square(float(v)) for k, v in layers.items()
                        if k.startswith(quantity + "/")))
    np.testing.assert_allclose(total, whole, rtol=1e-5, err_msg=quantity)
  assert 0 < float(layers["update_norm/layer_01/mlp"]) < float(layers["param_norm/layer_01/mlp"])
  np.testing.assert_allclose(layers["update_norm/layer_01/mlp"], _norm(moved["layer_1"]["mlp"]),
                             rtol=1e-4)
  np.testing.assert_allclose(layers["param_norm/embed"],
                             _norm(jax.device_get(after.params)["embed"]), rtol=1e-6)
  assert not np.isclose(float(layers["grad_norm/layer_00/mlp"]),
                        float(layers["grad_norm/layer_02/mlp"]), rtol=1e-3)

  poisoned = jax.tree.map(np.array, jax.device_get(after.params))  # writable copies
  poisoned["layer_1"]["mlp"]["wi"]["kernel"][0, 0] = np.nan
  poisoned = jax.tree.map(lambda x, a: jax.device_put(x, a.sharding), poisoned, after.params)
  placed = jax.tree.map(lambda a: a.sharding, after)
  state = after.replace(params=poisoned)
  state, unwatched = jax.device_get(train_step(state, batch))
  assert int(unwatched["skip_reason"]) == 1
  assert sorted(unwatched["layers"]) == sorted(first)
  assert np.isnan(unwatched["layers"]["grad_norm/layer_01/mlp"])
  state = jax.tree.map(jax.device_put, state, placed)
  _, metrics = jax.device_get(train_step(state, batch, watch=True))
  assert int(metrics["skip_reason"]) == 1
  assert all(float(v) == 0 for k, v in metrics["layers"].items() if k.startswith("update_norm/"))
  assert np.isnan(metrics["layers"]["param_norm/layer_01/mlp"])
  assert np.isfinite(metrics["layers"]["param_norm/layer_00/mlp"])
