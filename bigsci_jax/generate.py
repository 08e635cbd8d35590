"""Autoregressive generation with a KV cache: greedy, temperature, top-k, top-p.

Prompts of different lengths are left-padded into one batch; each row is
[BOS] + prompt, its positions counted from its own BOS. For a prefix LM the
prompt is encoded once, bidirectionally, into the cache (the bidirectional
prefix, as in training), then tokens are generated causally. A prompt that does
not fit the context window with the tokens to generate is refused.

  python -m bigsci_jax.generate --model_dir=DIR --prompt="Debian est" [--max_new_tokens=40]
      [--temperature=0.8 --top_k=40 --top_p=0.95 --seed=0]
"""

import argparse
import dataclasses
import functools
import json
import sys

import jax
import jax.numpy as jnp
import numpy as np

BOS_ID = 0  # seqio decoders start from token 0 (also the padding id)


class GenerationError(ValueError):
  """Generation cannot run as asked; the message says why and what to do."""


@dataclasses.dataclass(frozen=True)
class Sampling:
  temperature: float = 0.0   # 0: greedy
  top_k: int = 0             # 0: no top-k cut
  top_p: float = 1.0         # 1: no nucleus cut


def _reset(path, x):
  name = path[-1].key
  if name == "positions":
    return jnp.full_like(x, -1)
  return jnp.zeros_like(x)


def empty_cache(model, batch_size):
  """The decoding cache for batch_size rows of model.cfg.max_len slots."""
  tokens = jnp.zeros((batch_size, 1), jnp.int32)
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), tokens, decode=True)["cache"])
  return jax.tree_util.tree_map_with_path(
      _reset, jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes))


def prompt_batch(prompts, prefix_lm, min_width=0):
  """Left-padded [BOS] + prompt rows: tokens, positions, segment ids, prefix flags [B, P],
  P at least min_width (fewer distinct shapes to compile)."""
  width = max(min_width, 1 + max(len(p) for p in prompts))
  b = len(prompts)
  tokens, positions = np.zeros((b, width), np.int32), np.full((b, width), -1, np.int32)
  segments = np.zeros((b, width), np.int32)
  for r, prompt in enumerate(prompts):
    row = [BOS_ID] + list(prompt)
    tokens[r, width - len(row):] = row
    positions[r, width - len(row):] = np.arange(len(row))
    segments[r, width - len(row):] = 1
  prefix = segments if prefix_lm else np.zeros_like(segments)
  return tokens, positions, segments, prefix


def sample(logits_BxV, key, sampling: Sampling):
  if sampling.temperature <= 0:
    return jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)
  logits = logits_BxV / sampling.temperature
  if sampling.top_k:
    kth = jax.lax.top_k(logits, sampling.top_k)[0][:, -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  if sampling.top_p < 1.0:
    sorted_desc = jnp.sort(logits, axis=-1)[:, ::-1]
    cumulative = jnp.cumsum(jax.nn.softmax(sorted_desc, axis=-1), axis=-1)
    # the smallest set whose probability reaches top_p: keep logits >= the cut-off one
    cut = jnp.take_along_axis(sorted_desc, jnp.sum(cumulative < sampling.top_p, axis=-1,
                                                   keepdims=True), axis=-1)
    logits = jnp.where(logits < cut, -jnp.inf, logits)
  return jax.random.categorical(key, logits).astype(jnp.int32)


@functools.partial(jax.jit, static_argnums=(0,))
def _forward(model, params, cache, tokens, positions, segments, prefix):
  logits, mutated = model.apply({"params": params, "cache": cache}, tokens, positions, segments,
                                prefix, decode=True, mutable=["cache"])
  return logits[:, -1], mutated["cache"]


def generate(model, params, prompts, max_new_tokens, sampling=Sampling(), seed=0,
             return_logits=False, stop_fn=None, min_width=0):
  """Token lists continuing each prompt (and, with return_logits, the [B, V] logits
  each generated token was drawn from).

  stop_fn(generated token lists) -> one bool per row, True where that row is done;
  generation ends early once every row is (rows keep their extra tokens: the
  caller cuts them). min_width pads the prompt batch to at least that width.
  """
  cfg = model.cfg
  tokens, positions, segments, prefix = prompt_batch(prompts, cfg.mask == "prefix", min_width)
  if tokens.shape[1] + max_new_tokens > cfg.max_len:
    raise GenerationError(f"a prompt of {tokens.shape[1] - 1} tokens plus {max_new_tokens} new "
                          f"tokens exceeds the context window of {cfg.max_len}; shorten the "
                          f"prompt or generate fewer tokens.")
  cache = empty_cache(model, len(prompts))
  logits, cache = _forward(model, params, cache, tokens, positions, segments, prefix)
  next_pos = positions[:, -1:] + 1
  key = jax.random.key(seed)
  out, all_logits = [], []
  ones = np.ones((len(prompts), 1), np.int32)
  for i in range(max_new_tokens):
    key, sub = jax.random.split(key)
    token = sample(logits, sub, sampling)
    out.append(np.asarray(token))
    all_logits.append(np.asarray(logits))
    if i + 1 == max_new_tokens or (
        stop_fn is not None and all(stop_fn(np.stack(out, axis=1).tolist()))):
      break
    logits, cache = _forward(model, params, cache, token[:, None], next_pos, ones, 0 * ones)
    next_pos = next_pos + 1
  generated = np.stack(out, axis=1).tolist() if out else [[] for _ in prompts]
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
  args = p.parse_args(argv)
  from bigsci_jax import evaluate, loop
  try:
    run, runtime, params, _ = evaluate.restore(args.model_dir)
    if run.data.mixture == "synthetic":
      raise GenerationError(f"{args.model_dir} trained on synthetic data: there is no vocabulary "
                            f"to turn a prompt into tokens.")
    sp = loop.read_vocab(args.model_dir)
    sampling = Sampling(args.temperature, args.top_k, args.top_p)
    outputs = generate(runtime.model, jax.device_get(params), [sp.encode(t) for t in args.prompt],
                       args.max_new_tokens, sampling, args.seed)
  except (GenerationError, evaluate.EvaluationError, loop.RunNotFound) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  texts = [sp.decode([t for t in ids if t > 1]) for ids in outputs]
  for prompt, text in zip(args.prompt, texts):
    print(f"{prompt}{text}")
  print(json.dumps({"prompts": args.prompt, "completions": texts}))
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
