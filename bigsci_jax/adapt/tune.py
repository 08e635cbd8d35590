"""Prompt tuning: train a soft prompt on a frozen model from multiple-choice items.

The only trainable array is the prompt [P, D]; the base parameters are an argument
of the jitted step, never differentiated, never in the optimizer state, never
written. Objectives over mc_tasks.Item (context, choices, answer, delimiter):
  choice  cross-entropy over an item's choices, each scored by its mean
          log-likelihood per token (the harness ranks choices by summed
          log-likelihood, but sentence-long choices differ by tens of nats and
          that drowns the gradient);
  lm      the log-likelihood per token of the right choice alone (Lester et al.
          2021's text-to-text objective; the one for cloze items, whose only choice
          is the word).
Rows are laid out as the Scorer lays them out (likelihood.token_rows: BOS, the
prompt's virtual tokens, the context, the continuation), all at one width, so the
step compiles once.
"""

import dataclasses
import functools
import logging

import jax
import jax.numpy as jnp
import numpy as np
import optax

from bigsci_jax import likelihood, sharding
from bigsci_jax.model import SOFT_PROMPT, soft_prompt_ids

log = logging.getLogger(__name__)
OBJECTIVES = ("choice", "lm")


@dataclasses.dataclass(frozen=True)
class TuneConfig:
  num_virtual_tokens: int = 20
  steps: int = 300
  batch_size: int = 8             # items per step
  learning_rate: float = 3e-2     # Adam; the prompt's rows start as vocabulary embeddings
  warmup_steps: int = 20
  objective: str = "choice"
  seed: int = 0

  def __post_init__(self):
    if self.objective not in OBJECTIVES:
      raise ValueError(f"objective={self.objective!r} is not one of {', '.join(OBJECTIVES)}.")
    for name in ("num_virtual_tokens", "steps", "batch_size"):
      if getattr(self, name) < 1:
        raise ValueError(f"{name}={getattr(self, name)} must be at least 1.")


def encode_items(items, tokenizer):
  """[(context ids, [continuation ids per choice], answer)]."""
  encoded = []
  for item in items:
    pairs = [likelihood.encode_request(tokenizer, item.context, item.delimiter + choice)
             for choice in item.choices]
    encoded.append((pairs[0][0], [cont for _, cont in pairs], item.answer))
  return encoded


def _rows(encoded, ids, width, objective, prefix_lm, lead, choices):
  """token_rows features of items `ids`: every choice of each (padded to `choices` by
  repeating the last, masked out), or only the answer for the lm objective; and
  [B, choices] validity, [B] answers."""
  pairs, valid = [], np.zeros((len(ids), choices), bool)
  answers = np.zeros(len(ids), np.int32)
  for k, i in enumerate(ids):
    context, continuations, answer = encoded[i]
    answers[k] = answer
    if objective == "lm":
      pairs.append((context, continuations[answer]))
      continue
    valid[k, :len(continuations)] = True
    pairs += [(context, continuations[min(c, len(continuations) - 1)]) for c in range(choices)]
  return likelihood.token_rows(pairs, width, prefix_lm, lead), valid, answers


def _batches(count, size, seed):
  """Item indices, `size` at a time, in epochs each shuffled anew (an epoch's last
  partial batch is filled from the next)."""
  rng, pending = np.random.default_rng(seed), np.zeros(0, int)
  while True:
    while len(pending) < size:
      pending = np.concatenate([pending, rng.permutation(count)])
    yield pending[:size]
    pending = pending[size:]


def _loss(prompt_PxD, frozen, rows, valid_BxC, answer_B, *, model, objective):
  params = {**frozen, SOFT_PROMPT: prompt_PxD}
  sums_N, _ = likelihood.row_logliks(params, rows, model=model)
  if objective == "lm":
    return -jnp.sum(sums_N) / jnp.maximum(jnp.sum(rows["decoder_loss_weights"]), 1)
  tokens_N = jnp.maximum(jnp.sum(rows["decoder_loss_weights"], axis=-1), 1)
  scores_BxC = jnp.where(valid_BxC, (sums_N / tokens_N).reshape(valid_BxC.shape), -jnp.inf)
  logp_BxC = jax.nn.log_softmax(scores_BxC, axis=-1)
  return -jnp.mean(jnp.take_along_axis(logp_BxC, answer_B[:, None], axis=-1))


def _step(prompt_PxD, opt_state, frozen, valid_BxC, answer_B, rows, *, model, objective,
          optimizer):
  loss, grad_PxD = jax.value_and_grad(_loss)(prompt_PxD, frozen, rows, valid_BxC, answer_B,
                                             model=model, objective=objective)
  updates, opt_state = optimizer.update(grad_PxD, opt_state, prompt_PxD)
  return optax.apply_updates(prompt_PxD, updates), opt_state, loss


def tune(model, params, items, tokenizer, init_PxD, cfg: TuneConfig, seq_len, mesh=None,
         report=None):
  """The tuned [P, D] float32 prompt and the loss of every step. report(step, loss) is
  called every 10 steps and at the end."""
  if cfg.objective == "choice" and max(len(item.choices) for item in items) < 2:
    raise ValueError("the choice objective needs items with at least 2 choices; use "
                     "objective lm.")
  lead = soft_prompt_ids({SOFT_PROMPT: init_PxD})
  encoded = [e for e in encode_items(items, tokenizer)
             if max(len(c) for c in e[1]) < seq_len - len(lead)]
  if len(encoded) < len(items):
    log.warning("%d of %d items have a choice too long for the window with the prompt; tuning "
                "on the other %d", len(items) - len(encoded), len(items), len(encoded))
  if not encoded:
    raise ValueError(f"no item has choices that fit the window of {seq_len} tokens after "
                     f"{len(lead)} virtual tokens.")
  longest = max(len(c) + max(len(x) for x in conts) for c, conts, _ in encoded)
  width = likelihood.bucket_width(len(lead) + longest, seq_len)
  choices = max(len(item.choices) for item in items)
  schedule = optax.warmup_cosine_decay_schedule(0.0, cfg.learning_rate, min(cfg.warmup_steps,
                                                cfg.steps - 1), cfg.steps, cfg.learning_rate / 10)
  optimizer = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(schedule))
  step = jax.jit(functools.partial(_step, model=model, objective=cfg.objective,
                                   optimizer=optimizer), donate_argnums=(0, 1))
  frozen = {k: v for k, v in params.items() if k != SOFT_PROMPT}
  prompt_PxD = jnp.asarray(init_PxD, jnp.float32)
  opt_state = optimizer.init(prompt_PxD)
  batches, losses = _batches(len(encoded), cfg.batch_size, cfg.seed), []
  for i in range(cfg.steps):
    ids = next(batches)
    rows, valid, answers = _rows(encoded, ids, width, cfg.objective, model.cfg.mask == "prefix",
                                 lead, choices)
    prompt_PxD, opt_state, loss = sharding.call_with_rows(mesh, step, prompt_PxD, opt_state,
                                                          frozen, valid, answers, rows=rows)
    losses.append(float(loss))
    if not np.isfinite(losses[-1]):
      raise FloatingPointError(f"the prompt-tuning loss is {losses[-1]} at step {i + 1}; lower "
                               f"the learning rate (now {cfg.learning_rate}).")
    if report and ((i + 1) % 10 == 0 or i + 1 == cfg.steps):
      report(i + 1, float(np.mean(losses[-10:])))
  return np.asarray(jax.device_get(prompt_PxD)), losses
