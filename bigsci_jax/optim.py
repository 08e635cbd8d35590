"""optax AdamW with a weight-decay mask, global-norm clipping and the LR schedule."""

import jax
import jax.numpy as jnp
import optax

from bigsci_jax.config import OptimizerConfig


def learning_rate_schedule(cfg: OptimizerConfig, train_steps: int):
  """step -> learning rate: linear warmup to the peak, then decay to a final fraction.

  cosine / linear reach `final_lr_fraction * peak` at `decay_steps` (default: the
  run's length) and stay there; inverse_sqrt decays as sqrt(warmup / step) and is
  floored at the same fraction; constant stays at the peak; wsd stays at the peak up
  to cooldown_start() and reaches the final fraction at decay_steps. With rewarm_steps = W
  (a run continued after growth from step R = rewarm_start), steps R <= t < R + W
  get (t - R) / W * f(R + W) instead of f(t).
  """
  peak, warmup = cfg.learning_rate, cfg.warmup_steps
  total = cfg.decay_steps or train_steps
  floor = cfg.final_lr_fraction * peak

  def schedule(step):
    step = jnp.asarray(step, jnp.float32)
    warm = peak * jnp.minimum(1.0, (step + 1.0) / max(warmup, 1))
    frac = jnp.clip((step - warmup) / max(total - warmup, 1), 0.0, 1.0)
    if cfg.decay == "cosine":
      decayed = floor + (peak - floor) * 0.5 * (1.0 + jnp.cos(jnp.pi * frac))
    elif cfg.decay == "linear":
      decayed = peak + (floor - peak) * frac
    elif cfg.decay == "wsd":
      cool = cooldown_start(cfg, train_steps)
      x = jnp.clip((step - cool) / max(total - cool, 1), 0.0, 1.0)
      decayed = peak + (floor - peak) * (x if cfg.cooldown_shape == "linear" else jnp.sqrt(x))
    elif cfg.decay == "inverse_sqrt":
      decayed = jnp.maximum(floor, peak * jnp.sqrt(max(warmup, 1) / jnp.maximum(step, 1.0)))
    else:
      decayed = jnp.asarray(peak, jnp.float32)
    return jnp.where(step < warmup, warm, decayed)

  if not cfg.rewarm_steps:
    return schedule
  start, length = cfg.rewarm_start, cfg.rewarm_steps

  def rewarmed(step):
    step = jnp.asarray(step, jnp.float32)
    ramp = (step - start) / length * schedule(start + length)
    return jnp.where((step >= start) & (step < start + length), ramp, schedule(step))

  return rewarmed


def cooldown_start(cfg: OptimizerConfig, train_steps: int):
  """The last step at the peak of a 'wsd' schedule: the cooldown is the last
  cooldown_fraction of decay_steps (at least one step). A run of the same config with
  more steps reaches it at the same learning rates, so a longer run's checkpoint there
  continues into this run's cooldown exactly (scaling/sweep.py branches them)."""
  total = cfg.decay_steps or train_steps
  return total - max(1, round(cfg.cooldown_fraction * total))


def decay_mask(params, no_decay):
  """True for parameters that get weight decay: all but those whose name is listed."""
  def decays(path, _):
    # The last dict key names the parameter (boxed trees add attribute keys after it).
    name = next(k.key for k in reversed(path) if isinstance(k, jax.tree_util.DictKey))
    return name not in no_decay
  return jax.tree_util.tree_map_with_path(decays, params)


def set_schedule_count(opt_state, count):
  """opt_state with every optax schedule count set to `count`."""
  def one(s):
    if isinstance(s, optax.ScaleByScheduleState):
      return s._replace(count=jnp.asarray(count, s.count.dtype))
    return s
  return jax.tree.map(one, opt_state, is_leaf=lambda s: isinstance(s, optax.ScaleByScheduleState))


def make_optimizer(cfg: OptimizerConfig, train_steps: int, rows_per_step: int = 1):
  """Returns (optax transformation, rows -> learning rate).

  The learning rate follows the sequences (rows) trained on, not the updates: the
  train step sets the transformation's schedule count to the rows seen, and the rate
  is the step schedule at rows / rows_per_step full batches (rows_per_step = the
  run's batch_size). A batch that ramps up or follows the noise scale therefore
  moves warmup and decay by the tokens it really trains on, and a skipped update
  does not hold the schedule back (its batch was consumed).
  """
  by_steps = learning_rate_schedule(cfg, train_steps)

  def schedule(rows):
    rows = jnp.asarray(rows, jnp.int32)
    # whole steps and the fraction apart: exact in float32 up to 2^24 steps
    return by_steps((rows // rows_per_step).astype(jnp.float32)
                    + (rows % rows_per_step).astype(jnp.float32) / rows_per_step)

  if cfg.optimizer == "sgd":
    update = optax.sgd(schedule)
  else:
    update = optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                         weight_decay=cfg.weight_decay,
                         mask=lambda p: decay_mask(p, cfg.no_decay))
  clip = optax.clip_by_global_norm(cfg.clip_norm) if cfg.clip_norm else optax.identity()
  return optax.chain(clip, update), schedule
