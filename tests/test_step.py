"""Gradient accumulation, the batch-size ramp, the LR schedule, the weight-decay mask and
the update guard."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from bigsci_jax import data, sharding
from bigsci_jax import step as steps
from bigsci_jax.config import BatchConfig, MeshConfig, ModelConfig, OptimizerConfig, TrainConfig
from bigsci_jax.model import Transformer, init_params
from bigsci_jax.optim import cooldown_start, decay_mask, learning_rate_schedule, make_optimizer

CFG = ModelConfig(num_layers=2, d_model=32, num_heads=4, d_ff=64, vocab_size=64, max_len=32,
                  dtype="float32", z_loss=1e-4)


def _flat(tree):
  return np.concatenate([np.ravel(x) for x in jax.tree.leaves(tree)])


@pytest.mark.parametrize("mask", ["causal", "prefix"])
def test_accumulated_gradient_equals_full_batch_gradient(mask):
  cfg = ModelConfig(**{**CFG.__dict__, "mask": mask})
  model = Transformer(cfg)
  params = init_params(model, jax.random.key(0))
  rows = data.SyntheticLM(64, 32, mean_doc_len=10, prefix_lm=mask == "prefix").take(8)

  @jax.jit
  def mean_grad(params, batch):
    grads, weight, _, _ = steps.accumulate_gradients(params, batch, model)
    return jax.tree.map(lambda g: g / weight, grads)

  with jax.default_matmul_precision("highest"):
    full = _flat(mean_grad(params, data.split_micro_batches(rows, 1)))
    accumulated = _flat(mean_grad(params, data.split_micro_batches(rows, 4)))
  # Micro-batches hold different numbers of loss tokens: a mean of means would differ.
  assert np.linalg.norm(accumulated - full) / np.linalg.norm(full) <= 1e-6


@pytest.mark.parametrize("tie", [True, False])
def test_logits_in_chunks_give_the_loss_and_gradients_of_all_at_once(tie):
  """ModelConfig.logits_chunk: the loss over 30 columns in chunks of 8 (the last one
  padded) or 30, in float64, equals the loss of all logits at once, and so do its
  gradients (the head's and the embedding's included), z-loss on."""
  rows = data.SyntheticLM(64, 30, mean_doc_len=10).take(3)
  with jax.enable_x64(True):
    cfg = dataclasses.replace(CFG, dtype="float64", param_dtype="float64", tie_embeddings=tie)
    params = init_params(Transformer(cfg), jax.random.key(0))
    batch = jax.tree.map(jnp.asarray, rows)

    def loss_and_grads(chunk):
      model = Transformer(dataclasses.replace(cfg, logits_chunk=chunk))
      (loss, (weight, ce)), grads = jax.jit(jax.value_and_grad(steps.loss_sums, has_aux=True),
                                            static_argnums=2)(params, batch, model)
      return loss, ce, grads

    whole = loss_and_grads(0)
    for chunk in (8, 30):
      loss, ce, grads = loss_and_grads(chunk)
      np.testing.assert_allclose(loss, whole[0], rtol=1e-12)
      np.testing.assert_allclose(ce, whole[1], rtol=1e-12)
      np.testing.assert_allclose(_flat(grads), _flat(whole[2]), rtol=1e-10, atol=1e-14)
    assert float(whole[0]) > float(whole[1]) > 0  # the z-loss is in the loss, not in ce


def test_logits_chunk_keeps_one_chunk_of_logits_at_a_time():
  """The compiled gradient of a 256-column loss over a 16384-token vocabulary holds the
  [4, 256, V] float32 logits whole (64 MiB); in chunks of 32 columns its temporaries
  are under half of that (one head, one layer: the logits are the largest activation)."""
  cfg = dataclasses.replace(CFG, num_layers=1, num_heads=1, num_kv_heads=1, vocab_size=16384,
                            max_len=256)
  params = init_params(Transformer(cfg), jax.random.key(0))
  batch = jax.tree.map(jnp.asarray, data.SyntheticLM(16384, 256, mean_doc_len=100).take(4))

  def temp_bytes(chunk):
    model = Transformer(dataclasses.replace(cfg, logits_chunk=chunk))
    grad = jax.jit(jax.grad(lambda p: steps.loss_sums(p, batch, model)[0]))
    return grad.lower(params).compile().memory_analysis().temp_size_in_bytes

  logits = 4 * 256 * 16384 * 4
  whole, chunked = temp_bytes(0), temp_bytes(32)
  assert whole > logits, (whole, logits)
  assert chunked < logits / 2, (chunked, whole, logits)


def test_batch_ramp_follows_megatron_rule():
  cfg = BatchConfig(batch_size=16, seq_len=32, micro_batch_size=4, warmup_start=4,
                    warmup_increment=4, warmup_tokens=768)
  # 3 increments over 768 tokens: one every 256 tokens seen.
  # step 0: 0 seen -> 4; step 1: 128 -> 4; step 2: 256 -> 8; step 3: 512 -> 12; then 16.
  assert data.batch_schedule(cfg, 7) == [4, 4, 8, 12, 16, 16, 16]
  assert data.batch_schedule(BatchConfig(batch_size=16, seq_len=32), 3) == [16, 16, 16]


def test_batch_warmup_compiles_once_per_accumulation_count():
  cfg = BatchConfig(batch_size=16, seq_len=32, micro_batch_size=4, warmup_start=4,
                    warmup_increment=4, warmup_tokens=768)
  mesh = sharding.make_mesh(MeshConfig(2, 2, 1), jax.devices()[:4])
  model = Transformer(CFG)
  tx, schedule = make_optimizer(OptimizerConfig(), 10)
  _, shardings = steps.abstract_state(model, tx, mesh, 32)
  state = steps.init_state(model, tx, mesh, 0, 32)
  train_step = steps.make_train_step(model, tx, schedule, mesh, shardings)
  source = data.SyntheticLM(64, 32, mean_doc_len=10)
  in_sharding = sharding.batch_sharding(mesh, 3, batch_axis=1)
  sizes = data.batch_schedule(cfg, 8)
  for rows in sizes:
    host = data.split_micro_batches(source.take(rows), rows // cfg.micro_batch_size)
    state, _ = train_step(state, data.to_global(host, in_sharding, cfg.micro_batch_size))
  assert source.position == sum(sizes)
  assert train_step.jitted._cache_size() == len({s // 4 for s in sizes}) == 4


def test_a_state_around_given_parameters_has_them_and_a_fresh_optimizer_state():
  """init_state(params=...) (an imported checkpoint): those parameters in their shardings,
  the optimizer state a fresh init would have (no random initialisation runs)."""
  mesh = sharding.make_mesh(MeshConfig(2, 2, 1), jax.devices()[:4])
  model = Transformer(CFG)
  tx, _ = make_optimizer(OptimizerConfig(), 10)
  fresh = steps.init_state(model, tx, mesh, 0, 32)
  given = jax.tree.map(lambda x: x + 1.0, init_params(model, jax.random.key(5)))
  expected = jax.device_get(given)
  _, shardings = steps.abstract_state(model, tx, mesh, 32)
  state = steps.init_state(model, tx, mesh, 0, 32,
                           params=jax.device_put(given, shardings.params))
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(state.params), expected)
  assert jax.tree.map(lambda x: x.sharding, state.params) == shardings.params
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(state.opt_state),
               jax.device_get(fresh.opt_state))  # zero moments, count 0
  assert int(state.step) == 0


def test_schedule_shapes():
  peak = 1e-3
  cos = learning_rate_schedule(OptimizerConfig(learning_rate=peak, warmup_steps=10,
                                               final_lr_fraction=0.1), 110)
  assert float(cos(0)) == pytest.approx(peak / 10)
  assert float(cos(9)) == pytest.approx(peak)
  assert float(cos(60)) == pytest.approx(0.55 * peak, rel=1e-5)  # halfway down the cosine
  assert float(cos(110)) == pytest.approx(0.1 * peak)
  assert float(cos(500)) == pytest.approx(0.1 * peak)
  lin = learning_rate_schedule(OptimizerConfig(learning_rate=peak, decay="linear",
                                               final_lr_fraction=0.0), 100)
  assert float(lin(50)) == pytest.approx(0.5 * peak)
  inv = learning_rate_schedule(OptimizerConfig(learning_rate=peak, warmup_steps=100,
                                               decay="inverse_sqrt", final_lr_fraction=0.0), 1000)
  assert float(inv(400)) == pytest.approx(0.5 * peak)
  const = learning_rate_schedule(OptimizerConfig(learning_rate=peak, decay="constant"), 100)
  assert float(const(99)) == pytest.approx(peak)


def test_wsd_holds_the_peak_until_its_cooldown():
  """Warmup-stable-decay: warmup 10, peak until step 80 of 100 (cooldown 20%), then
  1 - sqrt(x) down to the floor; a longer run of the same config has the same rates
  up to this run's cooldown start."""
  cfg = OptimizerConfig(learning_rate=1.0, warmup_steps=10, decay="wsd", final_lr_fraction=0.0,
                        cooldown_fraction=0.2)
  f = learning_rate_schedule(cfg, 100)
  assert cooldown_start(cfg, 100) == 80 and float(f(0)) == pytest.approx(0.1)
  assert float(f(10)) == float(f(80)) == 1.0
  assert float(f(85)) == pytest.approx(1 - 0.5)       # x = 1/4: 1 - sqrt(1/4)
  assert float(f(95)) == pytest.approx(1 - 0.75 ** 0.5)
  assert float(f(100)) == 0.0
  linear = learning_rate_schedule(dataclasses.replace(cfg, cooldown_shape="linear"), 100)
  assert float(linear(85)) == pytest.approx(0.75)
  longer = learning_rate_schedule(cfg, 1000)
  steps = np.arange(0, 81)
  np.testing.assert_array_equal(np.asarray(jax.vmap(f)(steps)),
                                np.asarray(jax.vmap(longer)(steps)))
  assert float(longer(81)) == 1.0 and float(f(81)) < 1.0


def test_rewarm_after_growth_matches_the_issue_test_vector():
  """Shen et al. 2022 staged training: warmup 3000, linear decay to 0 at 250,000, the
  step counter jumped to R = 3319, LR re-warmed over W_r = 200 steps."""
  f = learning_rate_schedule(OptimizerConfig(learning_rate=1.0, warmup_steps=3000, decay="linear",
                                             final_lr_fraction=0.0, rewarm_start=3319,
                                             rewarm_steps=200), 250_000)
  expected = {3319: 0.0, 3419: 0.498949, 3518: 0.992909, 3519: 0.997899, 4519: 0.993850}
  for step, value in expected.items():
    assert float(f(step)) == pytest.approx(value, abs=1e-6), step


def test_weight_decay_skips_norms_biases_and_embeddings():
  params = init_params(Transformer(CFG), jax.random.key(0))
  mask = decay_mask(params, OptimizerConfig().no_decay)
  assert mask["layers"]["block"]["mlp"]["wi"]["kernel"] is True
  assert mask["layers"]["block"]["mlp"]["wi"]["bias"] is False
  assert mask["layers"]["block"]["attention_norm"]["scale"] is False
  assert mask["embed"]["embedding"] is False and mask["pos_embed"]["embedding"] is False
  # And AdamW really leaves a masked parameter alone when its gradient is zero.
  tx, _ = make_optimizer(OptimizerConfig(learning_rate=0.1, weight_decay=0.5, clip_norm=None), 10)
  zeros = jax.tree.map(jnp.zeros_like, params)
  updates, _ = tx.update(zeros, tx.init(params), params)
  assert float(jnp.abs(updates["final_norm"]["scale"]).max()) == 0.0
  assert float(jnp.abs(updates["layers"]["block"]["mlp"]["wi"]["kernel"]).max()) > 0.0


def test_guard_keeps_the_state_on_non_finite_and_spiking_steps():
  model = Transformer(CFG)
  tx, _ = make_optimizer(OptimizerConfig(optimizer="sgd", learning_rate=0.1, clip_norm=None,
                                         weight_decay=0.0), 10)
  mesh = sharding.make_mesh(MeshConfig(1, 1, 1), jax.devices()[:1])
  state = steps.init_state(model, tx, mesh, 0, 32, window=4)
  train = TrainConfig(loss_spike_factor=2.0, grad_spike_factor=3.0, spike_window=4)
  update = jax.jit(lambda state, scale, loss: steps.guarded_update(
      state, jax.tree.map(lambda p: scale * jnp.ones_like(p), state.params), loss,
      scale * optax.tree.norm(jax.tree.map(jnp.ones_like, state.params)), train, tx))
  kernel = lambda s: np.asarray(s.params["layers"]["block"]["mlp"]["wi"]["kernel"])  # noqa: E731

  def step(state, scale, loss, expected_reason):
    new, reason, _ = update(state, scale, loss)
    assert int(reason) == expected_reason
    moved = not np.array_equal(kernel(new), kernel(state))
    assert moved == (expected_reason == 0)
    assert int(new.step) == int(state.step) + 1  # a skipped step still consumes its batch
    return new

  state = step(state, 1.0, 100.0, 0)   # a spike before the window is full is applied
  for loss in (1.0, 1.2, 0.8):
    state = step(state, 1.0, loss, 0)
  assert int(state.guard.accepted) == 4
  state = step(state, 1.0, jnp.nan, 1)
  state = step(state, jnp.inf, 1.0, 1)
  state = step(state, 1.0, 2.5, 2)      # > 2 x median(100, 1, 1.2, 0.8) = 2.2
  state = step(state, 4.0, 1.0, 3)      # gradient norm 4x its median
  assert int(state.guard.in_a_row) == 4
  state = step(state, 2.0, 2.0, 0)      # within both factors
  assert int(state.guard.in_a_row) == 0 and int(state.guard.accepted) == 5
  np.testing.assert_array_equal(np.asarray(state.guard.losses_W), np.float32([2.0, 1.0, 1.2, 0.8]))
