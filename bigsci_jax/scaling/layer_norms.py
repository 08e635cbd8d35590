"""Per-layer norms of a train step's weights, gradient and update (TrainConfig.watch_every).

One global gradient norm says that a step spiked, not where. These say which layer
and which part of it (attention, MLP, their norms, the embeddings, the head), and how
large each part's update is next to its weights (update_norm / param_norm, the
per-layer effective learning rate): what to look at when a large run's loss spikes
(the 104B BigScience attempts, PaLM's spikes) or when an architecture choice such as
the embedding norm is said to stabilise training.

A group is one module of one layer, `layer_03/attention` (its query, key, value and
out projections, weights and biases), `layer_03/mlp`, `layer_03/attention_norm`, ...,
or a parameter outside the layer stack by its top-level name (`embed`, `pos_embed`,
`final_norm`, `head`). Scanned layers (nn.scan's stack, its layers along axis 0) and
unscanned ones (`layer_<i>`) give the same names, layer numbers zero-padded so that
TensorBoard sorts them. The squares of a quantity's group norms sum to the square of
its global norm.
"""

import re

import jax
import jax.numpy as jnp

QUANTITIES = ("param_norm", "grad_norm", "update_norm")


def group_squares(tree):
  """{group name: sum of the squares of its entries} for a parameter pytree (or any
  pytree of its structure: gradients, updates)."""
  sums = {}

  def add(key, value):
    sums[key] = sums[key] + value if key in sums else value

  for path, x in jax.tree_util.tree_leaves_with_path(tree):
    keys = [str(getattr(k, "key", k)) for k in path]
    square = jnp.square(x.astype(jnp.promote_types(x.dtype, jnp.float32)))
    if keys[0] == "layers" and len(keys) > 2:  # ['layers', 'block', module, ...]
      per_layer = jnp.sum(square, axis=tuple(range(1, x.ndim)))
      for i in range(x.shape[0]):
        add((i, keys[2]), per_layer[i])
    elif re.fullmatch(r"layer_\d+", keys[0]) and len(keys) > 1:  # ['layer_3', module, ...]
      add((int(keys[0][len("layer_"):]), keys[1]), jnp.sum(square))
    else:
      add(keys[0], jnp.sum(square))
  last = max((k[0] for k in sums if isinstance(k, tuple)), default=0)
  width = max(2, len(str(last)))
  return {(f"layer_{k[0]:0{width}d}/{k[1]}" if isinstance(k, tuple) else k): v
          for k, v in sums.items()}


def _norms(quantity, tree):
  return {f"{quantity}/{group}": jnp.sqrt(s) for group, s in group_squares(tree).items()}


def layer_norms(params, grads, updates):
  """{'<quantity>/<group>': norm} for the weights, gradient and update of one step
  (QUANTITIES, in that order)."""
  return {key: norm for quantity, tree in zip(QUANTITIES, (params, grads, updates))
          for key, norm in _norms(quantity, tree).items()}


def gradient_norms(grads):
  """{'grad_norm/<group>': norm}: layer_norms' gradient part."""
  return _norms("grad_norm", grads)
