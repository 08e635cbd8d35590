"""The train state, its sharded initialisation, and the pure train / eval steps.

`train_step(state, batch) -> (state, metrics)`: batch features are int32
[A, m, L] (A micro-batches of m sequences); gradients of the summed token loss
are accumulated over the A micro-batches and divided by the total loss weight,
so the update equals that of one [A*m, L] batch.
"""

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax import struct

from bigsci_jax import sharding
from bigsci_jax.config import ModelConfig
from bigsci_jax.kernels.mask import softmax_dtype
from bigsci_jax.model import Transformer


class TrainState(struct.PyTreeNode):
  step: jax.Array       # int32 scalar: updates applied so far
  params: Any
  opt_state: Any
  rng: jax.Array        # uint32 key data; dropout keys are folded from it per step


def _init_boxed(model: Transformer, tx, seed_rng, seq_len):
  """The train state with parameters still boxed in their logical axis names."""
  params_rng, state_rng = jax.random.split(seed_rng)
  tokens_1xL = jnp.zeros((1, seq_len), jnp.int32)
  params = model.init({"params": params_rng}, tokens_1xL)["params"]
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    opt_state=tx.init(params), rng=jax.random.key_data(state_rng))


def abstract_state(model, tx, mesh, seq_len):
  """(abstract state with shardings, shardings) without allocating anything."""
  boxed = jax.eval_shape(functools.partial(_init_boxed, model, tx, seq_len=seq_len),
                         jax.random.key(0))
  logical = nn.get_partition_spec(boxed)
  shapes = nn.meta.unbox(boxed)
  shardings = sharding.tree_shardings(logical, shapes, mesh)
  with_shardings = jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shapes, shardings)
  return with_shardings, shardings


def init_state(model, tx, mesh, seed, seq_len):
  """The train state, created directly in its shardings (no unsharded copy)."""
  _, shardings = abstract_state(model, tx, mesh, seq_len)
  init = jax.jit(lambda key: nn.meta.unbox(_init_boxed(model, tx, key, seq_len)),
                 out_shardings=shardings)
  # Not under sharding.activate: the logical rules would constrain flax's
  # intermediate (flattened) kernels; out_shardings place the result.
  return init(jax.random.key(seed))


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
  logits_BxLxV = model.apply({"params": params}, **model_inputs(model.cfg, batch),
                             deterministic=deterministic,
                             rngs=None if deterministic else {"dropout": dropout_rng})
  ce_BxL, z_BxL = token_losses(logits_BxLxV, batch["decoder_target_tokens"], model.cfg.z_loss)
  w_BxL = batch["decoder_loss_weights"].astype(jnp.float32)
  return jnp.sum((ce_BxL + z_BxL) * w_BxL), (jnp.sum(w_BxL), jnp.sum(ce_BxL * w_BxL))


def accumulate_gradients(params, batch_AxMxL, model, rng=None):
  """Sums of gradients and losses over the A micro-batches (scanned)."""
  grad_fn = jax.grad(loss_sums, has_aux=True)

  def micro(carry, inputs):
    grads, weight, ce = carry
    index, micro_batch = inputs
    key = None if rng is None else jax.random.fold_in(rng, index)
    g, (w, c) = grad_fn(params, micro_batch, model, key)
    return (jax.tree.map(jnp.add, grads, g), weight + w, ce + c), None

  zeros = jax.tree.map(jnp.zeros_like, params)
  num_micro = jax.tree.leaves(batch_AxMxL)[0].shape[0]
  (grads, weight, ce), _ = jax.lax.scan(
      micro, (zeros, jnp.zeros(()), jnp.zeros(())), (jnp.arange(num_micro), batch_AxMxL))
  return grads, weight, ce


def train_step(state: TrainState, batch_AxMxL, *, model, tx, schedule):
  """One optimizer update from A accumulated micro-batches. Pure."""
  rng = None
  if model.cfg.dropout > 0:
    rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
  grad_sums, weight, ce_sum = accumulate_gradients(state.params, batch_AxMxL, model, rng)
  denom = jnp.maximum(weight, 1.0)
  grads = jax.tree.map(lambda g: g / denom, grad_sums)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  metrics = {"loss": ce_sum / denom, "grad_norm": optax.tree.norm(grads),
             "learning_rate": schedule(state.step), "loss_weight": weight}
  return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics


def eval_sums(params, batch_BxL, *, model):
  """(sum of weighted ce, sum of weights) for one evaluation batch."""
  _, (weight, ce) = loss_sums(params, batch_BxL, model)
  return ce, weight


def make_train_step(model, tx, schedule, mesh, state_shardings):
  """train_step jitted with explicit shardings, the state donated.

  Returns a callable that traces under the mesh and logical rules; each distinct
  accumulation count A compiles once.
  """
  batch_in = sharding.batch_sharding(mesh, 3, batch_axis=1)
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  jitted = jax.jit(functools.partial(train_step, model=model, tx=tx, schedule=schedule),
                   in_shardings=(state_shardings, batch_in),
                   out_shardings=(state_shardings, replicated), donate_argnums=(0,))

  def step(state, batch_AxMxL):
    with sharding.activate(mesh):
      return jitted(state, batch_AxMxL)
  step.jitted = jitted
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
