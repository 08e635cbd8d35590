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


@pytest.mark.parametrize("position, mask, scan", [("alibi", "prefix", True),
                                                  ("rotary", "causal", False)])
def test_rows_that_join_a_running_cache_decode_as_if_alone(position, mask, scan):
  """What a server's running batch does: in a cache of two rows, row A decodes alone
  for three picks (steps of one row), then row B's left-padded prefill (a cache of its
  prompt's width) is put into row 1 (moved past its padding, the rest of its slots
  empty), both step together, then A leaves and B moves to row 0 and goes on alone.
  Each row's tokens (sampled, per-row seeds and pick counts) and logits equal those of
  the row decoded alone."""
  cfg = dataclasses.replace(BASE, position=position, mask=mask, scan_layers=scan)
  model = Transformer(cfg)
  params = init_params(model, jax.random.key(3))
  decoder, sampling = generate.Decoder(model), generate.Sampling(temperature=1.0)
  prompts, seeds, steps = {"a": [5, 9, 3, 7, 11], "b": [8, 2]}, {"a": 3, "b": 7}, 8
  with jax.default_matmul_precision("highest"):
    alone = {r: generate.generate(model, params, [prompts[r]], steps, sampling,
                                  seed=seeds[r], return_logits=True) for r in prompts}

    def prefill(r, slots):  # one row, left-padded to 8 columns, into a cache of `slots`
      batch = generate.prompt_batch([prompts[r]], mask == "prefix", 8)
      picked, cache = decoder.prefill(params, batch, generate.row_keys([seeds[r]]),
                                      generate.sampling_rows([sampling]), slots)
      return picked, cache, 8 - 1 - len(prompts[r])

    got = {"a": [], "b": []}
    picked, new, shift = prefill("a", 8)
    got["a"].append(picked)
    cache = decoder.put_rows(decoder.empty_cache(2, cfg.max_len), new, [0], [shift])
    keys, rows = generate.row_keys([seeds["a"]]), generate.sampling_rows([sampling])
    for pick in (1, 2):
      picked, cache = decoder.step(params, cache, np.asarray(picked.token),
                                   np.asarray([len(prompts["a"]) + pick]), keys, pick, rows)
      got["a"].append(picked)
    picked_b, new, shift = prefill("b", 8)  # as the server's: just the prompt's width
    got["b"].append(picked_b)
    cache = decoder.put_rows(cache, new, [1], [shift])
    token = np.asarray([picked.token[0], picked_b.token[0]])
    position = np.asarray([len(prompts["a"]) + 3, len(prompts["b"]) + 1])
    picks = np.asarray([3, 1])
    keys = generate.row_keys([seeds["a"], seeds["b"]])
    rows = generate.sampling_rows([sampling] * 2)
    while len(got["a"]) < steps:
      picked, cache = decoder.step(params, cache, token, position, keys, picks, rows)
      for i, r in enumerate("ab"):
        got[r].append(jax.tree.map(lambda x: x[i:i + 1], picked))
      token, position, picks = np.asarray(picked.token), position + 1, picks + 1
    cache = decoder.move_rows(cache, [1, 0], [0, 2])  # A is done: B goes on alone in row 0
    token, position, picks = token[1:], position[1:], picks[1:]
    keys, rows = generate.row_keys([seeds["b"]]), generate.sampling_rows([sampling])
    while len(got["b"]) < steps:
      picked, cache = decoder.step(params, cache, token, position, keys, picks, rows)
      got["b"].append(picked)
      token, position, picks = np.asarray(picked.token), position + 1, picks + 1
  for r in prompts:
    tokens, logits = alone[r]
    assert [int(p.token[0]) for p in got[r]] == tokens[0], r
    for step, p in enumerate(got[r]):
      np.testing.assert_allclose(p.logits[0], logits[step][0], atol=1e-5, rtol=1e-5)
  assert len(set(alone["a"][0][0])) > 1  # really sampled


@pytest.mark.parametrize("scan", [True, False])
def test_steps_that_read_only_the_filled_slots_decode_as_steps_that_read_all(scan):
  """generate's steps read only the first bucket_width(filled) slots of a 128-slot cache
  (32, then 64, then all 128 as the rows grow past 32 and 64 slots; prefix LM, ALiBi):
  the same sampled tokens and logits as steps that read every slot, with scanned
  layers (a slice of each layer's row of the carried cache) and unrolled ones."""
  cfg = dataclasses.replace(BASE, max_len=128, position="alibi", mask="prefix", scan_layers=scan)
  model = Transformer(cfg)
  params = init_params(model, jax.random.key(4))
  prompts, steps, sampling = [list(range(3, 28)), [8, 2, 5]], 80, generate.Sampling(1.0)
  with jax.default_matmul_precision("highest"):
    tokens, logits = generate.generate(model, params, prompts, steps, sampling, seed=2,
                                       return_logits=True)
    decoder = generate.Decoder(model)
    batch = generate.prompt_batch(prompts, True)
    keys, rows = generate.row_keys([2, 3]), generate.sampling_rows([sampling] * 2)
    picked, cache = decoder.prefill(params, batch, keys, rows, cfg.max_len)
    position = batch[1][:, -1] + 1
    for step in range(steps):
      assert picked.token.tolist() == [row[step] for row in tokens]
      np.testing.assert_allclose(picked.logits, logits[step], atol=1e-5, rtol=1e-5)
      if step + 1 < steps:
        picked, cache = decoder.step(params, cache, np.asarray(picked.token), position, keys,
                                     step + 1, rows)
        position = position + 1
  assert decoder._extend._cache_size() == 1
  assert generate.decoder_for(model, None)._extend._cache_size() == 3  # reads of 32, 64 and 128
  assert len(set(tokens[0])) > 1  # really sampled


def test_a_sequence_parallel_model_decodes_over_a_mesh_as_on_one_device():
  """ModelConfig.sequence_parallel on a 2x1x4 mesh: the prefill (16 wide, split over
  tensor along its length) and the one-token steps (not split) give one device's tokens
  and logits."""
  from bigsci_jax import sharding
  from bigsci_jax.config import MeshConfig
  from bigsci_jax.step import abstract_state
  import optax
  cfg = dataclasses.replace(BASE, num_kv_heads=4, position="alibi", mask="prefix")
  params = init_params(Transformer(cfg), jax.random.key(1))
  split_cfg = dataclasses.replace(cfg, sequence_parallel=True)
  mesh = sharding.make_mesh(MeshConfig(2, 1, 4))
  _, shardings = abstract_state(Transformer(split_cfg), optax.identity(), mesh, 1)
  placed = jax.device_put(params, shardings.params)
  with jax.default_matmul_precision("highest"):
    one = generate.generate(Transformer(cfg), params, PROMPTS, 6, return_logits=True,
                            min_width=16, sampling=generate.Sampling(temperature=1.0))
    split = generate.generate(Transformer(split_cfg), placed, PROMPTS, 6, return_logits=True,
                              min_width=16, sampling=generate.Sampling(temperature=1.0),
                              mesh=mesh)
  assert split[0] == one[0]
  np.testing.assert_allclose(np.asarray(split[1]), np.asarray(one[1]), rtol=1e-5, atol=1e-5)


def test_rows_put_into_their_own_shards_block_move_nothing_between_devices():
  """Rows joining a server's cache over a 2x1x2 mesh (8 cache rows in two blocks, the
  heads over tensor): a 4-row prefill's cache (two rows per shard) put into slots 1 and
  3 (block 0), 6 (block 1) and nowhere gives one device's whole cache (random contents,
  rows shifted left by different amounts), and its compiled put has no collective at
  all (with global slots both jaxlib's XLA and the TPU compiler all-gathered the new
  rows' keys, values and positions); slots in other blocks ([5, 1, 2, 8]) are still put
  right, across devices."""
  from bigsci_jax import sharding
  from bigsci_jax.aot import collectives
  from bigsci_jax.config import MeshConfig
  model = Transformer(dataclasses.replace(BASE, max_len=32, position="rotary"))
  mesh = sharding.make_mesh(MeshConfig(2, 1, 2), jax.devices()[:4])
  rng = np.random.default_rng(0)
  one, split = generate.Decoder(model), generate.Decoder(model, mesh)
  values = [jax.tree.map(lambda x: (rng.integers(-1, 30, x.shape) if x.dtype.kind == "i"
                                    else rng.normal(size=x.shape)).astype(x.dtype),
                         one.empty_cache(rows, slots)) for rows, slots in ((8, 32), (4, 8))]
  shift = [4, 1, 0, 5]
  results = []
  for decoder in (one, split):
    full, new = [jax.tree.map(lambda v, x: jax.device_put(v, x.sharding), tree,
                              decoder.empty_cache(*shape))
                 for tree, shape in zip(values, ((8, 32), (4, 8)))]
    before = (decoder._put_locally._cache_size(), decoder._put_rows._cache_size())
    local = decoder.put_rows(jax.tree.map(jnp.copy, full), new, [1, 3, 6, 8], shift)
    across = decoder.put_rows(full, new, [5, 1, 2, 8], shift)
    compiled = (decoder._put_locally._cache_size() - before[0],
                decoder._put_rows._cache_size() - before[1])
    results.append([jax.tree.map(np.asarray, c) for c in (local, across)])
  assert compiled == (1, 1)  # over the mesh: the first put was the local one
  for a_tree, b_tree in zip(*results):
    for a, b in zip(jax.tree.leaves(a_tree), jax.tree.leaves(b_tree)):
      np.testing.assert_array_equal(a, b)
  with sharding.activate(mesh):
    compiled = split._put_locally.lower(local, new, np.zeros(4, np.int32),
                                        np.zeros(4, np.int32)).compile()
  assert not collectives(compiled)


def test_chunks_over_two_batch_shards_run_only_their_rows_and_move_no_update():
  """A server's chunked prefill over a 2x1x2 mesh (the cache's 8 rows in two blocks, the
  heads over tensor): a 12-token chunk of 8 rows, then chunks of 2 chosen rows (one in
  each block: rows 1 and 6, then 2 and 5) give one device's picks and cache, and leave
  the other rows' cache as it was; the compiled chunk moves no key or value update
  between devices (no all-gather, all-to-all or permute of an array 12 long: with
  global row and head indices the partitioner all-gathered every update). Rows in the
  wrong block are one sentence."""
  from bigsci_jax.aot import collectives
  from bigsci_jax import sharding
  from bigsci_jax.config import MeshConfig
  from bigsci_jax.step import abstract_state
  import optax
  cfg = dataclasses.replace(BASE, max_len=48, position="rotary")
  model = Transformer(cfg)
  params = init_params(model, jax.random.key(5))
  mesh = sharding.make_mesh(MeshConfig(2, 1, 2), jax.devices()[:4])
  _, shardings = abstract_state(model, optax.identity(), mesh, 1)
  placed = jax.device_put(params, shardings.params)
  sampling = generate.Sampling(temperature=1.0)
  rng = np.random.default_rng(0)

  def chunk(rows, counts, start):
    tokens = rng.integers(3, 50, (len(rows), 12)).astype(np.int32)
    positions = (np.asarray(start)[:, None] + np.arange(12)).astype(np.int32)
    return (tokens, positions, np.asarray(counts, np.int32),
            generate.row_keys(np.asarray(rows)), 0, generate.sampling_rows([sampling] * len(rows)))

  first = chunk(range(8), [12, 5, 12, 9, 12, 12, 7, 12], [0] * 8)
  second = chunk([1, 6], [12, 12], [5, 7])
  third = chunk([2, 5], [4, 12], [12, 12])
  results = []
  with jax.default_matmul_precision("highest"):
    for decoder, p in ((generate.Decoder(model), params),
                       (generate.Decoder(model, mesh), placed)):
      cache = decoder.empty_cache(8, cfg.max_len)
      picks = []
      picked, cache = decoder.extend(p, cache, *first, filled=12)
      picks.append(picked)
      before = jax.tree.map(np.asarray, cache)
      picked, cache = decoder.extend(p, cache, *second, filled=24, cache_rows=[1, 6])
      picks.append(picked)
      after = jax.tree.map(np.asarray, cache)
      picked, cache = decoder.extend(p, cache, *third, filled=24, cache_rows=[2, 5])
      picks.append(picked)
      results.append((picks, jax.tree.map(np.asarray, cache)))
      for b, a in zip(jax.tree.leaves(before), jax.tree.leaves(after)):
        others = [r for r in range(8) if r not in (1, 6)]
        row = 0 if b.ndim == 1 else 1  # the layers' axis first (scanned layers)
        np.testing.assert_array_equal(np.take(a, others, row), np.take(b, others, row))
  (one, one_cache), (split, split_cache) = results
  for a, b in zip(one, split):
    assert a.token.tolist() == b.token.tolist()
    np.testing.assert_allclose(a.logits, b.logits, atol=1e-5, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(one_cache), jax.tree.leaves(split_cache)):
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)

  decoder = generate.Decoder(model, mesh)
  with sharding.activate(mesh):
    compiled = decoder._extend.lower(0, 32, placed, cache, *second,
                                     np.asarray([1, 6], np.int32)).compile()
  moved = [(op, shape) for op, shape, _ in collectives(compiled)
           if op != "all-reduce" and "12" in shape.split(",")]
  assert not moved, moved
  with pytest.raises(ValueError, match=r"cache_rows \[1, 2\] over 2 batch shards: row i of "
                                       r"the 2 must be one of block i // 1"):
    decoder.extend(placed, cache, *second, filled=24, cache_rows=[1, 2])
