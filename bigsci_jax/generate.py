"""Autoregressive generation with a KV cache: greedy, temperature, top-k, top-p.

Prompts of different lengths are left-padded into one batch; each row is
[BOS] + prompt (BOS: the tokenizer's bos_id, the token training rows start from), its
positions counted from its own BOS. For a prefix LM the
prompt is encoded once, bidirectionally, into the cache (the bidirectional
prefix, as in training), then tokens are generated causally. A prompt that does
not fit the context window with the tokens to generate is refused.

  python -m bigsci_jax.generate --model_dir=DIR --prompt="Debian est" [--max_new_tokens=40]
      [--temperature=0.8 --top_k=40 --top_p=0.95 --seed=0] [--prompt_dir=P] [--offload=host]
      [--mesh=DATAxFSDPxTENSOR]

--prompt_dir: an adapter (python -m bigsci_jax.prompt_tune): a soft prompt starts every
prompt; LoRA factors are merged into the weights.
--offload=host: the parameters stay in pinned host memory and each layer's weights are
brought to the device as the layer scan reaches it (a model larger than device memory).
--mesh: the model placed over those devices as in training (MeshConfig; e.g. 1x1x4
splits every layer's heads and MLP over 4 devices, for a model one device cannot
hold); default one device.
"""

import argparse
import dataclasses
import functools
import json
import sys

import jax
import jax.numpy as jnp
import numpy as np

from bigsci_jax import kv_cache, sharding
from bigsci_jax.model import head_logits, over_logits, soft_prompt_ids
from bigsci_jax.config import OFFLOAD

MIN_WIDTH = 32


def bucket_width(length, seq_len):
  """The smallest power of two >= length (at least MIN_WIDTH), capped at seq_len: the
  few row widths (and cache reads) batches are padded to, so each compiles once."""
  return min(seq_len, max(MIN_WIDTH, 1 << (max(length, 1) - 1).bit_length()))


class GenerationError(ValueError):
  """Generation cannot run as asked; the message says why and what to do."""


@dataclasses.dataclass(frozen=True)
class Sampling:
  temperature: float = 0.0   # 0: greedy
  top_k: int = 0             # 0: no top-k cut
  top_p: float = 1.0         # 1: no nucleus cut

  def __post_init__(self):
    bad = [f"{name}={value!r} ({rule})" for name, value, ok, rule in (
        ("temperature", self.temperature, self.temperature >= 0, "0 is greedy, else > 0"),
        ("top_k", self.top_k, self.top_k >= 0, "0 keeps every token, else > 0"),
        ("top_p", self.top_p, 0 < self.top_p <= 1, "in (0, 1]")) if not ok]
    if bad:
      raise GenerationError(f"sampling settings not allowed: {'; '.join(bad)}.")


LOGPROBS_MAX = 20  # the most top alternatives a caller may ask for per position


def sampling_rows(samplings):
  """[Sampling] -> (temperature f32 [B], top_k i32 [B], top_p f32 [B]) for `sample`."""
  return (np.asarray([s.temperature for s in samplings], np.float32),
          np.asarray([s.top_k for s in samplings], np.int32),
          np.asarray([s.top_p for s in samplings], np.float32))


def sample(logits_BxV, keys_B, temperature_B, top_k_B, top_p_B):
  """One token per row, each row with its own settings: temperature <= 0 is greedy,
  top_k 0 keeps every token, top_p 1 keeps the whole distribution (else the smallest
  set of tokens whose probability reaches top_p, after the top-k cut)."""
  logits_BxV = logits_BxV.astype(jnp.float32)
  greedy_B = jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)
  # the sorts below cost more than a small model's step: all-greedy batches skip them
  return jax.lax.cond(jnp.any(temperature_B > 0), _draw, lambda *_: greedy_B,
                      logits_BxV, keys_B, temperature_B, top_k_B, top_p_B, greedy_B)


def _draw(logits_BxV, keys_B, temperature_B, top_k_B, top_p_B, greedy_B):
  vocab = logits_BxV.shape[-1]
  scaled_BxV = logits_BxV / jnp.maximum(temperature_B, 1e-6)[:, None]
  sorted_BxV = jnp.sort(scaled_BxV, axis=-1)[:, ::-1]
  k_B = jnp.where(top_k_B > 0, jnp.minimum(top_k_B, vocab), vocab)
  kth_Bx1 = jnp.take_along_axis(sorted_BxV, (k_B - 1)[:, None], axis=-1)
  scaled_BxV = jnp.where(scaled_BxV < kth_Bx1, -jnp.inf, scaled_BxV)
  sorted_BxV = jnp.where(jnp.arange(vocab) < k_B[:, None], sorted_BxV, -jnp.inf)
  cumulative_BxV = jnp.cumsum(jax.nn.softmax(sorted_BxV, axis=-1), axis=-1)
  keep_B = jnp.minimum(jnp.sum(cumulative_BxV < top_p_B[:, None], axis=-1), vocab - 1)
  cut_Bx1 = jnp.take_along_axis(sorted_BxV, keep_B[:, None], axis=-1)
  scaled_BxV = jnp.where((top_p_B[:, None] < 1.0) & (scaled_BxV < cut_Bx1), -jnp.inf, scaled_BxV)
  drawn_B = jax.vmap(jax.random.categorical)(keys_B, scaled_BxV).astype(jnp.int32)
  return jnp.where(temperature_B <= 0, greedy_B, drawn_B)


@dataclasses.dataclass(frozen=True)
class Picked:
  """What one decoding position produced, per row: the token, its log-probability under
  the model (temperature 1, before any cut), the top alternatives (ids and
  log-probabilities, best first; `top` columns, 0 unless asked for) and the raw logits."""
  token: jax.Array           # int32 [B]
  logprob: jax.Array         # f32 [B]
  top_ids: jax.Array         # int32 [B, top]
  top_logprobs: jax.Array    # f32 [B, top]
  logits: jax.Array          # f32 [B, V]


jax.tree_util.register_dataclass(Picked, data_fields=["token", "logprob", "top_ids",
                                                      "top_logprobs", "logits"], meta_fields=[])


def _pick(logits_BxV, keys_B, step, rows, top, vocab):
  """Sample each row's next token among the first `vocab` ids (the tokenizer's; a model's
  embedding table may be padded past it); log-probabilities are over the whole table."""
  temperature_B, top_k_B, top_p_B = rows
  step_B = jnp.broadcast_to(jnp.asarray(step, jnp.int32), keys_B.shape)  # a row's own count
  step_keys_B = jax.vmap(jax.random.fold_in)(keys_B, step_B)
  allowed_BxV = jnp.where(jnp.arange(logits_BxV.shape[-1]) < vocab, logits_BxV, -jnp.inf)
  token_B = sample(allowed_BxV, step_keys_B, temperature_B, top_k_B, top_p_B)
  logp_BxV = jax.nn.log_softmax(logits_BxV.astype(jnp.float32), axis=-1)
  top_lp_BxK, top_ids_BxK = jax.lax.top_k(logp_BxV, top)
  return Picked(token_B, jnp.take_along_axis(logp_BxV, token_B[:, None], axis=-1)[:, 0],
                top_ids_BxK.astype(jnp.int32), top_lp_BxK, logits_BxV.astype(jnp.float32))


def prompt_batch(prompts, prefix_lm, min_width=0, lead=(), bos_id=0):
  """Left-padded [bos_id] + lead + prompt rows: tokens, positions, segment ids, prefix
  flags [B, P], P at least min_width (fewer distinct shapes to compile). `lead` is a soft
  prompt's virtual-token ids (model.soft_prompt_ids), inside a prefix LM's prefix."""
  lead = list(lead)
  width = max(min_width, 1 + len(lead) + max(len(p) for p in prompts))
  b = len(prompts)
  tokens, positions = np.zeros((b, width), np.int32), np.full((b, width), -1, np.int32)
  segments = np.zeros((b, width), np.int32)
  for r, prompt in enumerate(prompts):
    row = [bos_id] + lead + list(prompt)
    tokens[r, width - len(row):] = row
    positions[r, width - len(row):] = np.arange(len(row))
    segments[r, width - len(row):] = 1
  prefix = segments if prefix_lm else np.zeros_like(segments)
  return tokens, positions, segments, prefix


def _prefill(model, vocab, cache_len, top, params, tokens, positions, segments, prefix, keys, rows):
  """The prompt attends over its own P slots; the cache then gets cache_len."""
  cache = kv_cache.empty(model, tokens.shape[0], tokens.shape[1])
  x_BxPxD, mutated = model.apply({"params": params, "cache": cache}, tokens, positions, segments,
                                 prefix, decode=True, hidden=True, mutable=["cache"])
  logits_BxV = head_logits(model.cfg, params, x_BxPxD[:, -1:])[:, 0]
  return (_pick(logits_BxV, keys, 0, rows, top, vocab),
          kv_cache.pinned(kv_cache.resize_slots(mutated["cache"], cache_len)))


def _extend(model, vocab, top, reads, params, cache, tokens_BxC, positions_BxC, counts_B, keys,
            step, rows, cache_rows=None):
  """Row b's first counts_B[b] tokens of tokens_BxC appended to its cache (a row of none
  keeps its cache as it was), then the pick after its last one; attention reads only the
  first `reads` slots of each row (None: all), which must hold every slot a row has
  filled, these tokens' included. One token per row is a decoding step; more, a chunk of
  a long prompt's prefill (causal models). cache_rows [B]: the cache rows the rows are
  (default: kv_cache.step_rows)."""
  real_BxC = (jnp.arange(tokens_BxC.shape[1])[None, :] < counts_B[:, None]).astype(jnp.int32)
  x_BxCxD, mutated = model.apply({"params": params, "cache": cache}, tokens_BxC, positions_BxC,
                                 real_BxC, 0 * real_BxC, decode=True, reads=reads,
                                 cache_rows=cache_rows, hidden=True, mutable=["cache"])
  last_B = jnp.maximum(counts_B - 1, 0)
  x_Bx1xD = jnp.take_along_axis(x_BxCxD, last_B[:, None, None], axis=1)
  logits_BxV = head_logits(model.cfg, params, x_Bx1xD)[:, 0]
  return _pick(logits_BxV, keys, step, rows, top, vocab), kv_cache.pinned(mutated["cache"])


def _prompt_logprobs(model, vocab, top, params, tokens, positions, segments, keys, rows):
  """A causal pass over left-padded [BOS] + prompt rows: column i (i >= 1) gets the
  log-probability of tokens[:, i] after the columns before it, and the top
  alternatives there; also what the last column picks next."""
  x_BxPxD = model.apply({"params": params}, tokens, positions, segments, None, hidden=True)

  def scored(logits_BxCxV, next_BxC):  # each column's log-probability of the token after it
    logp_BxCxV = jax.nn.log_softmax(logits_BxCxV.astype(jnp.float32), axis=-1)
    top_lp_BxCxK, top_ids_BxCxK = jax.lax.top_k(logp_BxCxV, top)
    return (jnp.take_along_axis(logp_BxCxV, next_BxC[..., None], axis=-1)[..., 0],
            top_ids_BxCxK.astype(jnp.int32), top_lp_BxCxK)

  after = over_logits(model.cfg, params, x_BxPxD, scored, jnp.roll(tokens, -1, axis=1))
  # Column i's scores are those of tokens[:, i + 1]: moved one column on, column 0 none.
  token_lp_BxP, top_ids_BxPxK, top_lp_BxPxK = (
      jnp.pad(a[:, :-1], ((0, 0), (1, 0)) + ((0, 0),) * (a.ndim - 2)) for a in after)
  logits_BxV = head_logits(model.cfg, params, x_BxPxD[:, -1:])[:, 0]
  return (token_lp_BxP, top_ids_BxPxK, top_lp_BxPxK,
          _pick(logits_BxV, keys, 0, rows, top, vocab))


class Decoder:
  """The jitted pieces of decoding for one model, each compiled once per shape:
  `prefill` (prompt rows into a fresh cache of cache_len slots, then the first pick),
  `step` (one more token per row), `extend` (several: a chunk of a long prompt),
  `prompt_logprobs` (every prompt token's
  log-probability under a causal pass, for scoring), and for a server's running batch
  `put_rows` / `move_rows` (put prefilled rows into its cache; pack its rows). `top`
  is how many alternatives each pick reports (static); tokens are drawn from the first
  `vocab` ids (default: the model's whole table). With a mesh, the model traces under
  its logical rules."""

  def __init__(self, model, mesh=None, vocab=None):
    self.model, self.mesh = model, mesh
    vocab = vocab or model.cfg.vocab_size
    self._prefill = jax.jit(functools.partial(_prefill, model, vocab), static_argnums=(0, 1))
    self._extend = jax.jit(functools.partial(_extend, model, vocab), static_argnums=(0, 1),
                           donate_argnums=(3,))
    self._prompt = jax.jit(functools.partial(_prompt_logprobs, model, vocab),
                           static_argnums=(0,))
    self._empty = jax.jit(functools.partial(kv_cache.empty, model), static_argnums=(0, 1))
    self._move_rows = jax.jit(kv_cache.move_rows, donate_argnums=(0,))
    self._put_rows = jax.jit(kv_cache.put_rows, donate_argnums=(0,))
    self._put_locally = jax.jit(kv_cache.put_rows_locally, donate_argnums=(0,))

  def _run(self, fn, *args):
    if self.mesh is None:
      return fn(*args)
    with sharding.activate(self.mesh):
      return fn(*args)

  def prefill(self, params, batch, keys, rows, cache_len, top=0):
    return self._run(self._prefill, cache_len, top, params, *batch, keys, rows)

  def step(self, params, cache, token_B, positions_B, keys, step, rows, top=0, filled=None,
           live_B=None):
    """One more token per row; `step` (an int, or one per row) counts the row's picks
    so far, for its sampling key. With fewer rows than `cache` holds, the step runs on
    its kv_cache.step_rows(cache rows, rows, shards of the batch axis), the others untouched.
    `filled`: the most slots a row holds once this token
    is written (its index + 1); attention then reads only the first
    bucket_width(filled) slots of every row instead of all of them (a step's
    cost follows the rows' lengths, not the window; one compile per bucket).
    live_B (default: every row): the rows that take a token; the others keep their
    cache as it was (a server's free slots, and rows still prefilling)."""
    counts_B = np.ones(len(token_B), np.int32) if live_B is None else live_B
    return self.extend(params, cache, jnp.asarray(token_B)[:, None],
                       jnp.asarray(positions_B)[:, None], counts_B, keys, step, rows, top, filled)

  def extend(self, params, cache, tokens_BxC, positions_BxC, counts_B, keys, step, rows, top=0,
             filled=None, cache_rows=None):
    """Row b's first counts_B[b] tokens of tokens_BxC (at positions_BxC) appended to its
    cache, and the pick after its last one (step: as for `step`); `filled`: the most
    slots a row holds after them; cache_rows (distinct): the cache rows the rows are
    (default: as for `step`); over a batch axis of n shards, row i's in block i // (B / n)
    of the cache's rows (each shard's rows its own, kv_cache.Entry). A long prompt
    prefilled chunk by chunk between a server's decoding steps (causal models)."""
    slots = kv_cache.row_slots(cache)
    reads = None if filled is None else bucket_width(filled, slots)
    chosen = None if cache_rows is None else np.asarray(cache_rows, np.int32)
    if chosen is not None and self.mesh is not None:
      kv_cache.check_blocks(chosen, cache, sharding.batch_shards(self.mesh))
    return self._run(self._extend, top, None if reads == slots else reads, params, cache,
                     tokens_BxC, positions_BxC, np.asarray(counts_B, np.int32), keys, step, rows,
                     chosen)

  def prompt_logprobs(self, params, batch, keys, rows, top=0):
    tokens, positions, segments, _ = batch
    return self._run(self._prompt, top, params, tokens, positions, segments, keys, rows)

  def empty_cache(self, rows, cache_len):
    """A fresh cache of `rows` rows of cache_len slots (nothing visible)."""
    return self._run(self._empty, rows, cache_len)

  def move_rows(self, cache, from_N, to_N):
    """`cache` (donated) with row to_N[i] a copy of row from_N[i]; to_N[i] >= the rows of
    `cache` copies nothing."""
    return self._run(self._move_rows, cache, np.asarray(from_N, np.int32),
                     np.asarray(to_N, np.int32))

  def put_rows(self, cache, new, slots_N, shift_N):
    """`cache` (donated) with row slots_N[i] replaced by row i of `new` (a prefill's cache,
    of as many slots per row or fewer) moved shift_N[i] slots left; slots_N[i] >= the
    rows of `cache` puts that row nowhere. Over a mesh whose batch axis has n shards,
    rows going into block i // (N / n) of the cache (or nowhere) are put by each shard
    into its own rows (the server picks such slots); other rows cross devices."""
    slots = np.asarray(slots_N, np.int32)
    local = self.mesh is not None and kv_cache.in_own_blocks(
        slots, kv_cache.row_count(cache), sharding.batch_shards(self.mesh))
    return self._run(self._put_locally if local else self._put_rows, cache, new, slots,
                     np.asarray(shift_N, np.int32))

  def compiled_shapes(self):
    """How many shapes the jitted functions have compiled (a warm server's count stays)."""
    return sum(f._cache_size() for f in (self._prefill, self._extend, self._prompt,
                                         self._empty, self._move_rows, self._put_rows,
                                         self._put_locally))


def decoder_for(model, vocab=None, mesh=None):
  """The Decoder that `generate` uses for (model, vocab, mesh): one per combination."""
  return _decoder(model, vocab, mesh)


@functools.lru_cache(maxsize=8)
def _decoder(model, vocab, mesh):
  return Decoder(model, mesh, vocab)


def row_keys(seeds):
  """One sampling key per row from each row's integer seed."""
  return jax.vmap(jax.random.key)(jnp.asarray(seeds, jnp.uint32))


def generate(model, params, prompts, max_new_tokens, sampling=Sampling(), seed=0,
             return_logits=False, stop_fn=None, min_width=0, vocab=None, bos_id=0, mesh=None):
  """Token lists continuing each [bos_id] + prompt (and, with return_logits, the [B, V]
  logits each generated token was drawn from), drawn from the first `vocab` ids
  (default all). With a mesh (params placed on it, e.g. evaluate.restore's), the
  model runs over it: the rows are padded to a multiple of its batch shards.

  stop_fn(generated token lists) -> one bool per row, True where that row is done;
  generation ends early once every row is (rows keep their extra tokens: the
  caller cuts them). min_width pads the prompt batch to at least that width. Row r
  samples with seed + r. A soft prompt attached to params starts every prompt.
  """
  cfg = model.cfg
  lead = soft_prompt_ids(params)
  count = len(prompts)
  if mesh is not None:  # filler rows repeat the first; only `count` rows come back
    prompts = list(prompts) + [prompts[0]] * (-count % sharding.batch_shards(mesh))
  batch = prompt_batch(prompts, cfg.mask == "prefix", min_width, lead, bos_id)
  width = batch[0].shape[1]
  if width + max_new_tokens - 1 > cfg.max_len:  # the last new token is not fed back
    soft = f" after a soft prompt of {len(lead)}" if lead else ""
    raise GenerationError(f"a prompt of {width - 1 - len(lead)} tokens{soft} plus "
                          f"{max_new_tokens} new tokens exceeds the context window of "
                          f"{cfg.max_len}; shorten the prompt or generate fewer tokens.")
  if max_new_tokens <= 0:
    return ([[] for _ in range(count)], []) if return_logits else [[] for _ in range(count)]
  decoder, keys = decoder_for(model, vocab, mesh), row_keys(seed + np.arange(len(prompts)))
  rows = sampling_rows([sampling] * len(prompts))
  picked, cache = decoder.prefill(params, batch, keys, rows, cfg.max_len)
  next_pos = batch[1][:, -1] + 1
  out, all_logits = [], []
  for i in range(max_new_tokens):
    token = np.asarray(picked.token)
    out.append(token[:count])
    all_logits.append(np.asarray(picked.logits)[:count])
    if i + 1 == max_new_tokens or (
        stop_fn is not None and all(stop_fn(np.stack(out, axis=1).tolist()))):
      break
    picked, cache = decoder.step(params, cache, token, next_pos, keys, i + 1, rows,
                                 filled=width + i + 1)
    next_pos = next_pos + 1
  generated = np.stack(out, axis=1).tolist()
  return (generated, all_logits) if return_logits else generated


def main(argv):
  p = argparse.ArgumentParser(prog="python -m bigsci_jax.generate", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--model_dir", required=True)
  p.add_argument("--prompt", action="append", required=True)
  p.add_argument("--max_new_tokens", type=int, default=40)
  p.add_argument("--temperature", type=float, default=0.0)
  p.add_argument("--top_k", type=int, default=0)
  p.add_argument("--top_p", type=float, default=1.0)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--prompt_dir", default=None, help="an adapter (soft prompt or LoRA) to apply")
  p.add_argument("--offload", default="none", choices=OFFLOAD,
                 help="host: parameters in pinned host memory, one layer on the device at a time")
  p.add_argument("--mesh", default=None, help="DATAxFSDPxTENSOR: the model over those devices "
                 "(e.g. 1x1x4: each layer split 4 ways); default one device")
  args = p.parse_args(argv)
  from bigsci_jax import evaluate, loop
  from bigsci_jax import tokenizer as tokenizers
  from bigsci_jax.adapt import store
  from bigsci_jax.config import ConfigError
  try:  # one device unless --mesh
    sampling = Sampling(args.temperature, args.top_k, args.top_p)
    run, runtime, params, _ = evaluate.restore(args.model_dir, None if args.mesh else 1,
                                               args.offload, args.mesh)
    params = store.attach_dir(params, args.prompt_dir, run.model)
    tok = loop.read_tokenizer(args.model_dir)
    outputs = generate(runtime.model, params, [tok.encode(t) for t in args.prompt],
                       args.max_new_tokens, sampling, args.seed, vocab=tok.vocab_size,
                       bos_id=tok.bos_id, mesh=runtime.mesh if args.mesh else None)
  except (GenerationError, evaluate.EvaluationError, loop.RunNotFound,
          store.AdapterError, ConfigError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  texts = [tokenizers.decode_until_eos(tok, ids) for ids in outputs]
  for prompt, text in zip(args.prompt, texts):
    print(f"{prompt}{text}")
  print(json.dumps({"prompts": args.prompt, "completions": texts}))
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
