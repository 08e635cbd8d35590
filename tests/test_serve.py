"""The completions server: echo log-probabilities against the model's own, greedy
completions against `generate`, batching without recompiles, the harness through
HTTP against the in-process adapter, concurrent load with malformed requests,
disconnects, SIGTERM and bad input."""

import concurrent.futures
import dataclasses
import importlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
requests = pytest.importorskip("requests")

from bigsci_jax import evaluate, generate, sharding  # noqa: E402
from bigsci_jax.config import MeshConfig  # noqa: E402
from bigsci_jax.model import Transformer  # noqa: E402
from bigsci_jax.serve import api  # noqa: E402
from bigsci_jax.serve.engine import Engine  # noqa: E402
from bigsci_jax.serve.rows import Choice, Job  # noqa: E402
from bigsci_jax import tokenizer as tokenizers  # noqa: E402

PROMPTS = ["Debian is", "Le projet Debian", "The package manager installs", "apt"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, handbook_data_dir):
  pytest.importorskip("seqio")
  import train
  model_dir = str(tmp_path_factory.mktemp("serve") / "run")
  assert train.main([f"--model_dir={model_dir}", "--no_progress", "--gin.TRAIN_STEPS=2",
                     f"--gin.DataConfig.data_dir='{handbook_data_dir}'",
                     "--gin.DataConfig.languages=['en', 'fr']", "--gin.DataConfig.vocab_size=1000",
                     "--gin.TrainConfig.eval_batches=1", "--gin.BATCH_SIZE=8",
                     "--gin.ModelConfig.max_len=128", "--gin.TrainConfig.checkpoint_every=2"]) == 0
  return model_dir


@pytest.fixture(scope="module")
def restored(run_dir):
  run, runtime, params, _ = evaluate.restore(run_dir, 1)
  return runtime.model, jax.device_get(params), tokenizers.from_dir(run_dir)


def _submit(engine, choices):
  """Submit the choices as one job; a function that waits for it and returns it."""
  changed = threading.Event()
  job = Job(choices, changed.set)
  engine.submit(job)

  def wait(timeout=120, ok=True):
    deadline = time.time() + timeout
    while not job.done and time.time() < deadline:
      changed.wait(1)
      changed.clear()
    assert job.done and (job.error is None or not ok), job.error
    return job
  return wait


def _assert_decodes_as_alone(restored, c, name=""):
  """c's tokens and log-probabilities are those `generate` gives its prompt alone (with
  its seed and sampling), up to where c ended: its length, or EOS next."""
  model, params, tok = restored
  with jax.default_matmul_precision("highest"):
    want, logits = generate.generate(model, params, [c.prompt], c.max_tokens, c.sampling,
                                     seed=c.seed, return_logits=True, vocab=tok.vocab_size)
  n = len(c.tokens)
  assert n and c.tokens == want[0][:n], name
  assert c.finish_reason == "length" or want[0][n] == tok.eos_id, name
  logp = [float(jax.nn.log_softmax(logits[i][0])[t]) for i, t in enumerate(c.tokens)]
  np.testing.assert_allclose(c.token_logprobs, logp, atol=1e-4, rtol=0, err_msg=name)


def test_tokenizer_special_tokens_round_trip(restored):
  _, _, tok = restored
  assert tok.encode("a</s>b<pad>")[-4:] == tok.encode("a")[-1:] + [1] + tok.encode("b") + [0]
  assert tok.encode("</s>")[0] == 1 and tok.encode("</s>", special_tokens=False) != [1]
  text = "Debian — ünïcode 🦜"
  ids = tok.encode(text)
  assert tok.decode(ids) == text
  assert tok.decode(ids + [1], special_tokens=True) == text + "</s>"
  offsets = tok.offsets(ids)
  assert offsets[0] == 0 and offsets == sorted(offsets) and offsets[-1] < len(text)
  assert "".join(tok.token_text(i) for i in tok.encode("Debian is")) == "Debian is"


def test_echo_logprobs_are_the_models_and_greedy_matches_generate(restored, run_dir, capsys):
  model, params, tok = restored
  engine = Engine(model, params, tok, max_batch=4)
  try:
    ids = [tok.encode(p) for p in PROMPTS]
    echo = [Choice(p, 0, generate.Sampling(), 0, logprobs=2, echo=True) for p in ids]
    greedy = [Choice(p, 12, generate.Sampling(), 0) for p in ids]
    _submit(engine, echo + greedy)()
  finally:
    engine.stop()
  for p, c in zip(ids, echo):
    row = jnp.asarray([[0] + p])
    with jax.default_matmul_precision("highest"):
      logp = jax.nn.log_softmax(model.apply({"params": params}, row)[0], axis=-1)
    want = [float(logp[i, p[i]]) for i in range(1, len(p))]  # logits at column i predict p[i]
    assert c.prompt_logprobs[0] is None and len(c.prompt_logprobs) == len(p)
    np.testing.assert_allclose(c.prompt_logprobs[1:], want, atol=1e-5, rtol=0)
    best = [max(t, key=lambda x: x[1]) for t in c.prompt_top[1:]]
    assert [b[0] for b in best] == [int(jnp.argmax(logp[i])) for i in range(1, len(p))]
    assert c.finish_reason == "length" and c.tokens == []
  # Logits 3 columns at a time (ModelConfig.logits_chunk): the same echo scores.
  chunked = [Choice(p, 0, generate.Sampling(), 0, logprobs=2, echo=True) for p in ids]
  engine = Engine(Transformer(dataclasses.replace(model.cfg, logits_chunk=3)), params, tok,
                  max_batch=4)
  try:
    _submit(engine, chunked)()
  finally:
    engine.stop()
  for a, b in zip(chunked, echo):
    np.testing.assert_allclose(a.prompt_logprobs[1:], b.prompt_logprobs[1:], rtol=1e-6)
    assert [[t for t, _ in top] for top in a.prompt_top[1:]] == [
        [t for t, _ in top] for top in b.prompt_top[1:]]
  assert generate.main([f"--model_dir={run_dir}", *[f"--prompt={p}" for p in PROMPTS],
                        "--max_new_tokens=12"]) == 0
  cli = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["completions"]
  assert [c.text for c in greedy] == cli
  # The weights read from pinned host memory, one layer at a time: the same tokens.
  assert generate.main([f"--model_dir={run_dir}", *[f"--prompt={p}" for p in PROMPTS],
                        "--max_new_tokens=12", "--offload=host"]) == 0
  assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["completions"] == cli
  # Every layer split over 2 devices (read from host memory) and 3 prompts' rows over 2
  # data shards (one filler row): the same tokens.
  assert generate.main([f"--model_dir={run_dir}", *[f"--prompt={p}" for p in PROMPTS[:3]],
                        "--max_new_tokens=12", "--mesh=2x1x2", "--offload=host"]) == 0
  assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["completions"] == cli[:3]
  assert all(c.finish_reason in ("length", "stop") for c in greedy)


# One device is slow-marked: the 2x1x2 mesh runs the same buckets and layouts and more.
@pytest.mark.parametrize("mesh", [pytest.param(None, marks=pytest.mark.slow), "2x1x2"])
def test_batches_of_any_mix_compile_nothing_after_warmup(restored, run_dir, mesh):
  """Prompts of at most 56 tokens (prompt widths 32 and 64; those over 31 prefilled in
  32-token chunks) decoding up to 90 tokens (steps reading 32, 64 and 128 slots): after
  warmup nothing compiles — also with the model split over a mesh, where a cache that
  left a step, a chunk, a join or a move in another layout than warmup's would compile
  the next step again."""
  model, params, tok = restored
  runtime = None
  if mesh:
    _, runtime, params, _ = evaluate.restore(run_dir, 4, mesh=mesh)
  engine = Engine(model, params, tok, mesh=runtime and runtime.mesh, max_batch=4, gather_ms=50,
                  max_prompt=56, prefill_chunk=32)
  assert engine.widths == [32, 64] and engine.reads == [32, 64, 128]
  try:
    engine.warmup(row_counts=[2, 4] if mesh else [1, 2, 4])
    compiled = engine.decoder.compiled_shapes()
    rng = np.random.default_rng(0)
    waits, rows, batches = [], 0, engine.batches
    for i in range(10):
      prompt = rng.integers(3, 900, rng.integers(1, 57)).tolist()
      echo = bool(i % 2)
      rows += 1 + i % 3
      waits.append(_submit(engine, [
          Choice(prompt, 1 if echo else 90 if i == 4 else int(rng.integers(2, 8)),
                 generate.Sampling(float(i % 3) * 0.5, int(i % 4), 0.9), i,
                 logprobs=1 if echo else None, echo=echo) for _ in range(1 + i % 3)]))
    jobs = [wait() for wait in waits]
    assert all(len(c.tokens) >= 1 for j in jobs for c in j.choices)
    assert engine.decoder.compiled_shapes() == compiled, [
        f._cache_size() for f in (engine.decoder._prefill, engine.decoder._extend,
                                  engine.decoder._prompt)]
    assert engine.batches - batches < rows  # rows really were batched
    assert engine.chunks > 0
  finally:
    engine.stop()


def test_clients_that_come_back_one_by_one_share_a_batch(restored):
  """After a batch of 4 rows, the next 4 arrive spread out (the first well ahead, as
  when a server writes its answers one by one): they wait for each other and run as
  one batch, not as a batch of 1 and one of 3."""
  model, params, tok = restored
  engine = Engine(model, params, tok, max_batch=4, gather_ms=5)
  try:
    engine.warmup(row_counts=[1, 4], widths=[32])
    choose = lambda: [Choice(tok.encode("Debian"), 2, generate.Sampling(), 0)]  # noqa: E731
    first = [_submit(engine, choose()) for _ in range(4)]
    [wait() for wait in first]
    batches = engine.batches
    waits = [_submit(engine, choose())]
    time.sleep(0.015)  # three gather windows with nothing new
    for _ in range(3):
      waits.append(_submit(engine, choose()))
      time.sleep(0.002)
    [wait() for wait in waits]
    assert engine.batches - batches == 1
  finally:
    engine.stop()


def test_requests_join_a_running_batch_and_decode_as_if_alone(restored):
  """Continuous batching: two short requests sent while a long one decodes join its
  batch at once and end while it still runs; every row's tokens and log-probabilities
  are those `generate` gives the row alone (sampled rows with their own seeds). The
  long row fills the whole window although its prompt was padded to a 32-wide bucket."""
  model, params, tok = restored
  window = model.cfg.max_len
  engine = Engine(model, params, tok, max_batch=4, gather_ms=5)
  prompt = tok.encode("Debian is")
  rows = {"long": Choice(prompt, window - len(prompt), generate.Sampling(), 0),
          "greedy": Choice(tok.encode("Le projet Debian"), 12, generate.Sampling(), 0),
          "sampled": Choice(tok.encode("apt"), 12, generate.Sampling(1.0, 40, 0.95), 5)}
  long_done_when_short_ended = []
  try:
    wait_long = _submit(engine, [rows["long"]])
    while len(rows["long"].tokens) < 4:
      time.sleep(0.01)
    batches = engine.batches
    short = Job([rows["greedy"], rows["sampled"]],
                lambda: long_done_when_short_ended.append(rows["long"].finished)
                if all(c.finished for c in (rows["greedy"], rows["sampled"])) else None)
    engine.submit(short)
    wait_long()
    assert short.done and short.error is None
  finally:
    engine.stop()
  assert engine.batches == batches + 1 and long_done_when_short_ended[:1] == [False]
  assert rows["long"].finish_reason == "length" and len(rows["long"].tokens) == window - len(prompt)
  for name, c in rows.items():
    _assert_decodes_as_alone(restored, c, name)


def test_long_prompts_prefill_a_chunk_at_a_time_between_steps_and_decode_as_if_alone(restored):
  """Chunked prefill (32-token chunks in a 128-token window): two long prompts sent while a
  short row decodes join in 32-token pieces, one per engine iteration, the short row taking
  steps in between; every row's tokens and log-probabilities are those `generate` gives it
  alone (a sampled row with its seed). A prefix LM's prompts are never chunked."""
  model, params, tok = restored
  text = "Debian is a free operating system. The package manager installs software. "
  long_ids = tok.encode(text * 8)
  rows = {"short": Choice(tok.encode("apt"), 40, generate.Sampling(), 0),
          "greedy": Choice(long_ids[:95], 12, generate.Sampling(), 0),
          "sampled": Choice(long_ids[3:70], 12, generate.Sampling(1.0, 40, 0.95), 5)}
  engine = Engine(model, params, tok, max_batch=4, gather_ms=5, prefill_chunk=32)
  stepped_while_prefilling = []

  def short_moved():
    slate = engine._slate  # the engine thread calls this, between its own updates
    stepped_while_prefilling.append(slate is not None and any(slate.pending))

  try:
    engine.submit(Job([rows["short"]], short_moved))
    while len(rows["short"].tokens) < 4:
      time.sleep(0.01)
    _submit(engine, [rows["greedy"], rows["sampled"]])()
    while not rows["short"].finished:
      time.sleep(0.01)
  finally:
    engine.stop()
  # the longest row: 1 + 95 tokens, 32 at joining, then 2 chunks (the other's fewer, alongside)
  assert engine.chunks == 2 and any(stepped_while_prefilling)
  for name, c in rows.items():
    _assert_decodes_as_alone(restored, c, name)
  prefix_model = type(model)(dataclasses.replace(model.cfg, mask="prefix"))
  prefix_engine = Engine(prefix_model, params, tok, max_batch=4, prefill_chunk=32)
  prefix_engine.stop()
  assert (engine.chunk, prefix_engine.chunk) == (32, 0)


def test_rows_move_down_when_others_leave_over_two_batch_shards(restored, monkeypatch):
  """Over a mesh whose batch axis has two shards the cache's 4 rows form two blocks, and
  a step of 2 rows runs on the first row of each (slots 0 and 2). Four rows join at
  once (slots 0, 2, 1, 3 in joining order; steps of 4 rows); when the two short ones
  (slots 0 and 1) end, the row in slot 3 moves to slot 0 and the steps shrink to 2
  rows, one of them the row in slot 2. Every row's tokens and log-probabilities are
  those `generate` gives it alone."""
  model, params, tok = restored
  mesh = sharding.make_mesh(MeshConfig(data=2, fsdp=1, tensor=1), jax.devices()[:2])
  engine = Engine(model, params, tok, mesh=mesh, max_batch=4)
  assert engine.row_buckets == [2, 4]
  sizes, real_step = [], engine.decoder.step

  def step(params, cache, token, *args, **kwargs):
    sizes.append(len(token))
    return real_step(params, cache, token, *args, **kwargs)

  monkeypatch.setattr(engine.decoder, "step", step)
  rows = [Choice(tok.encode("Debian is"), 3, generate.Sampling(), 0),
          Choice(tok.encode("Le projet Debian"), 10, generate.Sampling(1.0, 40, 0.95), 5),
          Choice(tok.encode("apt"), 3, generate.Sampling(1.0, 0, 0.9), 7),
          Choice(tok.encode("The package manager installs"), 12, generate.Sampling(), 0)]
  try:
    _submit(engine, rows)()
  finally:
    engine.stop()
  assert [c.finish_reason for c in rows] == ["length"] * 4
  assert sizes[:2] == [4, 4] and sizes[2:] == [2] * (len(sizes) - 2) and len(sizes) == 11
  for c in rows:
    _assert_decodes_as_alone(restored, c)


def test_a_chunk_over_two_batch_shards_runs_one_row_per_shard(restored, monkeypatch):
  """Over a mesh whose batch axis has two shards, a long prompt that joins three
  decoding rows (steps of 4 rows) is prefilled in 32-token chunks of 2 rows, its own
  and one of the other shard's (which the chunk leaves as it was), not of the step's 4;
  both joins put each prefilled row into a slot of its own shard's block of the cache
  (no row crosses devices; before, the three rows' prefill rows 0-2 went to slots 0, 2,
  1 and the long row's prefill row 0 to slot 3); every row's tokens and
  log-probabilities are those `generate` gives it alone."""
  model, params, tok = restored
  mesh = sharding.make_mesh(MeshConfig(data=2, fsdp=1, tensor=1), jax.devices()[:2])
  engine = Engine(model, params, tok, mesh=mesh, max_batch=4, gather_ms=5, prefill_chunk=32)
  chunk_rows, step_rows, puts = [], [], []
  real_extend, real_step, real_put = engine.decoder.extend, engine.decoder.step, engine.decoder.put_rows

  def extend(params, cache, tokens, *args, **kwargs):
    if tokens.shape[1] > 1:  # a chunk (a step is an extend by one token)
      chunk_rows.append(len(tokens))
    return real_extend(params, cache, tokens, *args, **kwargs)

  def step(params, cache, token, *args, **kwargs):
    step_rows.append(len(token))
    return real_step(params, cache, token, *args, **kwargs)

  def put_rows(cache, new, slots, shift):
    puts.append(np.asarray(slots).tolist())
    return real_put(cache, new, slots, shift)

  monkeypatch.setattr(engine.decoder, "extend", extend)
  monkeypatch.setattr(engine.decoder, "step", step)
  monkeypatch.setattr(engine.decoder, "put_rows", put_rows)
  text = "Debian is a free operating system. The package manager installs software. "
  short = [Choice(tok.encode("apt"), 30, generate.Sampling(), 0),
           Choice(tok.encode("Le projet Debian"), 30, generate.Sampling(1.0, 40, 0.95), 5),
           Choice(tok.encode("Das Paket"), 24, generate.Sampling(0.7), 2)]
  long = Choice(tok.encode(text * 8)[:95], 8, generate.Sampling(), 0)
  try:
    engine.submit(Job(short, lambda: None))
    while len(short[0].tokens) < 4:
      time.sleep(0.01)
    _submit(engine, [long])()
    while not all(c.finished for c in short):
      time.sleep(0.01)
  finally:
    engine.stop()
  assert engine.chunks == 2 and chunk_rows == [2, 2] and 4 in step_rows, (chunk_rows, step_rows)
  # prefill rows 0, 1 (block 0) into slots 0, 1; row 2 (block 1) into slot 2; then the
  # long row, prefill row 1 of 2 (block 1), into slot 3; 4 is nowhere
  assert puts == [[0, 1, 2, 4], [4, 3]], puts
  for c in short + [long]:
    _assert_decodes_as_alone(restored, c)


@pytest.mark.parametrize("blocks", [1, 2, 4])
def test_joining_rows_take_free_slots_of_their_own_shard(blocks):
  """Slate.places and slots_for over a batch axis of `blocks` shards, for random
  slates of 16 slots and every number of rows that fits: the prefill runs on the
  smallest bucket of rows; where its shards' blocks can hold the rows in their own
  free slots, each row gets a free slot in the block of its prefill row (its shard's),
  no slot or prefill row twice; otherwise (and always with one shard, as before
  shards) the rows, in order, take the first free slots in fill order."""
  from bigsci_jax.serve.rows import Slate
  rng = np.random.default_rng(blocks)
  buckets = [blocks << i for i in range((16 // blocks).bit_length()) if blocks << i < 16] + [16]
  block, local = 16 // blocks, 0
  for _ in range(40):
    slate = Slate(None, 16, blocks)
    for s in rng.choice(16, rng.integers(0, 16), replace=False):
      slate.rows[s] = ("job", "row")
    free = sorted((s for s in range(16) if slate.rows[s] is None), key=slate.rank)
    have = [sum(s // block == d for s in free) for d in range(blocks)]
    for n in range(1, len(free) + 1):
      count, at, blocks_n = slate.places(n, buckets)
      assert count == min(b for b in buckets if b >= n)
      per = count // blocks
      slots = slate.slots_for(blocks_n)
      assert len(set(slots)) == len(set(at)) == n and set(slots) <= set(free)
      if blocks > 1 and sum(min(per, h) for h in have) >= n:
        local += 1
        assert all(s // block == r // per == d for s, r, d in zip(slots, at, blocks_n))
        assert max(at) < count
      else:
        assert slots == free[:n] and at == list(range(n))
        assert blocks == 1 or blocks_n == [None] * n
  assert blocks == 1 or local > 100, local


def test_a_failed_step_fails_its_rows_and_the_engine_goes_on(restored, monkeypatch):
  """A decoding step that raises (here: the third) ends every running row's job with the
  error, in one sentence naming it; the next request decodes as before."""
  model, params, tok = restored
  engine = Engine(model, params, tok, max_batch=2)
  real_step, calls = engine.decoder.step, []

  def failing_step(*args, **kwargs):
    calls.append(1)
    if len(calls) == 3:
      raise RuntimeError("device lost")
    return real_step(*args, **kwargs)

  monkeypatch.setattr(engine.decoder, "step", failing_step)
  try:
    prompt = tok.encode("Debian is")
    first = [Choice(prompt, 8, generate.Sampling(), 0) for _ in range(2)]
    job = _submit(engine, first)(ok=False)
    assert job.error == "RuntimeError: device lost"
    assert engine.status()["running"] == 0
    again = Choice(prompt, 8, generate.Sampling(), 0)
    _submit(engine, [again])()
  finally:
    engine.stop()
  assert len(again.tokens) == 8 or again.finish_reason == "stop"
  assert again.tokens[:2] == first[0].tokens[:2]  # the picks before the failure were right


def test_a_soft_prompt_of_token_embeddings_serves_like_those_tokens(restored):
  """A prompt whose rows are the embeddings of some tokens: echo log-probabilities and
  greedy text equal those of the plain model with the tokens written before each prompt,
  and requests get the window less the prompt."""
  from bigsci_jax.adapt import soft_prompt
  model, params, tok = restored
  words = tok.encode("Debian GNU/Linux")
  prompted = soft_prompt.attach(params, params["embed"]["embedding"][np.asarray(words)])
  ids = [tok.encode(p) for p in PROMPTS]
  outcomes = []
  for engine_params, lead in ((prompted, []), (params, words)):
    engine = Engine(model, engine_params, tok, max_batch=4)
    try:
      choices = ([Choice(lead + p, 0, generate.Sampling(), 0, logprobs=1, echo=True) for p in ids]
                 + [Choice(lead + p, 8, generate.Sampling(), 0) for p in ids])
      _submit(engine, choices)()
    finally:
      engine.stop()
    outcomes.append((engine.max_len, choices))
  (room, with_prompt), (window, literal) = outcomes
  assert room == window - len(words) == model.cfg.max_len - len(words)
  for a, b in zip(with_prompt[:4], literal[:4]):
    np.testing.assert_allclose(a.prompt_logprobs[1:], b.prompt_logprobs[len(words) + 1:],
                               atol=1e-5, rtol=0)
  assert [c.text for c in with_prompt[4:]] == [c.text for c in literal[4:]]


def test_a_lora_adapter_serves_its_merged_weights(restored, run_dir, tmp_path):
  """serve's load with a LoRA directory: echo log-probabilities are those of the model
  with W + s·A·B in place of the adapted kernels, not the base model's."""
  from bigsci_jax.adapt import lora, store, tune
  from bigsci_jax.serve.__main__ import load
  model, params, tok = restored
  cfg = tune.TuneConfig("lora", lora_rank=2, lora_alpha=4.0, lora_targets=("query", "value"))
  rng = np.random.default_rng(0)
  factors = jax.tree.map(lambda x: rng.standard_normal(x.shape).astype(np.float32) * 0.1,
                         lora.shapes(params, 2, cfg.lora_targets))
  out = store.save(tmp_path / "lora", "lora", factors, model.cfg, cfg.info())
  engine, _, metadata = load(run_dir, 4, out)
  assert metadata["adapter"]["kind"] == "lora" and metadata["adapter"]["rank"] == 2
  ids = [tok.encode(p) for p in PROMPTS]
  try:
    echo = [Choice(p, 0, generate.Sampling(), 0, logprobs=1, echo=True) for p in ids]
    _submit(engine, echo)()
  finally:
    engine.stop()
  merged, gaps = cfg.apply(params, factors), []
  for p, c in zip(ids, echo):
    row = jnp.asarray([[tok.bos_id] + p])
    with jax.default_matmul_precision("highest"):
      logp = jax.nn.log_softmax(model.apply({"params": merged}, row)[0], axis=-1)
      base = jax.nn.log_softmax(model.apply({"params": params}, row)[0], axis=-1)
    want = [float(logp[i, p[i]]) for i in range(1, len(p))]
    np.testing.assert_allclose(c.prompt_logprobs[1:], want, atol=1e-5, rtol=0)
    gaps += [abs(float(base[i, p[i]]) - w) for i, w in zip(range(1, len(p)), want)]
  assert max(gaps) > 1e-2  # the adapter changed the model


def test_request_checks_name_the_field(restored):
  _, _, tok = restored

  def refused(body, status=400):
    with pytest.raises(api.RequestError) as e:
      api.parse_completion(body, tok, 128, "m")
    assert e.value.status == status
    return str(e.value)

  assert "'max_tokens' must be at least 0" in refused({"prompt": "a", "max_tokens": -1})
  assert "must be an integer" in refused({"prompt": "a", "max_tokens": "8"})
  assert "unknown field 'foo'" in refused({"prompt": "a", "foo": 1})
  assert "needs 129 of the context window's 128" in refused({"prompt": [5] * 100,
                                                             "max_tokens": 29})
  api.parse_completion({"prompt": [5] * 127, "max_tokens": 1}, tok, 128, "m")  # fits exactly
  assert "outside the vocabulary" in refused({"prompt": [5, 10**6]})
  with pytest.raises(api.RequestError, match="prompt 1 is 11 tokens; this server takes prompts "
                     "of at most 10 tokens"):
    api.parse_completion({"prompt": [[5] * 10, [5] * 11]}, tok, 128, "m", 10)
  assert "'temperature' must be at least 0" in refused({"prompt": "a", "temperature": -1})
  assert "does not exist" in refused({"prompt": "a", "model": "other"}, 404)
  assert "'prompt' is required" in refused({"max_tokens": 1})
  prompts, opts, choices = api.parse_completion(
      {"prompt": [[0, 5, 6], [7]], "n": 2, "max_tokens": 3, "seed": 1}, tok, 128, "m")
  assert [c.prompt for c in choices] == [[5, 6], [5, 6], [7], [7]]  # a leading BOS is the BOS
  assert len({c.seed for c in choices}) == 4 and opts["n"] == 2


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _serve(model_dir, *args):
  """A server subprocess and its base URL, once it listens."""
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  proc = subprocess.Popen([sys.executable, "-m", "bigsci_jax.serve", f"--model_dir={model_dir}",
                           "--port=0", *args], env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
  line = proc.stdout.readline()
  if not line.startswith("serving"):
    proc.kill()
    raise AssertionError(f"the server did not start: {line} {proc.stderr.read()[-2000:]}")
  return proc, line.split(" on ")[1].strip()


@pytest.fixture(scope="module")
def server(run_dir):
  proc, url = _serve(run_dir, "--name=tiny", "--max_batch=16")
  yield url
  proc.send_signal(signal.SIGTERM)
  assert proc.wait(60) == 0


def test_the_harness_through_the_server_matches_the_in_process_adapter(server, run_dir,
                                                                       tmp_path, monkeypatch):
  """The server data parallel over 8 devices, the adapter with every layer split over 4."""
  pytest.importorskip("lm_eval")
  pytest.importorskip("tenacity")
  monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
  monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
  import lm_eval
  import lm_eval.models.openai_completions  # noqa: F401  (registers local-completions)
  from lm_eval.tasks import TaskManager
  importlib.import_module("bigsci_jax.lm_eval")  # registers the model bigsci_jax
  from bigsci_jax import mc_tasks
  from test_lm_eval import MULTIPLE_CHOICE, _mc_rows, _task
  tok = tokenizers.from_dir(run_dir)
  items = [i for i in mc_tasks.next_sentence_items("en", limit=40)  # no truncation either side
           if max(len(tok.encode(i.context + " " + c)) for c in i.choices) < 120][:20]
  assert len(items) >= 12
  _task(tmp_path, "bj_serve_mc", _mc_rows(items), MULTIPLE_CHOICE)
  manager = TaskManager(include_path=str(tmp_path))
  remote = lm_eval.simple_evaluate(
      model="local-completions", model_args=f"base_url={server}/v1/completions,model=tiny,"
      f"tokenizer_backend=remote,num_concurrent=8,max_length=128", tasks=["bj_serve_mc"],
      task_manager=manager, log_samples=True, bootstrap_iters=0)
  local = lm_eval.simple_evaluate(
      model="bigsci_jax", model_args=f"model_dir={run_dir},mesh=1x1x4", tasks=["bj_serve_mc"],
      task_manager=manager, log_samples=True, bootstrap_iters=0)
  r, l = remote["results"]["bj_serve_mc"], local["results"]["bj_serve_mc"]
  assert r["acc,none"] == l["acc,none"] and r["acc_bytes,none"] == l["acc_bytes,none"]
  by_doc = lambda out: {s["doc_id"]: [x[0][0] for x in s["resps"]]  # noqa: E731
                        for s in out["samples"]["bj_serve_mc"]}
  remote_ll, local_ll = by_doc(remote), by_doc(local)
  for doc, values in local_ll.items():
    np.testing.assert_allclose(remote_ll[doc], values, atol=1e-4)
  # The harness tokenizing with the run's vocabulary exported as a Hugging Face tokenizer
  # (python -m bigsci_jax.hf tokenizer) and sending token ids: the same scores.
  pytest.importorskip("transformers")
  from bigsci_jax.hf.__main__ import main as hf_main
  assert hf_main(["tokenizer", f"--model_dir={run_dir}", f"--out={tmp_path / 'hf_tok'}"]) == 0
  hf = lm_eval.simple_evaluate(
      model="local-completions", model_args=f"base_url={server}/v1/completions,model=tiny,"
      f"tokenizer_backend=huggingface,tokenizer={tmp_path / 'hf_tok'},num_concurrent=8,"
      f"max_length=128", tasks=["bj_serve_mc"], task_manager=manager, log_samples=True,
      bootstrap_iters=0)
  h = hf["results"]["bj_serve_mc"]
  assert h["acc,none"] == l["acc,none"] and h["acc_bytes,none"] == l["acc_bytes,none"]
  for doc, values in by_doc(hf).items():
    np.testing.assert_allclose(values, local_ll[doc], atol=1e-4)


def test_concurrent_clients_with_malformed_requests(server):
  """64 clients x 4 requests, every 10th malformed: good ones answered exactly as alone."""
  def good(i):
    return {"model": "tiny", "prompt": PROMPTS[i % 4], "max_tokens": 1 + i % 5, "temperature": 0,
            "logprobs": 1, "echo": bool(i % 2)}
  bad_bodies = ['{"prompt": "a", "max_tokens": -3}', '{"prompt": ', '{"prompt": "a", "n": "x"}',
                json.dumps({"prompt": [7] * 200}), '{"prompt": "a", "echo": 3}']
  expected = {}
  for i in range(20):  # each distinct good body, alone
    r = requests.post(f"{server}/v1/completions", json=good(i), timeout=60)
    assert r.status_code == 200, r.text
    expected[json.dumps(good(i))] = r.json()["choices"][0]

  def client(c):
    out = []
    for k in range(4):
      i = 4 * c + k
      if i % 10 == 3:
        r = requests.post(f"{server}/v1/completions", data=bad_bodies[i % 5], timeout=60,
                          headers={"Content-Type": "application/json"})
        out.append(("bad", r.status_code, r.json()))
      else:
        r = requests.post(f"{server}/v1/completions", json=good(i), timeout=120)
        out.append((json.dumps(good(i)), r.status_code, r.json()))
    return out

  with concurrent.futures.ThreadPoolExecutor(64) as pool:
    results = [x for xs in pool.map(client, range(64)) for x in xs]
  bad = [r for r in results if r[0] == "bad"]
  assert len(bad) == 26 and all(s == 400 and r["error"]["message"] for _, s, r in bad)
  for key, status, body in results:
    if key == "bad":
      continue
    assert status == 200, body
    got, want = body["choices"][0], expected[key]
    assert got["text"] == want["text"]
    np.testing.assert_allclose([x for x in got["logprobs"]["token_logprobs"] if x is not None],
                               [x for x in want["logprobs"]["token_logprobs"] if x is not None],
                               atol=1e-4)
  assert requests.get(f"{server}/health", timeout=10).json()["status"] == "ok"


def test_streamed_chunks_add_up_to_the_plain_response(server):
  for extra in ({}, {"stop": [" "], "n": 2}, {"echo": True, "logprobs": 1}):
    body = {"prompt": "Debian is", "max_tokens": 12, "temperature": 0, **extra}
    plain = requests.post(f"{server}/v1/completions", json=body, timeout=60).json()["choices"]
    with requests.post(f"{server}/v1/completions", json=body | {"stream": True}, timeout=60,
                       stream=True) as r:
      events = [line[len("data: "):] for line in r.iter_lines(decode_unicode=True) if line]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e)["choices"][0] for e in events[:-1]]
    for want in plain:
      mine = [c for c in chunks if c["index"] == want["index"]]
      assert "".join(c["text"] for c in mine) == want["text"]
      assert mine[-1]["finish_reason"] == want["finish_reason"]
      assert all(c["finish_reason"] is None for c in mine[:-1])
      if want["logprobs"]:
        assert [t for c in mine for t in c["logprobs"]["tokens"]] == want["logprobs"]["tokens"]
        assert [o for c in mine for o in c["logprobs"]["text_offset"]] == \
            want["logprobs"]["text_offset"]


def test_a_client_that_goes_away_frees_its_row(server):
  body = json.dumps({"prompt": "Debian", "max_tokens": 120, "temperature": 0}).encode()
  with socket.create_connection(tuple(server[len("http://"):].split(":")[:1]) +
                                (int(server.rsplit(":", 1)[1]),)) as s:
    s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
              + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
    time.sleep(0.3)
  deadline = time.time() + 30
  while time.time() < deadline:
    health = requests.get(f"{server}/health", timeout=10).json()
    if health["cancelled"] >= 1 and health["running"] == 0:
      break
    time.sleep(0.05)
  assert health["cancelled"] >= 1 and health["running"] == 0, health


def test_sigterm_finishes_in_flight_work_and_exits_0(run_dir):
  proc, url = _serve(run_dir)
  try:
    port = int(url.rsplit(":", 1)[1])
    taken = subprocess.run([sys.executable, "-m", "bigsci_jax.serve", f"--model_dir={run_dir}",
                            f"--port={port}"], capture_output=True, text=True, timeout=120,
                           env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert taken.returncode == 2 and "cannot listen on 127.0.0.1" in taken.stderr
    assert len(taken.stderr.strip().splitlines()) == 1
    result = {}

    def long_request():
      result["r"] = requests.post(f"{url}/v1/completions", json={
          "prompt": "Debian", "max_tokens": 100, "temperature": 0}, timeout=120)

    thread = threading.Thread(target=long_request)
    thread.start()
    time.sleep(1.0)
    proc.send_signal(signal.SIGTERM)
    thread.join(120)
    assert result["r"].status_code == 200
    assert len(result["r"].json()["choices"][0]["text"]) > 0
    assert proc.wait(60) == 0
    with pytest.raises(requests.ConnectionError):
      requests.get(f"{url}/health", timeout=5)
  finally:
    proc.kill()


def test_a_tensor_parallel_server_answers_as_one_device_does(run_dir, restored):
  """`--mesh=2x1x4`: every layer's heads and MLP split over 4 devices (the KV cache's
  heads too), the rows over 2 data shards; greedy completions and their
  log-probabilities are those of `generate` on one device."""
  model, params, tok = restored
  proc, url = _serve(run_dir, "--mesh=2x1x4", "--max_batch=4")
  try:
    info = requests.get(f"{url}/v1/models", timeout=10).json()["data"][0]
    assert info["metadata"]["mesh"] == {"data": 2, "fsdp": 1, "tensor": 4}, info
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
      answers = list(pool.map(lambda p: requests.post(f"{url}/v1/completions", json={
          "prompt": p, "max_tokens": 10, "temperature": 0, "logprobs": 1},
          timeout=120).json()["choices"][0], PROMPTS[:3]))
  finally:
    proc.kill()
  for prompt, answer in zip(PROMPTS[:3], answers):
    with jax.default_matmul_precision("highest"):
      want, logits = generate.generate(model, params, [tok.encode(prompt)], 10,
                                       return_logits=True, vocab=tok.vocab_size)
    assert answer["text"] == tokenizers.decode_until_eos(tok, want[0])
    logp = [float(jax.nn.log_softmax(logits[i][0])[t]) for i, t in enumerate(want[0])]
    got = answer["logprobs"]["token_logprobs"]
    assert len(got) >= 1
    np.testing.assert_allclose(got, logp[:len(got)], atol=1e-4, rtol=0)


def test_a_mesh_that_does_not_split_the_batch_is_one_sentence(run_dir, capsys):
  from bigsci_jax.serve.__main__ import main
  assert main([f"--model_dir={run_dir}", "--port=0", "--mesh=3x1x1", "--max_batch=4"]) == 2
  err = capsys.readouterr().err
  assert "--mesh=3x1x1 splits each batch over 3 data x fsdp shards" in err
  assert len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("flag, words", [
    ("--max_prompt_tokens=0", "--max_prompt_tokens must be at least 1, not 0"),
    ("--prefill_chunk=48", "--prefill_chunk must be 0 or a power of two of at least 2, not 48")])
def test_a_bad_prompt_flag_is_one_sentence(capsys, flag, words):
  from bigsci_jax.serve.__main__ import main
  assert main(["--model_dir=unused", flag]) == 2
  err = capsys.readouterr().err
  assert words in err and len(err.splitlines()) == 1


def test_a_model_dir_without_a_checkpoint_is_one_sentence(tmp_path):
  proc = subprocess.run([sys.executable, "-m", "bigsci_jax.serve",
                         f"--model_dir={tmp_path}", f"--port={_free_port()}"],
                        capture_output=True, text=True, timeout=120,
                        env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert proc.returncode == 2 and "holds no run" in proc.stderr
  assert len(proc.stderr.strip().splitlines()) == 1
