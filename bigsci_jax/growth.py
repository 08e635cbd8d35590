"""Growth operators on the whole training state (Shen et al. 2022, "Staged Training
for Transformer Language Models", arXiv 2203.06211): a trained small model becomes
a larger one with the same loss, and training goes on with the same dynamics.

Width x2 (d_model, d_ff, heads and kv heads doubled; head dim unchanged): every
parameter is placed twice, block-diagonally over its widened axes (logical names
`embed`, `heads`, `kv_heads`, `mlp`): an embedding E becomes [E, E], a kernel W
becomes [[W, 0], [0, W]], a bias or norm parameter b becomes [b, b]; head h of the
copy is head h + H. The final norm is halved, so [z/2, z/2] . [E, E]^T = z . E^T.
Adam's first moments become G(m) / 2 and second moments G(v) / 4 (the final norm's
copied unscaled), so each copy takes exactly the small model's step.

Depth x2: new layers, copies of their neighbours with every norm parameter and
bias zeroed, are exact identities (pre-norm: the attention and MLP see 0 and add
0); inserted after each old layer (`interleave`) or after the last (`append`).
Old layers keep their parameters and moments; new layers start with zero moments.

Pure pytree maps; `python -m bigsci_jax.growth` (bigsci_jax/growth_command.py)
applies them to a run's checkpoint.
"""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from bigsci_jax.config import ModelConfig
from bigsci_jax.model import Transformer
from bigsci_jax.optim import set_schedule_count

WIDE_AXES = ("embed", "heads", "kv_heads", "mlp")
OPS = ("width", "depth")


def grown_config(cfg: ModelConfig, op, depth_mode="interleave"):
  """The target model of `op` applied to cfg."""
  if op == "width":
    return dataclasses.replace(
        cfg, d_model=2 * cfg.d_model, d_ff=2 * cfg.d_ff, num_heads=2 * cfg.num_heads,
        num_kv_heads=2 * cfg.num_kv_heads, head_dim=cfg.head_dim,
        sinusoid_tiles=2 * cfg.sinusoid_tiles,
        # The copied heads keep their slopes: never recomputed for the new head count.
        alibi_slopes=cfg.alibi_slopes + cfg.alibi_slopes if cfg.alibi_slopes else None)
  if op == "depth":
    return dataclasses.replace(cfg, num_layers=2 * cfg.num_layers)
  raise ValueError(f"unknown growth operator {op!r}; choose one of {', '.join(OPS)}.")


def logical_axes(cfg: ModelConfig):
  """The parameter tree with each leaf replaced by its tuple of logical axis names."""
  model = Transformer(cfg)
  boxed = jax.eval_shape(
      lambda key: model.init({"params": key}, jnp.zeros((1, 8), jnp.int32))["params"],
      jax.random.key(0))
  specs = nn.get_partition_spec(boxed)
  return jax.tree.map(tuple, specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))


def _is_axes(x):
  return isinstance(x, tuple) and all(isinstance(a, (str, type(None))) for a in x)


def _path_names(path):
  return [k.key for k in path if isinstance(k, jax.tree_util.DictKey)]


# ---- width ------------------------------------------------------------------------------


def _duplicate(x_small, axes):
  """x placed at copy c of every widened axis, for c = 0, 1 (block diagonal)."""
  wide = [i for i, a in enumerate(axes) if a in WIDE_AXES]
  if not wide:
    return x_small
  shape = tuple(2 * n if i in wide else n for i, n in enumerate(x_small.shape))
  out = jnp.zeros(shape, x_small.dtype)
  for c in (0, 1):
    index = tuple(slice(c * n, (c + 1) * n) if i in wide else slice(None)
                  for i, n in enumerate(x_small.shape))
    out = out.at[index].set(x_small)
  return out


def off_diagonal(shape, axes):
  """bool mask of the grown tensor's blocks whose copy indices differ (zero after growth)."""
  wide = [i for i, a in enumerate(axes) if a in WIDE_AXES]
  mask = np.zeros(shape, bool)
  if len(wide) < 2:
    return mask
  copy = [(np.arange(shape[i]) >= shape[i] // 2).reshape(
      [-1 if j == i else 1 for j in range(len(shape))]) for i in wide]
  for c in copy[1:]:
    mask = mask | (c != copy[0])
  return mask


def _is_final_norm(path):
  return "final_norm" in _path_names(path)


def widen_params(params, axes, *, noise_std=0.0, key=None):
  """Width x2 of a parameter tree. noise_std > 0 breaks the symmetry of the two copies:
  N(0, noise_std^2) on the off-diagonal blocks (the loss moves by O(noise_std))."""
  leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
  axes_leaves = jax.tree.leaves(axes, is_leaf=_is_axes)
  keys = jax.random.split(key if key is not None else jax.random.key(0), len(leaves))
  out = []
  for (path, x), ax, k in zip(leaves, axes_leaves, keys):
    grown = _duplicate(x, ax)
    if _is_final_norm(path):
      grown = grown / 2
    if noise_std:
      mask = off_diagonal(grown.shape, ax)
      grown = grown + jnp.where(mask, noise_std * jax.random.normal(k, grown.shape, grown.dtype), 0)
    out.append(grown)
  return jax.tree_util.tree_unflatten(treedef, out)


def widen_moments(moments, axes, power):
  """Adam moments under width x2: G(m) / 2 (power 1), G(v) / 4 (power 2); the final
  norm's copied unscaled."""
  def one(path, x, ax):
    grown = _duplicate(x, ax)
    return grown if _is_final_norm(path) else grown / 2 ** power
  return jax.tree_util.tree_map_with_path(one, moments, axes, is_leaf=None)


# ---- depth ------------------------------------------------------------------------------


def _identity_layer(path, x):
  """A copied layer's parameter made inert: norm parameters and biases zeroed."""
  names = _path_names(path)
  if any(n.endswith("_norm") for n in names) or names[-1] == "bias":
    return jnp.zeros_like(x)
  return x


def _order(num_layers, mode):
  """[(source layer, is new)] of the grown stack."""
  if mode == "interleave":
    return [(i, new) for i in range(num_layers) for new in (False, True)]
  if mode == "append":
    return [(i, False) for i in range(num_layers)] + [(num_layers - 1, True)] * num_layers
  raise ValueError(f"unknown depth mode {mode!r}; choose 'interleave' or 'append'.")


def deepen(tree, cfg: ModelConfig, mode="interleave", *, new_layer):
  """Depth x2 of a parameter-shaped tree; `new_layer(path, x)` makes a new layer's leaf
  from its source layer's (identity parameters, or zero moments)."""
  order = _order(cfg.num_layers, mode)
  if cfg.scan_layers:
    def one(path, x):
      if "layers" not in _path_names(path)[:1]:
        return x
      return jnp.stack([new_layer(path, x[i]) if new else x[i] for i, new in order])
    return jax.tree_util.tree_map_with_path(one, tree)
  out = {k: v for k, v in tree.items() if not k.startswith("layer_")}
  for j, (i, new) in enumerate(order):
    source = tree[f"layer_{i}"]
    out[f"layer_{j}"] = (jax.tree_util.tree_map_with_path(new_layer, source) if new else source)
  return out


# ---- the whole training state -----------------------------------------------------------


def _map_adam(opt_state, fn):
  """Apply fn to every optax ScaleByAdamState in opt_state."""
  return jax.tree.map(lambda s: fn(s) if isinstance(s, optax.ScaleByAdamState) else s, opt_state,
                      is_leaf=lambda s: isinstance(s, optax.ScaleByAdamState))


def jump_to(state, step, rows_per_step):
  """The state with its step counter at `step` and its LR schedule at step x
  rows_per_step rows seen."""
  rows = step * rows_per_step
  return state.replace(step=jnp.asarray(step, state.step.dtype),
                       rows_seen=jnp.asarray(rows, state.rows_seen.dtype),
                       opt_state=set_schedule_count(state.opt_state, rows))


def grow_state(state, cfg: ModelConfig, op, *, depth_mode="interleave", noise_std=0.0,
               key=None, step=None, rows_per_step=None):
  """The grown TrainState (and the target ModelConfig): parameters and Adam moments
  mapped, Adam's count carried over; with `step`, the step counter and the LR
  schedule (which counts rows seen: `rows_per_step`, the grown run's batch size,
  per step) jump there (Shen et al.: R = S_small / c)."""
  target = grown_config(cfg, op)
  if op == "width":
    axes = logical_axes(cfg)
    params = widen_params(state.params, axes, noise_std=noise_std, key=key)
    opt_state = _map_adam(state.opt_state, lambda s: s._replace(
        mu=widen_moments(s.mu, axes, 1), nu=widen_moments(s.nu, axes, 2)))
  else:
    params = deepen(state.params, cfg, depth_mode, new_layer=_identity_layer)
    zeros = lambda path, x: jnp.zeros_like(x)  # noqa: E731
    opt_state = _map_adam(state.opt_state, lambda s: s._replace(
        mu=deepen(s.mu, cfg, depth_mode, new_layer=zeros),
        nu=deepen(s.nu, cfg, depth_mode, new_layer=zeros)))
  grown = state.replace(params=params, opt_state=opt_state)
  if step is not None:
    if rows_per_step is None:
      raise ValueError("grow_state(step=...) needs rows_per_step, the grown run's batch size.")
    grown = jump_to(grown, step, rows_per_step)
  return grown, target


if __name__ == "__main__":
  import sys

  from bigsci_jax.growth_command import main
  sys.exit(main(sys.argv[1:]))
