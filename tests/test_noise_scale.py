"""The gradient noise scale: the estimator against per-example gradients, the step's logged
values against an independent computation, and the 'gns' batch-size schedule (growth,
bit-exact resume across a change of batch size, exact token counts)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import train
from bigsci_jax import data, loop, sharding
from bigsci_jax import step as steps
from bigsci_jax.config import (BatchConfig, DataConfig, MeshConfig, ModelConfig, OptimizerConfig,
                               RunConfig, TrainConfig)
from bigsci_jax.metrics import read_metrics
from bigsci_jax.model import Transformer
from bigsci_jax.optim import learning_rate_schedule, make_optimizer
from bigsci_jax.scaling.noise import NoiseScale, estimates


@pytest.mark.parametrize("seed", [0, 1])
def test_the_estimate_matches_b_simple_from_every_per_example_gradient(seed):
  """Linear regression with Gaussian noise: per-example gradients are exact, so B_simple =
  tr(Sigma) / |G|^2 over the whole data set is known at fixed parameters."""
  rng = np.random.default_rng(seed)
  d, n = 16, 20000
  x = rng.standard_normal((n, d)).astype(np.float32)
  w_true = rng.standard_normal(d).astype(np.float32)
  y = x @ w_true + 0.5 * rng.standard_normal(n).astype(np.float32)
  w = w_true + 0.3 / np.sqrt(d)  # away from the optimum: |G| > 0
  per_example = (x @ w - y)[:, None] * x
  mean = per_example.mean(axis=0)
  b_simple = np.trace(np.cov(per_example.T, bias=True)) / (mean @ mean)
  grad_of_sum = jax.jit(jax.grad(lambda w, xb, yb: 0.5 * jnp.sum(jnp.square(xb @ w - yb))))
  noise, micro, rows = NoiseScale.empty(), 4, 32  # 4 micro-batches of 32: B_big = 128
  for _ in range(600):
    index = rng.choice(n, micro * rows, replace=False).reshape(micro, rows)
    sums = [np.asarray(grad_of_sum(w, x[i], y[i])) for i in index]
    big = np.sum(sums, axis=0) / (micro * rows)
    g2, trace = estimates(jnp.asarray([np.sum(np.square(s / rows)) for s in sums]),
                          jnp.full((micro,), float(rows)), jnp.float32(big @ big),
                          jnp.float32(micro * rows))
    noise = noise.update(g2, trace, 1.0, 0.95)
  assert float(noise.b_simple()) == pytest.approx(b_simple, rel=0.1), b_simple


CFG = ModelConfig(num_layers=2, d_model=32, num_heads=4, d_ff=64, vocab_size=64, max_len=32,
                  dtype="float32")


def test_the_step_logs_the_estimate_of_its_own_micro_batches():
  model = Transformer(CFG)
  tx, schedule = make_optimizer(OptimizerConfig(), 10)
  mesh = sharding.make_mesh(MeshConfig(2, 1, 1), jax.devices()[:2])
  _, shardings = steps.abstract_state(model, tx, mesh, 32)
  state = steps.init_state(model, tx, mesh, 0, 32)
  params = jax.device_get(state.params)
  train_step = steps.make_train_step(model, tx, schedule, mesh, shardings,
                                     TrainConfig(gns_every=2, gns_ema=0.9))
  host = data.split_micro_batches(data.SyntheticLM(64, 32, mean_doc_len=10).take(12), 3)
  batch = data.to_global(host, sharding.batch_sharding(mesh, 3, batch_axis=1), 4)
  state, metrics = train_step(state, batch)
  # the same quantities from per-micro-batch gradients computed here
  grad = jax.jit(jax.grad(lambda p, b: steps.loss_sums(p, b, model)[0]))
  micro_grads, weights = [], []
  for i in range(3):
    part = {k: v[i] for k, v in host.items()}
    micro_grads.append(np.concatenate([np.ravel(g) for g in jax.tree.leaves(grad(params, part))]))
    weights.append(float(part["decoder_loss_weights"].sum()))
  big = np.sum(micro_grads, axis=0) / sum(weights)
  small = np.mean([np.sum(np.square(g / w)) for g, w in zip(micro_grads, weights)])
  trace = (small - big @ big) / (np.mean(1 / np.array(weights)) - 1 / sum(weights))
  g2 = big @ big - trace / sum(weights)
  assert float(metrics["gns_trace"]) == pytest.approx(trace, rel=1e-3)
  assert float(metrics["gns_g2"]) == pytest.approx(g2, rel=1e-3)
  assert float(metrics["gns"]) == pytest.approx(trace / g2, rel=2e-3)
  assert int(state.batch_rows) == 12
  assert float(state.noise.tokens_per_row) == pytest.approx(sum(weights) / 12)
  # gns_every=2: step 1 does not sample (the estimate stays), step 2 does
  first = float(metrics["gns"])
  state, metrics = train_step(state, batch)
  assert float(metrics["gns"]) == first
  state, metrics = train_step(state, batch)
  assert float(metrics["gns"]) != first


def test_gns_batch_size_rounds_up_within_bounds_and_never_shrinks():
  cfg = BatchConfig(batch_size=64, seq_len=32, micro_batch_size=8, warmup_start=8,
                    schedule="gns")
  assert data.gns_batch_size(cfg, 8, float("nan"), 30.0) == 8     # not measured yet
  assert data.gns_batch_size(cfg, 8, 300.0, 30.0) == 16           # 10 rows -> 16
  assert data.gns_batch_size(cfg, 24, 300.0, 30.0) == 24          # never shrinks
  assert data.gns_batch_size(cfg, 8, 1e6, 30.0) == 64             # capped
  assert data.gns_batch_size(dataclasses.replace(cfg, gns_factor=2.0), 8, 300.0, 30.0) == 24


GNS_RUN = RunConfig(
    model=dataclasses.replace(CFG, dropout=0.1),
    optimizer=OptimizerConfig(learning_rate=3e-3, warmup_steps=2, decay_steps=8),
    batch=BatchConfig(batch_size=64, seq_len=32, micro_batch_size=8, warmup_start=8,
                      schedule="gns", gns_adapt_every=2, gns_factor=2.0),
    mesh=MeshConfig(2, 2, 1),
    data=DataConfig(mean_doc_len=12),
    train=TrainConfig(train_steps=8, checkpoint_every=5, eval_every=0, gns_every=1))


def _lines(model_dir):
  return [(r["step"], r["loss"], r["batch_tokens"], r["tokens_seen"], r["gns"])
          for r in read_metrics(model_dir, "train")]


@pytest.mark.slow  # the estimate is fast in test_a_run_without_accumulation_logs_the_noise_scale
def test_the_gns_schedule_grows_the_batch_and_resumes_bit_exactly(tmp_path):
  straight = loop.train(GNS_RUN, str(tmp_path / "straight"), progress=False)
  lines = _lines(str(tmp_path / "straight"))
  sizes = [b // 32 for _, _, b, _, _ in lines]
  # B_simple is ~250 tokens here: 2 x 250 / 32 tokens per row -> 16 sequences at step 2
  assert sizes == sorted(sizes) and sizes[:2] == [8, 8] and sizes[2] > 8, sizes
  assert all(s % 8 == 0 and s <= 64 for s in sizes)
  changes = [i + 1 for i in range(len(sizes) - 1) if sizes[i + 1] != sizes[i]]
  assert changes and all(step % 2 == 0 for step in changes)  # only at adaptation steps
  assert [t for *_, t, _ in lines] == list(np.cumsum([b for _, _, b, _, _ in lines]))
  assert all(np.isfinite(g) and g > 0 for *_, g in lines)
  # the LR schedule runs on tokens: full batches of 64 x 32 tokens seen before each step
  by_steps = learning_rate_schedule(GNS_RUN.optimizer, GNS_RUN.train.train_steps)
  logged = [r["learning_rate"] for r in read_metrics(str(tmp_path / "straight"), "train")]
  before = [t - b for _, _, b, t, _ in lines]
  np.testing.assert_allclose(logged, [float(by_steps(t / (64 * 32))) for t in before], rtol=1e-6)
  assert int(straight["state"].rows_seen) * 32 == lines[-1][3]
  resumed_dir = str(tmp_path / "resumed")
  for steps_so_far in (1, 3):  # stop before the first change, then after it
    loop.train(dataclasses.replace(GNS_RUN, train=dataclasses.replace(
        GNS_RUN.train, train_steps=steps_so_far)), resumed_dir, progress=False)
  resumed = loop.train(GNS_RUN, resumed_dir, progress=False)
  assert _lines(resumed_dir) == lines  # equality, not closeness, across the batch change
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(resumed["state"].params),
               jax.device_get(straight["state"].params))
  assert int(resumed["state"].batch_rows) == sizes[-1]
  assert int(resumed["state"].step) == 8


def test_a_run_without_accumulation_logs_the_noise_scale(tmp_path, capsys):
  model_dir = str(tmp_path / "run")
  assert train.main([f"--model_dir={model_dir}", "--no_progress", "--gin.MIXTURE='synthetic'",
                     "--gin.ModelConfig.vocab_size=64", "--gin.TRAIN_STEPS=6", "--gin.BATCH_SIZE=8",
                     "--gin.SEQ_LEN=32", "--gin.ModelConfig.d_model=32", "--gin.ModelConfig.d_ff=64",
                     "--gin.TrainConfig.eval_batches=1", "--gin.TrainConfig.gns_every=2",
                     "--gin.MeshConfig.data=4"]) == 0
  gns = [r["gns"] for r in read_metrics(model_dir, "train")]
  assert gns[0] is not None and gns[0] > 0          # step 0 ran as two halves
  assert gns[1] == gns[0] and gns[2] != gns[1]      # sampled on every second step only
  assert all(r["batch_tokens"] == 8 * 32 for r in read_metrics(model_dir, "train"))
  capsys.readouterr()
  bad = train.main([f"--model_dir={tmp_path / 'bad'}", "--no_progress", "--gin.MIXTURE='synthetic'",
                    "--gin.BATCH_SIZE=6", "--gin.TrainConfig.gns_every=1", "--gin.MeshConfig.data=2",
                    "--gin.TrainConfig.eval_batches=1"])
  assert bad == 2 and "two halves of 3 sequences" in capsys.readouterr().err

