"""LoRA (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models") on the
attention projections of a frozen model.

Each chosen kernel W (query, key and value [D, heads, head_dim], out [heads, head_dim, D];
scanned layers add a leading layer axis) gains scale · A·B, with W's input axes
flattened to `in` and its output axes to `out`: A [in, r], B [r, out], scale =
alpha / r. B starts at zero, so an untrained adapter is the base model exactly; A
starts Gaussian with standard deviation 1/sqrt(in) (Hu et al.: "random Gaussian
initialization for A and zero for B").

The factors form a tree that mirrors the params' own (…/attention/query/{a, b}).
`merge` adds their products to copies of the kernels, in float32, cast back to the
kernel's dtype. Tuning merges inside its jitted step (gradients reach only A and B);
loading an adapter merges once (`merged`), so evaluation, generation and serving run
the base model's code at its speed, offloaded parameters included.
"""

import jax
import jax.numpy as jnp
import numpy as np

TARGETS = ("query", "key", "value", "out")
_IN_AXES = {"query": 1, "key": 1, "value": 1, "out": 2}  # the kernel's input axes (after layers)
_KERNEL_AXES = 3  # query/key/value: D, heads, head_dim; out: heads, head_dim, D


def sites(params, targets=TARGETS):
  """[(path of the projection's dict, its kernel)] for every target projection of every
  attention block in params, in tree order."""
  found = []

  def walk(tree, path):
    for name in sorted(tree):
      if not isinstance(tree[name], dict):
        continue
      if name == "attention":
        found.extend((path + (name, t), tree[name][t]["kernel"]) for t in targets)
      else:
        walk(tree[name], path + (name,))
  walk(params, ())
  return found


def factor_shapes(kernel_shape, target, rank):
  """((A's shape), (B's shape)) for a kernel of this shape."""
  lead = tuple(kernel_shape[:len(kernel_shape) - _KERNEL_AXES])
  body = kernel_shape[len(lead):]
  n_in = int(np.prod(body[:_IN_AXES[target]]))
  n_out = int(np.prod(body[_IN_AXES[target]:]))
  return lead + (n_in, rank), lead + (rank, n_out)


def _factor_sites(params, rank, targets):
  """[(path, A's shape, B's shape)] for every target projection in params."""
  return [(path, *factor_shapes(kernel.shape, path[-1], rank))
          for path, kernel in sites(params, targets)]


def _set(tree, path, value):
  """A copy of the nested dict `tree` with tree[path...] = value (dicts along path copied)."""
  if not path:
    return value
  return {**tree, path[0]: _set(tree.get(path[0], {}), path[1:], value)}


def _get(tree, path):
  for name in path:
    tree = tree[name]
  return tree


def check(rank, targets):
  if rank < 1:
    raise ValueError(f"lora_rank={rank} must be at least 1.")
  unknown = [t for t in targets if t not in TARGETS]
  if unknown or not targets:
    raise ValueError(f"lora_targets={','.join(targets)}: each is one of {', '.join(TARGETS)}.")


def init(params, rank, targets=TARGETS, seed=0):
  """The float32 factor tree of an untrained adapter (B = 0) for params' kernels."""
  check(rank, targets)
  rng, factors = np.random.default_rng(seed), {}
  for path, a_shape, b_shape in _factor_sites(params, rank, targets):
    a = rng.standard_normal(a_shape, dtype=np.float32) / np.sqrt(a_shape[-2], dtype=np.float32)
    factors = _set(factors, path, {"a": a, "b": np.zeros(b_shape, np.float32)})
  return factors


def shapes(params, rank, targets=TARGETS):
  """The factor tree's jax.ShapeDtypeStructs for params' kernels (what a saved adapter
  is restored into)."""
  tree = {}
  for path, a_shape, b_shape in _factor_sites(params, rank, targets):
    tree = _set(tree, path, {"a": jax.ShapeDtypeStruct(a_shape, jnp.float32),
                             "b": jax.ShapeDtypeStruct(b_shape, jnp.float32)})
  return tree


def _paths(factors, path=()):
  """The paths of the projection dicts ({a, b}) in a factor tree."""
  if set(factors) == {"a", "b"}:
    return [path]
  return [p for name in sorted(factors) for p in _paths(factors[name], path + (name,))]


def _added(kernel, a, b, scale):
  """W + scale · A·B, summed in float32, in W's dtype."""
  delta = jnp.einsum("...ir,...ro->...io", a, b).reshape(kernel.shape)
  return (kernel.astype(jnp.float32) + scale * delta).astype(kernel.dtype)


def merge(params, factors, scale):
  """params with each factored kernel replaced by W + scale · A·B (a new tree; params
  untouched). Traceable: inside a jitted step gradients reach the factors."""
  for path in _paths(factors):
    ab = _get(factors, path)
    params = _set(params, path + ("kernel",),
                  _added(_get(params, path)["kernel"], ab["a"], ab["b"], scale))
  return params


def _added_on_device(kernel, a, b, scale):
  return _added(jax.device_put(kernel, jax.memory.Space.Device), a, b, scale)


def merged(params, factors, scale):
  """merge, once, for an adapter loaded to run: one jitted sum per adapted kernel (one
  stacked kernel in flight at a time), each new kernel laid out (devices, memory kind)
  as the one it replaces — kernels kept in pinned host memory are brought to the
  device for the sum and written back there."""
  for path in _paths(factors):
    kernel, ab = _get(params, path)["kernel"], _get(factors, path)
    add = jax.jit(_added_on_device, static_argnums=3, out_shardings=kernel.sharding)
    params = _set(params, path + ("kernel",), add(kernel, ab["a"], ab["b"], scale))
  return params
