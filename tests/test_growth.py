"""Growth operators: the grown model computes the same function, and keeps training
like the small one."""

import dataclasses
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from bigsci_jax import flops, growth, sharding
from bigsci_jax import step as steps
from bigsci_jax.config import MeshConfig, ModelConfig, OptimizerConfig
from bigsci_jax.data import SyntheticLM
from bigsci_jax.model import Transformer, init_params
from bigsci_jax.optim import make_optimizer

BASE = ModelConfig(num_layers=2, d_model=16, num_heads=2, d_ff=32, vocab_size=64, max_len=32,
                   dtype="float32", init_std=0.2)
WIDTH_CASES = [  # every position option, tied and untied, both norms, every activation
    dict(tie_embeddings=False, norm="rmsnorm", activation="swiglu"),
    pytest.param(dict(position="alibi", embedding_norm=True, activation="geglu"), marks=pytest.mark.slow),
    dict(position="rotary", num_heads=4, num_kv_heads=2, head_dim=4, activation="relu2"),
    pytest.param(dict(position="sinusoidal", use_bias=False, scan_layers=False), marks=pytest.mark.slow),
    pytest.param(dict(position="none", mask="prefix", tie_embeddings=False), marks=pytest.mark.slow),
]


def _batch(cfg, rows=4, length=16, seed=0):
  source = SyntheticLM(cfg.vocab_size, length, seed=seed, mean_doc_len=6, prefix_lm=cfg.mask == "prefix")
  return source.take(rows)


@functools.cache
def _jitted(cfg):
  model = Transformer(cfg)

  def logits(params, batch):
    return model.apply({"params": params}, **steps.model_inputs(cfg, batch))

  def loss(params, batch):
    weight, ce = steps.loss_sums(params, batch, model)[1]
    return ce / weight

  return jax.jit(logits), jax.jit(loss)


def _logits(cfg, params, batch):
  return _jitted(cfg)[0](params, batch)


def _loss(cfg, params, batch):
  return float(_jitted(cfg)[1](params, batch))


def _trained(cfg, n=5, opt=OptimizerConfig(learning_rate=1e-2, weight_decay=0.0)):
  """A TrainState after n AdamW steps on synthetic batches."""
  model = Transformer(cfg)
  tx, schedule = make_optimizer(opt, 100)
  mesh = sharding.make_mesh(MeshConfig(1, 1, 1), jax.devices()[:1])
  state = jax.device_get(steps.init_state(model, tx, mesh, 0, 16))
  train_step = jax.jit(functools.partial(steps.train_step, model=model, tx=tx, schedule=schedule))
  for i in range(n):
    batch = {k: v[None] for k, v in _batch(cfg, seed=100 + i).items()}
    state, _ = train_step(state, batch)
  return state, tx


@pytest.mark.parametrize("overrides", WIDTH_CASES, ids=lambda o: ",".join(o))
def test_width_growth_keeps_logits_and_loss(overrides):
  cfg = dataclasses.replace(BASE, **overrides)
  batch = _batch(cfg)
  with jax.default_matmul_precision("highest"):
    axes = growth.logical_axes(cfg)
    fresh = jax.jit(lambda key: init_params(Transformer(cfg), key, 16))(jax.random.key(1))
    for params in (fresh, _trained(cfg)[0].params):
      wide = jax.jit(lambda p: growth.widen_params(p, axes))(params)
      target = growth.grown_config(cfg, "width")
      small_logits, wide_logits = _logits(cfg, params, batch), _logits(target, wide, batch)
      assert wide_logits.shape == small_logits.shape
      assert float(jnp.abs(wide_logits - small_logits).max()) <= 1e-4
      assert abs(_loss(cfg, params, batch) - _loss(target, wide, batch)) <= 1e-5
  small, big = flops.param_counts(cfg), flops.param_counts(target)
  assert big.non_embedding == 4 * small.non_embedding - _vector_params(cfg) * 2
  assert big.embedding == 2 * small.embedding


def _vector_params(cfg):
  """Parameters along a single widened axis (biases, norms): x2 rather than x4."""
  params = jax.eval_shape(lambda key: init_params(Transformer(cfg), key), jax.random.key(0))
  axes = growth.logical_axes(cfg)
  leaves = zip(jax.tree.leaves(params), jax.tree.leaves(axes, is_leaf=growth._is_axes))
  return sum(x.size for x, ax in leaves
             if sum(a in growth.WIDE_AXES for a in ax) == 1 and "vocab" not in ax
             and "position" not in ax)


UNROLLED = dict(scan_layers=False, norm="rmsnorm", activation="swiglu", position="alibi")


@pytest.mark.parametrize("mode, overrides", [
    pytest.param("interleave", dict(), id="scanned-interleave"),
    pytest.param("append", UNROLLED, id="unrolled-append"),
    pytest.param("append", dict(), id="scanned-append", marks=pytest.mark.slow),
    pytest.param("interleave", UNROLLED, id="unrolled-interleave", marks=pytest.mark.slow)])
def test_depth_growth_is_an_exact_identity(mode, overrides):
  cfg = dataclasses.replace(BASE, **overrides)
  batch = _batch(cfg)
  state, _ = _trained(cfg)
  deep = growth.deepen(state.params, cfg, mode, new_layer=growth._identity_layer)
  target = growth.grown_config(cfg, "depth")
  assert abs(_loss(cfg, state.params, batch) - _loss(target, deep, batch)) <= 1e-6

  # The old layers' gradients are unchanged at the first step.
  def grads(c, p):
    return jax.jit(jax.grad(lambda q: steps.loss_sums(q, batch, Transformer(c))[0]))(p)
  small_g, deep_g = grads(cfg, state.params), grads(target, deep)
  old = [i for i, (_, new) in enumerate(growth._order(cfg.num_layers, mode)) if not new]
  if cfg.scan_layers:
    for a, b in zip(jax.tree.leaves(small_g["layers"]), jax.tree.leaves(deep_g["layers"])):
      np.testing.assert_allclose(b[np.array(old)], a, atol=1e-6, rtol=1e-5)
  else:
    for i, j in enumerate(old):
      jax.tree.map(lambda a, b: np.testing.assert_allclose(b, a, atol=1e-6, rtol=1e-5),
                   small_g[f"layer_{i}"], deep_g[f"layer_{j}"])

  # Control: plain layer copying (the released code's operator) changes the loss.
  copied = growth.deepen(state.params, cfg, mode, new_layer=lambda path, x: x)
  assert abs(_loss(cfg, state.params, batch) - _loss(target, copied, batch)) > 1e-3


def test_grown_state_moments_and_counters():
  cfg = BASE
  state, _ = _trained(cfg)
  wide, target = growth.grow_state(state, cfg, "width", step=3, rows_per_step=8)
  adam = [s for s in jax.tree.leaves(state.opt_state, is_leaf=lambda s: isinstance(
      s, optax.ScaleByAdamState)) if isinstance(s, optax.ScaleByAdamState)][0]
  wide_adam = [s for s in jax.tree.leaves(wide.opt_state, is_leaf=lambda s: isinstance(
      s, optax.ScaleByAdamState)) if isinstance(s, optax.ScaleByAdamState)][0]
  assert int(wide_adam.count) == int(adam.count) == 5 and int(wide.step) == 3
  kernel = adam.mu["layers"]["block"]["mlp"]["wi"]["kernel"]          # [layers, D, F]
  wide_kernel = wide_adam.nu["layers"]["block"]["mlp"]["wi"]["kernel"]
  d, f = kernel.shape[1:]
  np.testing.assert_allclose(wide_adam.mu["layers"]["block"]["mlp"]["wi"]["kernel"][:, d:, f:],
                             kernel / 2)
  np.testing.assert_allclose(wide_kernel[:, :d, :f],
                             adam.nu["layers"]["block"]["mlp"]["wi"]["kernel"] / 4)
  assert not np.any(wide_kernel[:, :d, f:])
  np.testing.assert_allclose(wide_adam.mu["final_norm"]["scale"][d:], adam.mu["final_norm"]["scale"])
  schedule_counts = [int(s.count) for s in jax.tree.leaves(
      wide.opt_state, is_leaf=lambda s: isinstance(s, optax.ScaleByScheduleState))
      if isinstance(s, optax.ScaleByScheduleState)]
  assert schedule_counts == [24] and int(wide.rows_seen) == 24  # the LR clock counts rows
  assert target.d_model == 2 * cfg.d_model and target.head_dim == cfg.head_dim


def _float64_run(cfg, opt, state, batches, mask=None):
  """Losses of plain AdamW steps on `batches`; updates multiplied by `mask` (a
  parameter-shaped tree) when given."""
  model = Transformer(cfg)
  tx, _ = make_optimizer(opt, 1000)

  @jax.jit
  def one(params, opt_state, batch):
    (_, (weight, ce)), grads = jax.value_and_grad(steps.loss_sums, has_aux=True)(
        params, batch, model)
    updates, opt_state = tx.update(grads, opt_state, params)
    if mask is not None:
      updates = jax.tree.map(jnp.multiply, updates, mask)
    return optax.apply_updates(params, updates), opt_state, ce / weight

  params, opt_state, losses = state.params, state.opt_state, []
  for batch in batches:
    params, opt_state, loss = one(params, opt_state, batch)
    losses.append(float(loss))
  return np.array(losses), params


@pytest.mark.slow  # 13 s; the fast tests check logits and loss are kept exactly
def test_width_growth_keeps_training_dynamics_in_float64():
  """Grown Adam steps reproduce the small model's: off-diagonal updates masked, the
  final norm's LR halved (its two copies add up), eps negligible against sqrt(v).
  Unscaled or reset moments are the controls that must fail."""
  with jax.enable_x64(True):
    cfg = dataclasses.replace(BASE, dtype="float64", param_dtype="float64")
    opt = OptimizerConfig(learning_rate=1e-2, decay="constant", weight_decay=0.0, clip_norm=None,
                          eps=1e-30)
    state, _ = _trained(cfg, n=5, opt=opt)
    batches = [{k: jnp.asarray(v) for k, v in _batch(cfg, seed=200 + i % 4).items()}
               for i in range(20)]
    small, _ = _float64_run(cfg, opt, state, batches)

    axes = growth.logical_axes(cfg)
    grown, target = growth.grow_state(state, cfg, "width")
    mask = jax.tree_util.tree_map_with_path(
        lambda path, x, ax: jnp.where(jnp.asarray(growth.off_diagonal(x.shape, ax)), 0.0,
                                      0.5 if growth._is_final_norm(path) else 1.0),
        grown.params, axes)
    wide, _ = _float64_run(target, opt, grown, batches, mask)
    assert np.abs(wide - small).max() <= 1e-10, np.abs(wide - small).max()
    assert small[-4:].mean() < small[:4].mean() - 0.05  # the steps really move the model

    def with_moments(power):
      def adam(s):
        if power is None:
          return s._replace(mu=jax.tree.map(jnp.zeros_like, growth.widen_moments(s.mu, axes, 1)),
                            nu=jax.tree.map(jnp.zeros_like, growth.widen_moments(s.nu, axes, 2)))
        return s._replace(mu=growth.widen_moments(s.mu, axes, power),
                          nu=growth.widen_moments(s.nu, axes, power))
      return grown.replace(opt_state=growth._map_adam(state.opt_state, adam))
    for control in (0, None):  # unscaled moments, reset moments
      losses, _ = _float64_run(target, opt, with_moments(control), batches, mask)
      assert np.abs(losses - small).max() > 1e-2, control


def _halves_gap(params, d):
  kernel = params["layers"]["block"]["mlp"]["wi"]["kernel"]  # [layers, 2D, 2F]
  f = kernel.shape[2] // 2
  return float(jnp.abs(kernel[:, :d, :f] - kernel[:, d:, f:]).max())


@pytest.mark.parametrize("noise_std", [pytest.param(0.0, marks=pytest.mark.slow),
                                       pytest.param(1e-3, marks=pytest.mark.slow)])
def test_symmetry_breaker(noise_std):
  """Without a breaker the two copies stay equal through 50 AdamW steps; with noise
  on the off-diagonal blocks they drift apart."""
  cfg = BASE
  opt = OptimizerConfig(learning_rate=1e-2, decay="constant", weight_decay=0.0)
  state, _ = _trained(cfg, n=2, opt=opt)
  grown, target = growth.grow_state(state, cfg, "width", noise_std=noise_std,
                                    key=jax.random.key(3))
  batches = [{k: jnp.asarray(v) for k, v in _batch(cfg, seed=300 + i).items()} for i in range(50)]
  _, params = _float64_run(target, opt, grown, batches)
  gap = _halves_gap(params, cfg.d_model)
  assert (gap <= 1e-6) if noise_std == 0 else (gap > 1e-3), gap


def test_grow_command_from_checkpoint_and_resume_with_train_py(tmp_path, capsys):
  import json

  import train
  from bigsci_jax import growth_command
  from bigsci_jax.metrics import read_metrics
  small_dir, big_dir = str(tmp_path / "small"), str(tmp_path / "big")
  flags = ["--no_progress", "--gin.MIXTURE='synthetic'", "--gin.ModelConfig.vocab_size=64",
           "--gin.TRAIN_STEPS=12", "--gin.BATCH_SIZE=8", "--gin.SEQ_LEN=32",
           "--gin.ModelConfig.d_model=32", "--gin.ModelConfig.d_ff=64",
           "--gin.TrainConfig.eval_batches=2", "--gin.TrainConfig.checkpoint_every=6",
           "--gin.TrainConfig.eval_every=0", "--gin.ModelConfig.position='alibi'"]
  assert train.main([f"--model_dir={small_dir}", *flags]) == 0
  capsys.readouterr()
  # Too much symmetry-breaking noise: refused, nothing written.
  assert growth_command.main([f"--from_dir={small_dir}", f"--to_dir={big_dir}", "--op=width",
                              "--noise_std=0.5", "--set", "TrainConfig.train_steps=20"]) == 2
  assert "nothing was written" in capsys.readouterr().err and not os.path.exists(big_dir)

  with open(os.path.join(small_dir, "vocab.model"), "wb") as f:  # a text run's vocabulary
    f.write(b"\x00pieces\xff")
  assert growth_command.main([f"--from_dir={small_dir}", f"--to_dir={big_dir}", "--op=width",
                              "--rewarm_steps=4", "--set", "TrainConfig.train_steps=20"]) == 0
  assert open(os.path.join(big_dir, "vocab.model"), "rb").read() == b"\x00pieces\xff"
  result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert abs(result["loss_after"] - result["loss_before"]) <= 1e-5
  assert result["step_before"] == 12 and result["step_after"] == round(12 / 2.718)
  assert result["params_after"] > 3 * result["params_before"]

  deep_dir = str(tmp_path / "deep")
  assert growth_command.main([f"--from_dir={small_dir}", f"--to_dir={deep_dir}", "--op=depth",
                              "--depth_mode=append", "--set", "TrainConfig.train_steps=20"]) == 0
  deep = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert abs(deep["loss_after"] - deep["loss_before"]) <= 1e-6
  assert deep["step_after"] == round(12 / 1.618)
  assert json.load(open(os.path.join(deep_dir, "config.json")))["model"]["num_layers"] == 4

  assert train.main([f"--model_dir={big_dir}", "--no_progress"]) == 0
  rows = read_metrics(big_dir, "train")
  assert [r["step"] for r in rows] == list(range(result["step_after"] + 1, 21))
  assert rows[0]["learning_rate"] < rows[4]["learning_rate"]  # re-warming
  grown_run = json.load(open(os.path.join(big_dir, "config.json")))
  assert grown_run["model"]["d_model"] == 64 and len(grown_run["model"]["alibi_slopes"]) == 8
