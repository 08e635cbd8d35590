"""Adapters. Soft prompts: a prompt made of token embeddings is those tokens (model,
Scorer, generation). LoRA: untrained it is the base model, merged it is W + s·A·B
(checked against x·W + s·(x·A)·B), offloaded kernels stay in host memory. Tuning
changes only the adapter; an adapter for another model shape is one sentence; end to
end on the smoke model (slow): the tuned prompt and the tuned LoRA beat the untuned
model by a significant paired gain, the checkpoint is only read, the adapter is all
that is written."""

import dataclasses
import hashlib
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from bigsci_jax import generate, likelihood, mc_tasks, sharding
from bigsci_jax import step as steps
from bigsci_jax.adapt import lora, soft_prompt, store, tune
from bigsci_jax.config import MeshConfig, ModelConfig
from bigsci_jax.model import SOFT_PROMPT, Transformer, init_params, soft_prompt_ids
from test_mc_tasks import Bytes, _tiny

WORDS = [5, 9, 17, 101]  # the tokens a prompt of their embeddings stands for


def _as_tokens(params):
  """A soft prompt whose rows are the embeddings of WORDS."""
  return soft_prompt.attach(params, params["embed"]["embedding"][jnp.asarray(WORDS)])


@pytest.mark.parametrize("mask", ["causal", "prefix"])
def test_a_prompt_of_token_embeddings_is_those_tokens(mask):
  model, params = _tiny(mask, max_len=64, seed=3)
  prompted = _as_tokens(params)
  assert soft_prompt_ids(prompted) == [-1, -2, -3, -4] and soft_prompt_ids(params) == []
  rng = np.random.default_rng(0)
  text = rng.integers(3, 259, 9).tolist()
  prefix = jnp.asarray([[1] * 8 + [0] * 6]) if mask == "prefix" else None
  virtual = model.apply({"params": prompted}, jnp.asarray([[0, -1, -2, -3, -4] + text]),
                        prefix_BxL=prefix)
  literal = model.apply({"params": params}, jnp.asarray([[0] + WORDS + text]), prefix_BxL=prefix)
  np.testing.assert_allclose(virtual, literal, atol=1e-5, rtol=0)

  scorer = likelihood.Scorer(model, prompted, Bytes(), seq_len=64, batch_size=4)
  plain = likelihood.Scorer(model, params, Bytes(), seq_len=64, batch_size=4)
  requests = [(text[:5], text[5:]), ([], text), (text[:2], text[2:3])]
  sums, greedy = scorer.score_requests(requests)
  want, want_greedy = plain.score_requests([(WORDS + c, x) for c, x in requests])
  np.testing.assert_allclose(sums, want, atol=1e-4, rtol=0)
  assert (greedy == want_greedy).all()
  # the prompt takes its share of the window: a context that fills it loses its left end
  long = rng.integers(3, 259, 70).tolist()
  (cut,), _ = scorer.score_requests([(long[:-3], long[-3:])])
  (want_cut,), _ = plain.score_requests([(WORDS + long[:-3][-(60 - 3):], long[-3:])])
  assert cut == pytest.approx(want_cut, abs=1e-4)

  if mask == "prefix":
    return  # generation reads the same rows for both masks
  prompts = [text[:3], text[:7]]
  assert (generate.generate(model, prompted, prompts, 6)
          == generate.generate(model, params, [WORDS + p for p in prompts], 6))
  with pytest.raises(generate.GenerationError, match="after a soft prompt of 4"):
    generate.generate(model, prompted, [text], 64 - 10)


@pytest.mark.parametrize("adapter", ["prompt", "lora"])
def test_tuning_moves_only_the_adapter_and_lowers_the_loss(adapter):
  # init_std 0.3: a random model whose outputs depend on its inputs enough to be steered
  model = Transformer(ModelConfig(num_layers=1, d_model=32, num_heads=2, d_ff=64, vocab_size=259,
                                  max_len=64, dtype="float32", init_std=0.3))
  params = init_params(model, jax.random.key(1))
  before = jax.tree.map(np.array, params)
  # a context-free preference the prompt can learn: the answer is always the same word,
  # the one the untuned model likes least
  words = ["zz", "ab", "mo", "qe"]
  untuned = likelihood.Scorer(model, params, Bytes(), 64, 8)
  target = words[int(np.argmin(untuned.loglikelihood([("abc", " " + w) for w in words])[0]))]
  rng = np.random.default_rng(0)
  items = []
  for _ in range(64):
    choices = [words[i] for i in rng.permutation(4)]
    items.append(mc_tasks.Item("".join(chr(c) for c in rng.integers(97, 123, 6)),
                               tuple(choices), choices.index(target)))
  cfg = tune.TuneConfig(adapter, num_virtual_tokens=4, lora_rank=4, steps=40, batch_size=8,
                        learning_rate=0.1 if adapter == "prompt" else 0.02)
  if adapter == "prompt":
    init = soft_prompt.init_from_vocab(params, 4, pool=259)
  else:
    init = cfg.initial(params)
  tuned, losses = tune.tune(model, params, items, Bytes(), init, cfg, seq_len=64)
  assert jax.tree.map(np.shape, tuned) == jax.tree.map(np.shape, init)
  assert not any(jax.tree.leaves(jax.tree.map(np.allclose, tuned, init)))  # every array moved
  assert np.mean(losses[-5:]) < 0.1 * np.mean(losses[:5]), losses
  jax.tree.map(np.testing.assert_array_equal, params, before)  # read, never written
  scorer = likelihood.Scorer(model, cfg.apply(params, tuned), Bytes(), 64, 8)
  score = lambda s: mc_tasks.score(items, lambda r: s.loglikelihood(r)[0])["acc"]  # noqa: E731
  assert score(scorer) == 1.0 and score(untuned) < 0.5
  if adapter == "lora":  # the frozen model split over a 2x1x2 mesh: the same tuning
    mesh = sharding.make_mesh(MeshConfig(2, 1, 2), jax.devices()[:4])
    placed = jax.device_put(params, steps.abstract_state(model, optax.identity(), mesh, 64)[1].params)
    assert any("tensor" in str(x.sharding.spec) for x in jax.tree.leaves(placed))
    split, split_losses = tune.tune(model, placed, items, Bytes(), init, cfg, 64, mesh)
    np.testing.assert_allclose(split_losses, losses, rtol=1e-4, atol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-4), split, tuned)
    three = sharding.make_mesh(MeshConfig(3, 1, 1), jax.devices()[:3])
    with pytest.raises(ValueError, match="32 rows .8 items x 4 choices. do not split over the "
                                         "mesh's 3 data x fsdp shards"):
      tune.tune(model, params, items, Bytes(), init, cfg, 64, three)


def test_adapters_refuse_another_model_shape_and_foreign_directories(tmp_path):
  cfg = ModelConfig(num_layers=1, d_model=32, num_heads=2, d_ff=64, vocab_size=259)
  out = store.save(tmp_path / "p", "soft_prompt", np.ones((3, 32), np.float32), cfg,
                   {"task": "t"})
  assert sorted(os.listdir(out)) == ["embeddings", store.PROMPT_FILE]
  info, arrays = store.load(out, cfg)
  assert info["kind"] == "soft_prompt" and info["num_virtual_tokens"] == 3
  np.testing.assert_array_equal(arrays, np.ones((3, 32)))
  wider = ModelConfig(num_layers=1, d_model=64, num_heads=2, d_ff=64, vocab_size=259)
  with pytest.raises(store.AdapterError,
                     match=r"tuned for a model with d_model=32, and this model has d_model=64"):
    store.load(out, wider)
  with pytest.raises(store.AdapterError, match="not an adapter directory"):
    store.load(tmp_path, cfg)
  (tmp_path / "run").mkdir()
  (tmp_path / "run" / "config.gin").write_text("x")
  with pytest.raises(store.AdapterError, match="exists and is not an adapter directory"):
    store.save(tmp_path / "run", "soft_prompt", np.ones((3, 32), np.float32), cfg, {})
  assert os.listdir(tmp_path / "run") == ["config.gin"]
  store.save(out, "soft_prompt", np.zeros((2, 32), np.float32), cfg, {})  # an adapter is replaced
  assert store.load(out, cfg)[1].shape == (2, 32)
  # a prompt.json written before adapters had kinds is a soft prompt
  meta = json.loads((tmp_path / "p" / store.PROMPT_FILE).read_text())
  del meta["kind"], meta["model"]["head_dim"]
  (tmp_path / "p" / store.PROMPT_FILE).write_text(json.dumps(meta))
  assert store.load(out, cfg)[0]["kind"] == "soft_prompt"


def _lora_model(scan_layers=True, seed=0):
  model = Transformer(ModelConfig(num_layers=2, d_model=32, num_heads=4, num_kv_heads=2,
                                  head_dim=8, d_ff=64, vocab_size=259, max_len=64,
                                  dtype="float32", scan_layers=scan_layers))
  return model, init_params(model, jax.random.key(seed))


def _random_factors(params, rank, targets=lora.TARGETS, seed=1):
  """LoRA factors with B non-zero too (an untrained adapter's B is 0)."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda x: rng.standard_normal(x.shape).astype(np.float32) * 0.3,
                      lora.shapes(params, rank, targets))


@pytest.mark.parametrize("scan_layers", [True, False])
def test_lora_is_the_base_model_untrained_and_a_low_rank_update_merged(scan_layers):
  model, params = _lora_model(scan_layers)
  x = jnp.asarray(np.random.default_rng(0).integers(3, 259, (2, 12)))
  factors = lora.init(params, 4)
  assert len(lora.sites(params)) == 4 * (1 if scan_layers else 2)
  base = model.apply({"params": params}, x)
  np.testing.assert_array_equal(model.apply({"params": lora.merge(params, factors, 2.0)}, x),
                                base)  # B = 0: exactly the base model

  factors = _random_factors(params, 4, ("query", "out"))
  merged = lora.merge(params, factors, 0.5)
  assert not np.allclose(model.apply({"params": merged}, x), base, atol=1e-3)
  rng = np.random.default_rng(2)
  for path, kernel in lora.sites(params, ("query", "out")):
    ab = factors
    new = merged
    for name in path:
      ab, new = ab[name], new[name]
    kernel, new = np.asarray(kernel), np.asarray(new["kernel"])
    layers = kernel.shape[:-3] or (1,)
    for layer in range(int(np.prod(layers))):  # x·W' == x·W + s·(x·A)·B, layer by layer
      w = kernel.reshape((-1,) + kernel.shape[-3:])[layer]
      w_new = new.reshape((-1,) + kernel.shape[-3:])[layer]
      a = ab["a"].reshape((-1,) + ab["a"].shape[-2:])[layer]
      b = ab["b"].reshape((-1,) + ab["b"].shape[-2:])[layer]
      n_in = a.shape[0]
      x_in = rng.standard_normal((5, n_in)).astype(np.float32)
      want = x_in @ w.reshape(n_in, -1) + 0.5 * (x_in @ a) @ b
      np.testing.assert_allclose(x_in @ w_new.reshape(n_in, -1), want, atol=1e-4, rtol=1e-5)
  untouched = jax.tree_util.tree_leaves_with_path(merged)
  changed = {path for path, _ in lora.sites(params, ("query", "out"))}
  for path, leaf in untouched:  # key, value, the MLP, embeddings: the base's own arrays
    keys = tuple(getattr(k, "key", None) for k in path)
    if not any(keys[:len(c)] == c for c in changed):
      original = params
      for k in keys:
        original = original[k]
      assert leaf is original, keys


def test_a_saved_lora_applies_as_tuned_and_offloaded_kernels_stay_on_the_host(tmp_path):
  model, params = _lora_model()
  cfg = tune.TuneConfig("lora", lora_rank=4, lora_alpha=8.0, lora_targets=("key", "value"))
  factors = _random_factors(params, 4, cfg.lora_targets)
  out = store.save(tmp_path / "l", "lora", factors, model.cfg, {**cfg.info(), "task": "t"})
  assert sorted(os.listdir(out)) == ["lora", store.PROMPT_FILE]
  assert store.describe(out) == {"prompt_dir": out, "kind": "lora", "task": "t", "rank": 4,
                                 "alpha": 8.0, "targets": ["key", "value"]}
  want = cfg.apply(params, factors)
  jax.tree.map(np.testing.assert_array_equal, store.attach_dir(params, out, model.cfg), want)

  cpu = jax.devices("cpu")[0]
  host = jax.sharding.SingleDeviceSharding(cpu, memory_kind="pinned_host")
  offloaded = jax.tree_util.tree_map_with_path(
      lambda p, x: jax.device_put(x, host) if p[-1].key == "kernel" else x, params)
  merged = store.attach_dir(offloaded, out, model.cfg)
  for path, kernel in lora.sites(merged):
    assert kernel.sharding.memory_kind == "pinned_host", path
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(merged), jax.device_get(want))

  other, _ = _lora_model()
  wider = dataclasses.replace(other.cfg, head_dim=16)
  with pytest.raises(store.AdapterError, match="head_dim=8, and this model has head_dim=16"):
    store.attach_dir(params, out, wider)
  with pytest.raises(ValueError, match="lora_targets=query,mlp: each is one of"):
    tune.TuneConfig("lora", lora_targets=("query", "mlp"))


def _digests(directory):
  found = {}
  for root, _, files in os.walk(directory):
    for name in files:
      path = os.path.join(root, name)
      with open(path, "rb") as f:
        found[os.path.relpath(path, directory)] = hashlib.sha256(f.read()).hexdigest()
  return found


@pytest.mark.slow
def test_a_tuned_prompt_and_a_tuned_lora_beat_the_untuned_smoke_model(tmp_path,
                                                                      handbook_data_dir):
  """The embedded smoke run (600 steps), then prompt_tune on word_choice/en with each
  adapter kind."""
  pytest.importorskip("seqio")
  import train
  model_dir = str(tmp_path / "smoke")
  assert train.main([f"--model_dir={model_dir}", "--no_progress",
                     f"--gin.DataConfig.data_dir='{handbook_data_dir}'"]) == 0
  base = _digests(model_dir)
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  from bigsci_jax import evaluate
  for adapter, arrays in (("prompt", "embeddings"), ("lora", "lora")):
    out = str(tmp_path / adapter)
    proc = subprocess.run([sys.executable, "-m", "bigsci_jax.prompt_tune",
                           f"--model_dir={model_dir}", "--task=word_choice/en", f"--out={out}",
                           f"--adapter={adapter}"],
                          env=env, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    scores = json.loads(proc.stdout.strip().splitlines()[-1])
    untuned, tuned, gain = scores["untuned"], scores["tuned"], scores["gain"]
    print(f"{adapter}: untuned acc {untuned['acc']:.3f} ± {untuned['acc_stderr']:.3f}, "
          f"tuned {tuned['acc']:.3f}, gain {gain['acc']:.3f} ± {gain['acc_stderr']:.3f}")
    assert gain["acc"] == pytest.approx(tuned["acc"] - untuned["acc"])
    assert gain["acc"] > 1.96 * gain["acc_stderr"], scores  # significant at 5%, paired
    assert _digests(model_dir) == base  # the checkpoint is only read
    assert sorted(os.listdir(out)) == [arrays, store.PROMPT_FILE]

    again = evaluate.evaluate_dir(model_dir, ["word_choice/en"], prompt_dir=out)
    assert again["tasks"]["word_choice/en"]["acc"] == tuned["acc"]
    proc = subprocess.run([sys.executable, "-m", "bigsci_jax.generate",
                           f"--model_dir={model_dir}", "--prompt=Debian", f"--prompt_dir={out}",
                           "--max_new_tokens=5"],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
  assert sorted(os.listdir(tmp_path)) == ["lora", "prompt", "smoke"]
  assert SOFT_PROMPT not in evaluate.restore(model_dir)[2]
