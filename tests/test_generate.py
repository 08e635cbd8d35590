"""KV-cache decoding equals full recomputation, for every position option and both masks."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bigsci_jax import generate
from bigsci_jax.config import ModelConfig
from bigsci_jax.model import Transformer, init_params

BASE = ModelConfig(num_layers=2, d_model=32, num_heads=4, num_kv_heads=2, d_ff=64, vocab_size=50,
                   max_len=24, dtype="float32", init_std=0.3)
PROMPTS = [[5, 9, 3, 7, 11], [8, 2], [4, 4, 6, 13]]


@pytest.mark.parametrize("position, mask", [
    ("learned", "causal"), pytest.param("sinusoidal", "prefix", marks=pytest.mark.slow),
    pytest.param("rotary", "causal", marks=pytest.mark.slow), ("rotary", "prefix"),
    pytest.param("alibi", "causal", marks=pytest.mark.slow), ("alibi", "prefix"), pytest.param("none", "prefix", marks=pytest.mark.slow)])
def test_cached_decoding_matches_full_recomputation(position, mask):
  cfg = dataclasses.replace(BASE, position=position, mask=mask,
                            scan_layers=position != "rotary")  # unrolled layers too
  model = Transformer(cfg)
  params = init_params(model, jax.random.key(0))
  with jax.default_matmul_precision("highest"):
    out, logits = generate.generate(model, params, PROMPTS, 6, return_logits=True)
    # One uncached forward pass over each whole sequence, right-padded: the logits at
    # the position before generated token t are what step t must have sampled from.
    seqs = [[0] + p + o[:5] for p, o in zip(PROMPTS, out)]
    width = max(map(len, seqs))
    tokens = np.zeros((len(seqs), width), np.int32)
    segments, prefix = np.zeros_like(tokens), np.zeros_like(tokens)
    for r, (seq, prompt) in enumerate(zip(seqs, PROMPTS)):
      tokens[r, :len(seq)], segments[r, :len(seq)], prefix[r, :len(prompt) + 1] = seq, 1, 1
    positions = np.broadcast_to(np.arange(width), tokens.shape)
    full = jax.jit(model.apply)({"params": params}, tokens, positions, segments, prefix)
    for r, prompt in enumerate(PROMPTS):
      for step in range(6):
        np.testing.assert_allclose(logits[step][r], full[r, len(prompt) + step],
                                   atol=1e-5, rtol=1e-5)
  assert all(len(o) == 6 for o in out)


def test_prefix_lm_prompt_is_bidirectional():
  """The first generated logits of a prefix LM depend on the prompt's order both ways;
  a causal LM's last-prompt-token logits are those of a plain forward pass."""
  cfg = dataclasses.replace(BASE, mask="prefix")
  model = Transformer(cfg)
  params = init_params(model, jax.random.key(1))
  _, logits = generate.generate(model, params, [[5, 9, 3]], 1, return_logits=True)
  causal_view = model.apply({"params": params}, jnp.asarray([[0, 5, 9, 3]]))[0, -1]
  assert np.abs(logits[0][0] - causal_view).max() > 1e-4  # the prefix really sees ahead


def test_sampling_options_and_overlong_prompts():
  model = Transformer(BASE)
  params = init_params(model, jax.random.key(2))
  greedy = generate.generate(model, params, PROMPTS, 5)
  assert greedy == generate.generate(model, params, PROMPTS, 5)
  top1 = generate.generate(model, params, PROMPTS, 5, generate.Sampling(temperature=1.0, top_k=1))
  assert top1 == greedy  # top-k = 1 is greedy whatever the temperature
  nucleus = generate.generate(model, params, PROMPTS, 5, generate.Sampling(1.0, 0, 1e-6))
  assert nucleus == greedy  # a vanishing nucleus keeps only the best token
  sampled = [generate.generate(model, params, PROMPTS, 5, generate.Sampling(2.0), seed=s)
             for s in range(3)]
  assert len({str(s) for s in sampled}) > 1
  with pytest.raises(generate.GenerationError, match="exceeds the context window of 24"):
    generate.generate(model, params, [list(range(2, 22))], 5)
