"""The train state, its sharded initialisation, and the pure train / eval steps.

`train_step(state, batch) -> (state, metrics)`: batch features are int32
[A, m, L] (A micro-batches of m sequences); gradients of the summed token loss
are accumulated over the A micro-batches and divided by the total loss weight,
so the update equals that of one [A*m, L] batch. With TrainConfig.gns_every = k,
every k-th step of A >= 2 micro-batches also updates the gradient noise scale from
its micro-batch gradient norms (scaling/noise.py). A guarded step (non-finite or
spiking loss / gradient norm, TrainConfig) keeps parameters and optimizer state
and says why in `metrics["skip_reason"]` (an index into SKIP_REASONS). With
TrainConfig.watch_every = k, `metrics["layers"]` holds each layer's weight, gradient and
update norms (scaling/layer_norms.py) where the loop asks for them (every k-th step, a
second compiled variant of the step), and every skipped step's gradient norms by layer.
"""

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax import struct

from bigsci_jax import sharding
from bigsci_jax.config import ModelConfig, TrainConfig
from bigsci_jax.kernels.mask import softmax_dtype
from bigsci_jax.model import Transformer, over_logits
from bigsci_jax.optim import set_schedule_count
from bigsci_jax.scaling.layer_norms import gradient_norms, layer_norms
from bigsci_jax.scaling.noise import NoiseScale, estimates


SKIP_REASONS = ("", "non-finite loss or gradient norm", "loss spike", "gradient-norm spike")


class Guard(struct.PyTreeNode):
  """The update guard's memory: the last W accepted losses and gradient norms."""
  losses_W: jax.Array      # f32 ring buffer, slot = accepted % W
  grad_norms_W: jax.Array
  accepted: jax.Array      # int32: updates applied so far
  in_a_row: jax.Array      # int32: skipped updates since the last applied one

  @classmethod
  def empty(cls, window):
    zeros = jnp.zeros((window,), jnp.float32)
    return cls(losses_W=zeros, grad_norms_W=zeros, accepted=jnp.zeros((), jnp.int32),
               in_a_row=jnp.zeros((), jnp.int32))


class TrainState(struct.PyTreeNode):
  step: jax.Array       # int32 scalar: steps taken (batches consumed), skipped ones included
  params: Any
  opt_state: Any
  rng: jax.Array        # uint32 key data; dropout keys are folded from it per step
  guard: Guard
  noise: NoiseScale     # gradient noise scale averages (zeros unless TrainConfig.gns_every)
  batch_rows: jax.Array  # int32: sequences in the last step's batch (the batch schedule's state)
  rows_seen: jax.Array   # int32: sequences trained on so far; the LR schedule's clock


def _init_boxed(model: Transformer, tx, seed_rng, seq_len, window):
  """The train state with parameters still boxed in their logical axis names."""
  params_rng, state_rng = jax.random.split(seed_rng)
  tokens_1xL = jnp.zeros((1, seq_len), jnp.int32)
  params = model.init({"params": params_rng}, tokens_1xL)["params"]
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    opt_state=tx.init(params), rng=jax.random.key_data(state_rng),
                    guard=Guard.empty(window), noise=NoiseScale.empty(),
                    batch_rows=jnp.zeros((), jnp.int32), rows_seen=jnp.zeros((), jnp.int32))


def abstract_state(model, tx, mesh, seq_len, window=TrainConfig.spike_window):
  """(abstract state with shardings, shardings) without allocating anything."""
  boxed = jax.eval_shape(functools.partial(_init_boxed, model, tx, seq_len=seq_len,
                                           window=window), jax.random.key(0))
  logical = nn.get_partition_spec(boxed)
  shapes = nn.meta.unbox(boxed)
  shardings = sharding.tree_shardings(logical, shapes, mesh)
  with_shardings = jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shapes, shardings)
  return with_shardings, shardings


def init_state(model, tx, mesh, seed, seq_len, window=TrainConfig.spike_window, params=None):
  """The train state, created directly in its shardings (no unsharded copy). With
  `params` (placed in their shardings; donated), the state holds those parameters and
  a fresh optimizer state: the random initialisation is never computed (dead code)."""
  _, shardings = abstract_state(model, tx, mesh, seq_len, window)

  def init(key, given):
    state = nn.meta.unbox(_init_boxed(model, tx, key, seq_len, window))
    if given is None:
      return state
    return state.replace(params=given, opt_state=tx.init(given))

  # Not under sharding.activate: the logical rules would constrain flax's
  # intermediate (flattened) kernels; out_shardings place the result.
  return jax.jit(init, out_shardings=shardings, donate_argnums=1)(jax.random.key(seed), params)


def model_inputs(model_cfg: ModelConfig, batch):
  """Batch features -> the model's keyword arguments."""
  return dict(tokens_BxL=batch["decoder_input_tokens"],
              positions_BxL=batch["decoder_positions"],
              segment_ids_BxL=batch["decoder_segment_ids"],
              prefix_BxL=batch["decoder_causal_attention"] if model_cfg.mask == "prefix" else None)


def token_losses(logits_BxLxV, targets_BxL, z_loss):
  """Per-token cross-entropy and z-loss (PaLM: z_loss * logsumexp^2), in f32 (f64 for
  float64 logits)."""
  logits_BxLxV = logits_BxLxV.astype(softmax_dtype(logits_BxLxV.dtype))
  lse_BxL = jax.nn.logsumexp(logits_BxLxV, axis=-1)
  target_logit_BxL = jnp.take_along_axis(logits_BxLxV, targets_BxL[..., None], axis=-1)[..., 0]
  return lse_BxL - target_logit_BxL, z_loss * jnp.square(lse_BxL)


def loss_sums(params, batch, model, dropout_rng=None):
  """(sum of weighted (ce + z) losses, (sum of weights, sum of weighted ce))."""
  deterministic = dropout_rng is None
  x_BxLxD = model.apply({"params": params}, **model_inputs(model.cfg, batch),
                        deterministic=deterministic, hidden=True,
                        rngs=None if deterministic else {"dropout": dropout_rng})
  ce_BxL, z_BxL = over_logits(model.cfg, params, x_BxLxD,
                              functools.partial(token_losses, z_loss=model.cfg.z_loss),
                              batch["decoder_target_tokens"])
  w_BxL = batch["decoder_loss_weights"].astype(jnp.float32)
  return jnp.sum((ce_BxL + z_BxL) * w_BxL), (jnp.sum(w_BxL), jnp.sum(ce_BxL * w_BxL))


def accumulate_gradients(params, batch_AxMxL, model, rng=None, micro_norms=False):
  """Sums of gradients and losses over the A micro-batches (scanned); with micro_norms
  (False, True or a traced bool), also each micro-batch's squared mean-gradient norm
  (0 where micro_norms is false) and loss weight, [A] each (else None)."""
  grad_fn = jax.grad(loss_sums, has_aux=True)

  def micro(carry, inputs):
    grads, weight, ce = carry
    index, micro_batch = inputs
    key = None if rng is None else jax.random.fold_in(rng, index)
    g, (w, c) = grad_fn(params, micro_batch, model, key)
    norms = None
    if micro_norms is not False:  # a conditional: steps that do not sample skip the pass
      sq = jax.lax.cond(micro_norms, lambda: jnp.square(optax.tree.norm(g)), lambda: 0.0)
      norms = (sq / jnp.square(jnp.maximum(w, 1.0)), w)
    return (jax.tree.map(jnp.add, grads, g), weight + w, ce + c), norms

  zeros = jax.tree.map(jnp.zeros_like, params)
  num_micro = jax.tree.leaves(batch_AxMxL)[0].shape[0]
  (grads, weight, ce), norms = jax.lax.scan(
      micro, (zeros, jnp.zeros(()), jnp.zeros(())), (jnp.arange(num_micro), batch_AxMxL))
  return grads, weight, ce, norms


def skip_reason(guard: Guard, loss, grad_norm, train: TrainConfig):
  """int32 index into SKIP_REASONS: 0 = apply the update. Spikes are judged once the
  window holds W accepted steps."""
  full = guard.accepted >= guard.losses_W.shape[0]
  reason = jnp.where(jnp.isfinite(loss) & jnp.isfinite(grad_norm), 0, 1)
  for code, factor, value, window in ((2, train.loss_spike_factor, loss, guard.losses_W),
                                      (3, train.grad_spike_factor, grad_norm, guard.grad_norms_W)):
    if factor:
      spike = full & (value > factor * jnp.median(window))
      reason = jnp.where((reason == 0) & spike, code, reason)
  return reason.astype(jnp.int32)


def guarded_update(state: TrainState, grads, loss, grad_norm, train: TrainConfig, tx):
  """(state after the update or, when skip_reason says so, with parameters and optimizer
  state unchanged; the reason; the optimizer's update, applied unless skipped). The
  choice is an elementwise select that fuses into the update, so it costs no extra copy
  of the state."""
  reason = skip_reason(state.guard, loss, grad_norm, train)
  skip = reason > 0
  opt_state_in = set_schedule_count(state.opt_state, state.rows_seen)  # the LR follows rows
  updates, opt_state = tx.update(grads, opt_state_in, state.params)
  params = optax.apply_updates(state.params, updates)
  keep = lambda old, new: jnp.where(skip, old, new)  # noqa: E731
  g = state.guard
  slot = g.accepted % g.losses_W.shape[0]
  f32 = g.losses_W.dtype  # float64 runs (exactness tests) keep an f32 window
  guard = Guard(losses_W=keep(g.losses_W, g.losses_W.at[slot].set(loss.astype(f32))),
                grad_norms_W=keep(g.grad_norms_W, g.grad_norms_W.at[slot].set(grad_norm.astype(f32))),
                accepted=g.accepted + (~skip).astype(jnp.int32),
                in_a_row=jnp.where(skip, g.in_a_row + 1, 0))
  return state.replace(step=state.step + 1,
                       params=jax.tree.map(keep, state.params, params),
                       opt_state=jax.tree.map(keep, state.opt_state, opt_state),
                       guard=guard), reason, updates


def train_step(state: TrainState, batch_AxMxL, *, model, tx, schedule, train=TrainConfig(),
               watch=False):
  """One guarded optimizer update from A accumulated micro-batches. Pure. With `watch`
  (static), also every group's weight, gradient and update norms (metrics["layers"])."""
  rng = None
  if model.cfg.dropout > 0:
    rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
  num_micro, micro_rows = batch_AxMxL["decoder_target_tokens"].shape[:2]
  can_sample = bool(train.gns_every) and num_micro >= 2  # static: A is a shape
  sample_now = (state.step % max(train.gns_every, 1) == 0) if can_sample else False
  grad_sums, weight, ce_sum, micro = accumulate_gradients(state.params, batch_AxMxL, model, rng,
                                                          micro_norms=sample_now)
  denom = jnp.maximum(weight, 1.0)
  grads = jax.tree.map(lambda g: g / denom, grad_sums)
  loss, grad_norm = ce_sum / denom, optax.tree.norm(grads)
  new_state, reason, updates = guarded_update(state, grads, loss, grad_norm, train, tx)
  noise = state.noise
  if can_sample:
    g2, trace = estimates(*micro, jnp.square(grad_norm), weight)
    sampled = noise.update(g2, trace, weight / (num_micro * micro_rows), train.gns_ema)
    keep = (reason > 0) | ~sample_now
    noise = jax.tree.map(lambda old, new: jnp.where(keep, old, new), noise, sampled)
  rows = num_micro * micro_rows
  new_state = new_state.replace(noise=noise, batch_rows=jnp.asarray(rows, jnp.int32),
                                rows_seen=state.rows_seen + rows)
  metrics = {"loss": loss, "grad_norm": grad_norm,
             "learning_rate": schedule(state.rows_seen), "loss_weight": weight,
             "skip_reason": reason, "skips_in_a_row": new_state.guard.in_a_row}
  if train.gns_every:
    metrics.update(noise.metrics())
  if watch:
    norms = layer_norms(new_state.params, grads, updates)
    metrics["layers"] = {k: jnp.where(reason > 0, 0.0, v) if k.startswith("update_norm/") else v
                         for k, v in norms.items()}  # a skipped step moved nothing
  elif train.watch_every:  # any skipped step's gradient by group: which layer spiked. The
    # cond takes the accumulated sums (materialised by the scan anyway); on the weights,
    # the update or the divided gradient it cost copies, or the update's fusion.
    def skipped():
      return jax.tree.map(lambda n: n / denom, gradient_norms(grad_sums))
    shapes = jax.eval_shape(skipped)
    metrics["layers"] = jax.lax.cond(
        reason > 0, skipped, lambda: jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes))
  return new_state, metrics


def eval_sums(params, batch_BxL, *, model):
  """(sum of weighted ce, sum of weights) for one evaluation batch."""
  _, (weight, ce) = loss_sums(params, batch_BxL, model)
  return ce, weight


def make_train_step(model, tx, schedule, mesh, state_shardings, train=TrainConfig()):
  """train_step jitted with explicit shardings, the state donated.

  Returns a callable step(state, batch, watch=False) that traces under the mesh and
  logical rules; each distinct accumulation count A compiles once, and once more the
  first time a step asks for the per-layer norms (watch=True: `train_step.watched`).
  """
  batch_in = sharding.batch_sharding(mesh, 3, batch_axis=1)
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  jitted, watched = (
      jax.jit(functools.partial(train_step, model=model, tx=tx, schedule=schedule, train=train,
                                watch=watch),
              in_shardings=(state_shardings, batch_in),
              out_shardings=(state_shardings, replicated), donate_argnums=(0,))
      for watch in (False, True))

  def step(state, batch_AxMxL, watch=False):
    with sharding.activate(mesh):
      return (watched if watch else jitted)(state, batch_AxMxL)
  step.jitted, step.watched = jitted, watched
  return step


def make_eval_step(model, mesh, params_shardings):
  batch_in = sharding.batch_sharding(mesh, 2)
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  jitted = jax.jit(functools.partial(eval_sums, model=model),
                   in_shardings=(params_shardings, batch_in), out_shardings=replicated)

  def step(params, batch_BxL):
    with sharding.activate(mesh):
      return jitted(params, batch_BxL)
  return step
