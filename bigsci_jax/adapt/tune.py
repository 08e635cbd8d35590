"""Adapter tuning: train a soft prompt or LoRA factors on a frozen model from
multiple-choice items.

The only trainable arrays are the adapter's (the prompt [P, D], or the LoRA factors);
the base parameters are an argument of the jitted step, never differentiated, never
in the optimizer state, never written. Objectives over mc_tasks.Item (context, choices, answer, delimiter):
  choice  cross-entropy over an item's choices, each scored by its mean
          log-likelihood per token (the harness ranks choices by summed
          log-likelihood, but sentence-long choices differ by tens of nats and
          that drowns the gradient);
  lm      the log-likelihood per token of the right choice alone (Lester et al.
          2021's text-to-text objective; the one for cloze items, whose only choice
          is the word).
Rows are laid out as the Scorer lays them out (likelihood.token_rows: BOS, a soft
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

from bigsci_jax import generate, likelihood, sharding
from bigsci_jax.adapt import lora, soft_prompt
from bigsci_jax.model import SOFT_PROMPT, soft_prompt_ids

log = logging.getLogger(__name__)
OBJECTIVES = ("choice", "lm")
ADAPTERS = ("prompt", "lora")
# Adam's rate when none is given: a prompt's rows start as vocabulary embeddings and
# move far; LoRA's B starts at zero (Hu et al. tuned GPT-2 LoRA at 2e-4, bigger rates
# for small models).
LEARNING_RATES = {"prompt": 3e-2, "lora": 3e-3}


@dataclasses.dataclass(frozen=True)
class TuneConfig:
  adapter: str = "prompt"         # prompt | lora
  num_virtual_tokens: int = 20    # prompt
  lora_rank: int = 8
  lora_alpha: float = 16.0        # LoRA's update is scaled by alpha / rank
  lora_targets: tuple = lora.TARGETS
  steps: int = 300
  batch_size: int = 8             # items per step
  learning_rate: float = 0.0      # Adam; 0 = LEARNING_RATES[adapter]
  warmup_steps: int = 20
  objective: str = "choice"
  seed: int = 0

  def __post_init__(self):
    if self.adapter not in ADAPTERS:
      raise ValueError(f"adapter={self.adapter!r} is not one of {', '.join(ADAPTERS)}.")
    if self.objective not in OBJECTIVES:
      raise ValueError(f"objective={self.objective!r} is not one of {', '.join(OBJECTIVES)}.")
    for name in ("num_virtual_tokens", "steps", "batch_size"):
      if getattr(self, name) < 1:
        raise ValueError(f"{name}={getattr(self, name)} must be at least 1.")
    if self.adapter == "lora":
      lora.check(self.lora_rank, self.lora_targets)
    if not self.learning_rate:
      object.__setattr__(self, "learning_rate", LEARNING_RATES[self.adapter])

  @property
  def kind(self):
    """The adapter directory's kind (adapt.store)."""
    return "soft_prompt" if self.adapter == "prompt" else "lora"

  def initial(self, params):
    """The untrained adapter's arrays for params: vocabulary rows for a prompt, factors
    with B = 0 for LoRA."""
    if self.adapter == "prompt":
      return soft_prompt.init_from_vocab(params, self.num_virtual_tokens, self.seed)
    return lora.init(params, self.lora_rank, self.lora_targets, self.seed)

  def apply(self, params, arrays):
    """params with the adapter's arrays applied (traceable: the tuning step's)."""
    if self.adapter == "prompt":
      return soft_prompt.attach(params, arrays)
    return lora.merge(params, arrays, self.lora_alpha / self.lora_rank)

  def info(self):
    """What prompt.json records about the adapter itself."""
    if self.adapter == "prompt":
      return {}
    return {"rank": self.lora_rank, "alpha": self.lora_alpha, "targets": list(self.lora_targets)}


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


def _loss(adapter, frozen, rows, valid_BxC, answer_B, *, model, objective, apply):
  params = apply(frozen, adapter)
  sums_N, _ = likelihood.row_logliks(params, rows, model=model)
  if objective == "lm":
    return -jnp.sum(sums_N) / jnp.maximum(jnp.sum(rows["decoder_loss_weights"]), 1)
  tokens_N = jnp.maximum(jnp.sum(rows["decoder_loss_weights"], axis=-1), 1)
  scores_BxC = jnp.where(valid_BxC, (sums_N / tokens_N).reshape(valid_BxC.shape), -jnp.inf)
  logp_BxC = jax.nn.log_softmax(scores_BxC, axis=-1)
  return -jnp.mean(jnp.take_along_axis(logp_BxC, answer_B[:, None], axis=-1))


def _step(adapter, opt_state, frozen, valid_BxC, answer_B, rows, *, model, objective, apply,
          optimizer):
  loss, grads = jax.value_and_grad(_loss)(adapter, frozen, rows, valid_BxC, answer_B,
                                          model=model, objective=objective, apply=apply)
  updates, opt_state = optimizer.update(grads, opt_state, adapter)
  return optax.apply_updates(adapter, updates), opt_state, loss


def tune(model, params, items, tokenizer, initial, cfg: TuneConfig, seq_len, mesh=None,
         report=None):
  """The tuned adapter's float32 arrays (numpy; initial's structure: cfg.initial) and
  the loss of every step. report(step, loss) is called every 10 steps and at the end."""
  if cfg.objective == "choice" and max(len(item.choices) for item in items) < 2:
    raise ValueError("the choice objective needs items with at least 2 choices; use "
                     "objective lm.")
  frozen = {k: v for k, v in params.items() if k != SOFT_PROMPT}
  lead = soft_prompt_ids(jax.eval_shape(cfg.apply, frozen, initial))
  encoded = [e for e in encode_items(items, tokenizer)
             if max(len(c) for c in e[1]) < seq_len - len(lead)]
  if len(encoded) < len(items):
    log.warning("%d of %d items have a choice too long for the window with the prompt; tuning "
                "on the other %d", len(items) - len(encoded), len(items), len(encoded))
  if not encoded:
    raise ValueError(f"no item has choices that fit the window of {seq_len} tokens after "
                     f"{len(lead)} virtual tokens.")
  longest = max(len(c) + max(len(x) for x in conts) for c, conts, _ in encoded)
  width = generate.bucket_width(len(lead) + longest, seq_len)
  choices = max(len(item.choices) for item in items)
  rows = cfg.batch_size * (choices if cfg.objective == "choice" else 1)
  if mesh is not None and rows % sharding.batch_shards(mesh):
    raise ValueError(f"a tuning step's {rows} rows ({cfg.batch_size} items"
                     f"{f' x {choices} choices' if cfg.objective == 'choice' else ''}) do not "
                     f"split over the mesh's {sharding.batch_shards(mesh)} data x fsdp shards; "
                     f"make --batch_size a multiple of them.")
  schedule = optax.warmup_cosine_decay_schedule(0.0, cfg.learning_rate, min(cfg.warmup_steps,
                                                cfg.steps - 1), cfg.steps, cfg.learning_rate / 10)
  optimizer = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(schedule))
  step = jax.jit(functools.partial(_step, model=model, objective=cfg.objective,
                                   apply=cfg.apply, optimizer=optimizer), donate_argnums=(0, 1))
  adapter = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), initial)
  opt_state = optimizer.init(adapter)
  batches, losses = _batches(len(encoded), cfg.batch_size, cfg.seed), []
  for i in range(cfg.steps):
    ids = next(batches)
    rows, valid, answers = _rows(encoded, ids, width, cfg.objective, model.cfg.mask == "prefix",
                                 lead, choices)
    adapter, opt_state, loss = sharding.call_with_rows(mesh, step, adapter, opt_state, frozen,
                                                       valid, answers, rows=rows)
    losses.append(float(loss))
    if not np.isfinite(losses[-1]):
      raise FloatingPointError(f"the {cfg.adapter}-tuning loss is {losses[-1]} at step {i + 1}; lower "
                               f"the learning rate (now {cfg.learning_rate}).")
    if report and ((i + 1) % 10 == 0 or i + 1 == cfg.steps):
      report(i + 1, float(np.mean(losses[-10:])))
  return jax.tree.map(np.asarray, jax.device_get(adapter)), losses
