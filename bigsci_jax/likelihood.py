"""Scoring text with a model the way the evaluation harness asks for it: the
log-likelihood of a continuation given a context, the rolling log-likelihood of a
whole text, and generation until a stop string.

Context and continuation are encoded apart and concatenated, so the scored
tokens spell exactly the continuation; as in the harness, whitespace ending the
context moves to the start of the continuation first. For a prefix LM the
context is the bidirectional prefix. A row holds one request, laid out like a
training row (BOS-shifted inputs, segment 1, positions from 0); a request longer
than the context window loses context tokens from the left. Requests are sorted
by length and batched into rows of a few widths (each compiles once).

The tokenizer is a bigsci_jax.tokenizer.Tokenizer: its bos_id starts every row and
its eos_id ends generations.
"""

import functools
import logging

import jax
import jax.numpy as jnp
import numpy as np

from bigsci_jax import generate, sharding
from bigsci_jax import tokenizer as tokenizers
from bigsci_jax.model import over_logits, soft_prompt_ids
from bigsci_jax import step as steps

log = logging.getLogger(__name__)


class LikelihoodError(ValueError):
  """A request cannot be scored; the message says why."""


def split_pair(context, continuation):
  """Whitespace ending the context moves to the start of the continuation."""
  stripped = context.rstrip()
  return stripped, context[len(stripped):] + continuation


def encode_request(tokenizer, context, continuation):
  """(context ids, continuation ids) of one request, encoded apart after split_pair."""
  context, continuation = split_pair(context, continuation)
  return tokenizer.encode(context) if context else [], tokenizer.encode(continuation)


def token_rows(pairs, width, prefix_lm=False, lead=(), bos_id=0):
  """[(context ids, continuation ids)] -> batch features [N, width] (numpy int32), inputs
  starting from bos_id; contexts lose tokens from the left to fit. `lead` (a soft
  prompt's virtual-token ids, model.soft_prompt_ids) starts every context, never cut;
  it is input only."""
  n, lead = len(pairs), list(lead)
  room = width - len(lead)
  rows = {k: np.zeros((n, width), np.int32) for k in (
      "decoder_input_tokens", "decoder_target_tokens", "decoder_loss_weights",
      "decoder_segment_ids", "decoder_positions", "decoder_causal_attention")}
  for r, (ctx, cont) in enumerate(pairs):
    if not len(cont):
      raise LikelihoodError(f"request {r} has an empty continuation.")
    if len(cont) > room:
      raise LikelihoodError(f"request {r}'s continuation is {len(cont)} tokens; the context "
                            f"window is {room}.")
    ctx = lead + list(ctx)[max(0, len(ctx) + len(cont) - room):]
    tokens = ctx + list(cont)
    length = len(tokens)
    rows["decoder_target_tokens"][r, :length] = np.maximum(tokens, 0)
    rows["decoder_input_tokens"][r, :length] = [bos_id] + tokens[:-1]
    rows["decoder_loss_weights"][r, len(ctx):length] = 1
    rows["decoder_segment_ids"][r, :length] = 1
    rows["decoder_positions"][r, :length] = np.arange(length)
    if prefix_lm:
      rows["decoder_causal_attention"][r, :len(ctx) + 1] = 1
  return rows


def windows(tokens, first, window):
  """The (context, continuation) rows that score tokens[first:], each token exactly
  once and with as much preceding context as fits: a continuation that fits
  takes one row; a longer one is scored in pieces, each later piece with the
  tokens before it as context. From the very start, the first row scores `window`
  tokens after BOS alone; later rows score at most window - 1 after >= 1 token."""
  pairs, start = [], first
  while start < len(tokens):
    end = min(len(tokens), start + (window if start == 0 else window - 1))
    pairs.append((tokens[max(0, end - window):start], tokens[start:end]))
    start = end
  return pairs


def row_logliks(params, batch, *, model):
  """(summed continuation log-likelihood, whether greedy decoding yields it) per row of
  token_rows features (differentiable in params: prompt tuning trains through it)."""
  x_BxLxD = model.apply({"params": params}, **steps.model_inputs(model.cfg, batch), hidden=True)

  def scored(logits_BxCxV, targets_BxC):  # a target's log-probability is minus its loss
    ce_BxC, _ = steps.token_losses(logits_BxCxV, targets_BxC, 0.0)
    return -ce_BxC, jnp.argmax(logits_BxCxV, axis=-1) == targets_BxC

  target_BxL, greedy_BxL = over_logits(model.cfg, params, x_BxLxD, scored,
                                       batch["decoder_target_tokens"])
  weights_BxL = batch["decoder_loss_weights"]
  hit_BxL = greedy_BxL | (weights_BxL == 0)
  return jnp.sum(target_BxL * weights_BxL, axis=-1), jnp.all(hit_BxL, axis=-1)


class Scorer:
  """Log-likelihoods and generations of one model's params.

  With a mesh, each batch is placed sharded over its batch axes (batch_size must
  divide them) and the model traces under the mesh's logical rules. A soft prompt
  attached to params (adapt.soft_prompt) starts every row and takes its share of
  the window.
  """

  def __init__(self, model, params, tokenizer, seq_len, batch_size=16, mesh=None):
    self.model, self.params, self.tokenizer = model, params, tokenizer
    self.seq_len, self.batch_size, self.mesh = seq_len, batch_size, mesh
    self.prefix_lm = model.cfg.mask == "prefix"
    self.lead = soft_prompt_ids(params)
    self._score = jax.jit(functools.partial(row_logliks, model=model))

  def _batches(self, items, size):
    """(indices, items padded to batch_size with the first) per batch, longest items
    (by size) first so each batch's width fits it closely."""
    order = sorted(range(len(items)), key=lambda i: -size(items[i]))
    for start in range(0, len(order), self.batch_size):
      ids = order[start:start + self.batch_size]
      chunk = [items[i] for i in ids]
      yield ids, chunk + [chunk[0]] * (self.batch_size - len(chunk))

  def _apply(self, rows):
    return sharding.call_with_rows(self.mesh, self._score, self.params, rows=rows)

  def score_requests(self, pairs):
    """[(context ids, continuation ids)] of any length -> (float64 [N] summed
    continuation log-likelihoods, bool [N] greedy): each request in `windows`."""
    rows, owner = [], []
    for i, (context, continuation) in enumerate(pairs):
      if not len(continuation):
        raise LikelihoodError(f"request {i} has an empty continuation.")
      tokens = list(context) + list(continuation)
      pieces = windows(tokens, len(context), self.seq_len - len(self.lead))
      rows += pieces
      owner += [i] * len(pieces)
    sums, greedy = self.score_tokens(rows)
    owner = np.asarray(owner, int)
    total = np.bincount(owner, weights=sums, minlength=len(pairs))
    missed = np.bincount(owner, weights=~greedy, minlength=len(pairs))
    return total, missed == 0

  def score_tokens(self, pairs):
    """[(context ids, continuation ids)], each fitting the window -> (float64 [N]
    summed log-likelihoods, bool [N] greedy)."""
    sums, greedy = np.zeros(len(pairs)), np.zeros(len(pairs), bool)
    for ids, chunk in self._batches(pairs, lambda pair: len(pair[0]) + len(pair[1])):
      width = generate.bucket_width(len(self.lead) + len(chunk[0][0]) + len(chunk[0][1]), self.seq_len)
      chunk_sums, chunk_greedy = sharding.to_host(
          self._apply(token_rows(chunk, width, self.prefix_lm, self.lead,
                                 self.tokenizer.bos_id)))
      sums[ids] = chunk_sums[:len(ids)]
      greedy[ids] = chunk_greedy[:len(ids)]
    return sums, greedy

  def loglikelihood(self, requests):
    """[(context, continuation)] -> (float64 [N], bool [N] greedy)."""
    return self.score_requests([encode_request(self.tokenizer, *r) for r in requests])

  def loglikelihood_rolling(self, texts):
    """[text] -> float64 [N]: each text's log-likelihood from BOS, in context windows
    (empty texts: 0)."""
    tokens = [self.tokenizer.encode(text) for text in texts]
    sums = np.zeros(len(texts))
    scored = [i for i, t in enumerate(tokens) if t]
    if scored:
      sums[scored] = self.score_requests([([], tokens[i]) for i in scored])[0]
    return sums

  def generate_until(self, contexts, until=(), max_new_tokens=32,
                     sampling=generate.Sampling(), seed=0):
    """[context] -> [generated text, cut before the first stop string of `until`]; a
    row also stops at EOS. A context too long for the window with max_new_tokens
    loses tokens from the left, with a warning."""
    room = self.model.cfg.max_len - 1 - len(self.lead) - max_new_tokens
    if room < 1:
      raise LikelihoodError(f"max_new_tokens={max_new_tokens} leaves no room for a context in "
                            f"the window of {self.model.cfg.max_len} tokens.")
    prompts = []
    for context in contexts:
      ids = self.tokenizer.encode(context)
      if len(ids) > room:
        log.warning("a generation context of %d tokens keeps its last %d", len(ids), room)
        ids = ids[-room:]
      prompts.append(ids)

    eos = self.tokenizer.eos_id
    text = functools.partial(tokenizers.decode_until_eos, self.tokenizer)

    def cut(s):
      for stop in until:
        if stop and stop in s:
          s = s[:s.index(stop)]
      return s

    def stopped(ids):
      if eos in ids:
        return True
      s = text(ids)
      return cut(s) != s

    def done(generated):
      return [stopped(ids) for ids in generated]

    outputs = [None] * len(prompts)
    for n, (ids, chunk) in enumerate(self._batches(prompts, len)):
      width = min(generate.bucket_width(1 + len(self.lead) + len(chunk[0]), self.seq_len),
                  1 + len(self.lead) + room)
      generated = generate.generate(self.model, self.params, chunk, max_new_tokens, sampling,
                                    seed + n * self.batch_size, stop_fn=done, min_width=width,
                                    vocab=self.tokenizer.vocab_size, bos_id=self.tokenizer.bos_id,
                                    mesh=self.mesh)
      for i, row in zip(ids, generated):
        outputs[i] = cut(text(row))
    return outputs
