"""Soft prompts: a prompt made of token embeddings is those tokens (model, Scorer,
generation), tuning changes only the prompt, a prompt for another model shape is one
sentence; end to end on the smoke model (slow): the tuned prompt beats the untuned
model, the checkpoint is only read, the prompt is all that is written."""

import hashlib
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bigsci_jax import generate, likelihood, mc_tasks
from bigsci_jax.adapt import soft_prompt, tune
from bigsci_jax.config import ModelConfig
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


def test_tuning_moves_only_the_prompt_and_lowers_the_loss():
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
  init = soft_prompt.init_from_vocab(params, 4, pool=259)
  cfg = tune.TuneConfig(num_virtual_tokens=4, steps=40, batch_size=8, learning_rate=0.1)
  prompt, losses = tune.tune(model, params, items, Bytes(), init, cfg, seq_len=64)
  assert prompt.shape == (4, 32) and not np.allclose(prompt, init)
  assert np.mean(losses[-5:]) < 0.1 * np.mean(losses[:5])
  jax.tree.map(np.testing.assert_array_equal, params, before)  # read, never written
  scorer = likelihood.Scorer(model, soft_prompt.attach(params, prompt), Bytes(), 64, 8)
  score = lambda s: mc_tasks.score(items, lambda r: s.loglikelihood(r)[0])["acc"]  # noqa: E731
  assert score(scorer) == 1.0 and score(untuned) < 0.5


def test_prompts_refuse_another_model_shape_and_foreign_directories(tmp_path):
  cfg = ModelConfig(num_layers=1, d_model=32, num_heads=2, d_ff=64, vocab_size=259)
  out = soft_prompt.save(tmp_path / "p", np.ones((3, 32), np.float32), cfg, {"task": "t"})
  assert sorted(os.listdir(out)) == ["embeddings", soft_prompt.PROMPT_FILE]
  np.testing.assert_array_equal(soft_prompt.load(out, cfg), np.ones((3, 32)))
  wider = ModelConfig(num_layers=1, d_model=64, num_heads=2, d_ff=64, vocab_size=259)
  with pytest.raises(soft_prompt.PromptError,
                     match=r"tuned for a model with d_model=32, and this model has d_model=64"):
    soft_prompt.load(out, wider)
  with pytest.raises(soft_prompt.PromptError, match="not a soft-prompt directory"):
    soft_prompt.load(tmp_path, cfg)
  (tmp_path / "run").mkdir()
  (tmp_path / "run" / "config.gin").write_text("x")
  with pytest.raises(soft_prompt.PromptError, match="exists and is not a soft-prompt directory"):
    soft_prompt.save(tmp_path / "run", np.ones((3, 32), np.float32), cfg, {})
  assert os.listdir(tmp_path / "run") == ["config.gin"]
  soft_prompt.save(out, np.zeros((2, 32), np.float32), cfg, {})  # a prompt dir is replaced
  assert soft_prompt.load(out, cfg).shape == (2, 32)


def _digests(directory):
  found = {}
  for root, _, files in os.walk(directory):
    for name in files:
      path = os.path.join(root, name)
      with open(path, "rb") as f:
        found[os.path.relpath(path, directory)] = hashlib.sha256(f.read()).hexdigest()
  return found


@pytest.mark.slow
def test_a_tuned_prompt_beats_the_untuned_smoke_model(tmp_path, handbook_data_dir):
  """The embedded smoke run (600 steps), then prompt_tune on word_choice/en."""
  pytest.importorskip("seqio")
  import train
  model_dir, out = str(tmp_path / "smoke"), str(tmp_path / "prompt")
  assert train.main([f"--model_dir={model_dir}", "--no_progress",
                     f"--gin.DataConfig.data_dir='{handbook_data_dir}'"]) == 0
  base = _digests(model_dir)
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, "-m", "bigsci_jax.prompt_tune",
                         f"--model_dir={model_dir}", "--task=word_choice/en", f"--out={out}"],
                        env=env, capture_output=True, text=True, timeout=1800)
  assert proc.returncode == 0, proc.stderr[-3000:]
  scores = json.loads(proc.stdout.strip().splitlines()[-1])
  untuned, tuned = scores["untuned"], scores["tuned"]
  assert tuned["acc"] - untuned["acc"] > 1.96 * untuned["acc_stderr"], scores
  assert _digests(model_dir) == base  # the checkpoint is only read
  assert sorted(os.listdir(tmp_path)) == ["prompt", "smoke"]
  assert sorted(os.listdir(out)) == ["embeddings", soft_prompt.PROMPT_FILE]

  from bigsci_jax import evaluate
  again = evaluate.evaluate_dir(model_dir, ["word_choice/en"], prompt_dir=out)
  assert again["tasks"]["word_choice/en"]["acc"] == tuned["acc"]
  proc = subprocess.run([sys.executable, "-m", "bigsci_jax.generate", f"--model_dir={model_dir}",
                         "--prompt=Debian", f"--prompt_dir={out}", "--max_new_tokens=5"],
                        env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert SOFT_PROMPT not in evaluate.restore(model_dir)[2]
