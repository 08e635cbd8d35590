"""Weight-spectrum health: heavy-tailed self-regularisation (Martin & Mahoney 2021), the
method of the `weightwatcher` package without its torch dependency.

For every weight matrix W (scanned layers unstacked; attention projections whole, or
per head), the empirical spectral density is the eigenvalues of W^T W (the squared
singular values). Its tail is fitted with a power law p(lambda) ~ lambda^-alpha by
the `powerlaw` package, with xmin chosen as Clauset et al. (2009) do, by the
smallest Kolmogorov-Smirnov distance, over a grid of candidate xmins (every
eigenvalue would cost O(n^2)). Well-trained layers have alpha in [2, 6]; above 6 a
matrix looks random (under-trained), below 2 over-fitted.
"""

import dataclasses
import re
import warnings

import numpy as np

HEALTHY = (2.0, 6.0)
MIN_TAIL = 50          # eigenvalues the tail keeps at least
XMIN_CANDIDATES = 100
ALPHA_RANGE = (1.01, 20.0)  # powerlaw's default caps alpha at 3
HEAD_AXES = ("heads", "kv_heads")


@dataclasses.dataclass(frozen=True)
class Spectrum:
  name: str        # parameter path, with the layer (and head) index
  kind: str        # what the plot draws one line for: e.g. attention/query
  layer: int       # -1 outside the layer stack (embeddings)
  shape: tuple
  eigenvalues: int
  alpha: float
  xmin: float
  ks_distance: float
  tail: int        # eigenvalues at or above xmin

  @property
  def healthy(self):
    return HEALTHY[0] <= self.alpha <= HEALTHY[1]


def eigenvalues(matrix):
  """Eigenvalues of W^T W in ascending order (squared singular values, in float64)."""
  return np.sort(np.linalg.svd(np.asarray(matrix, np.float64), compute_uv=False) ** 2)


def fit_tail(values, candidates=XMIN_CANDIDATES, min_tail=MIN_TAIL):
  """(alpha, xmin, KS distance, tail size) of the power-law tail of `values`."""
  import powerlaw
  values = np.sort(np.asarray(values, np.float64))
  values = values[values > values[-1] * 1e-12]  # exact zeros (rank deficiency) have no tail
  if len(values) < min_tail:
    raise ValueError(f"{len(values)} non-zero eigenvalues; a tail fit needs at least {min_tail}.")
  index = np.unique(np.linspace(0, len(values) - min_tail, candidates).astype(int))
  best = None
  with warnings.catch_warnings(), np.errstate(divide="ignore", invalid="ignore"):
    warnings.simplefilter("ignore")
    for xmin in np.unique(values[index]):
      law = powerlaw.Fit(values, xmin=xmin, verbose=False,
                         parameter_ranges={"alpha": list(ALPHA_RANGE)}).power_law
      if np.isfinite(law.D) and (best is None or law.D < best[2]):
        best = (float(law.alpha), float(xmin), float(law.D), int(np.sum(values >= xmin)))
  return best


def _as_matrices(value, names, per_head):
  """[(head index or None, 2-D matrix)]: the `embed` axis on one side, the rest merged on
  the other; per head, the head axis is split off first."""
  names = list(names)
  head = next((names.index(a) for a in HEAD_AXES if a in names), None)
  if per_head and head is not None:
    out = []
    for h in range(value.shape[head]):
      sub = np.take(value, h, axis=head)
      out += [(h, m) for _, m in _as_matrices(sub, names[:head] + names[head + 1:], False)]
    return out
  if names[0] == "embed" or names[-1] != "embed":
    return [(None, value.reshape(value.shape[0], -1))]
  return [(None, value.reshape(-1, value.shape[-1]))]


def weight_matrices(params, logical, per_head=False):
  """[(name, kind, layer, 2-D numpy matrix)] for every parameter with two or more axes
  besides the layer axis. `logical` holds each parameter's logical axis names (the
  model's partition specs)."""
  out = []
  leaves = zip(*(jax_leaves_with_path(t) for t in (params, logical)))
  for (path, value), (_, names) in leaves:
    value, names = np.asarray(value), tuple(names)
    layers = [None]
    if "layers" in names:  # scanned: unstack
      axis = names.index("layers")
      layers = range(value.shape[axis])
    for layer in layers:
      v, n = value, names
      if layer is not None:
        v, n = np.take(value, layer, axis=axis), names[:axis] + names[axis + 1:]
      if len(n) < 2:
        continue
      match = re.search(r"layer_(\d+)", path)  # unscanned stacks name their layers
      index = layer if layer is not None else (int(match.group(1)) if match else -1)
      kind = "/".join(p for p in path.split("/")
                      if p not in ("layers", "block", "kernel") and not re.fullmatch(r"layer_\d+", p))
      for head, m in _as_matrices(v, n, per_head):
        name = path + (f"[{index}]" if layer is not None else "") + \
            (f"[head {head}]" if head is not None else "")
        out.append((name, kind, index, m))
  return out


def jax_leaves_with_path(tree):
  """[('a/b/c', leaf)] in a fixed order (logical specs are leaves too)."""
  import jax
  from jax.sharding import PartitionSpec
  flat, _ = jax.tree_util.tree_flatten_with_path(
      tree, is_leaf=lambda x: isinstance(x, PartitionSpec))
  return [("/".join(str(getattr(k, "key", k)) for k in path), leaf) for path, leaf in flat]


def analyse(params, logical, per_head=False, min_tail=MIN_TAIL):
  """A Spectrum for every weight matrix with enough eigenvalues for a tail fit; the
  names of those without."""
  spectra, skipped = [], []
  for name, kind, layer, m in weight_matrices(params, logical, per_head):
    values = eigenvalues(m)
    if np.sum(values > values[-1] * 1e-12) < min_tail:
      skipped.append(name)
      continue
    alpha, xmin, distance, tail = fit_tail(values, min_tail=min_tail)
    spectra.append(Spectrum(name, kind, layer, tuple(m.shape), len(values), alpha, xmin,
                            distance, tail))
  return spectra, skipped


def logical_names(model_cfg, seq_len=8):
  """Each parameter's logical axis names, from an abstract init (nothing allocated)."""
  import flax.linen as nn
  import jax
  import jax.numpy as jnp

  from bigsci_jax.model import Transformer
  boxed = jax.eval_shape(lambda: Transformer(model_cfg).init(
      jax.random.key(0), jnp.zeros((1, seq_len), jnp.int32)))["params"]
  return nn.get_partition_spec(boxed)


def plot(spectra, path):
  """alpha against layer, one line per matrix kind, the healthy band shaded."""
  from bigsci_jax.scaling.plots import _pyplot, _save
  plt = _pyplot()
  fig, ax = plt.subplots(figsize=(7, 4))
  ax.axhspan(*HEALTHY, color="g", alpha=0.08, label=f"alpha in [{HEALTHY[0]:g}, {HEALTHY[1]:g}]")
  for kind in sorted({s.kind for s in spectra if s.layer >= 0}):
    rows = sorted((s.layer, s.alpha) for s in spectra if s.kind == kind)
    layers = sorted({r[0] for r in rows})
    mean = [np.mean([a for l, a in rows if l == layer]) for layer in layers]  # heads averaged
    ax.plot(layers, mean, "o-", ms=3, label=kind)
  for s in spectra:
    if s.layer < 0:
      ax.axhline(s.alpha, ls=":", lw=1, color="k")
      ax.annotate(s.kind, (0, s.alpha), fontsize=6)
  ax.set(xlabel="layer", ylabel="power-law exponent alpha", title="weight spectra (ESD tails)")
  ax.legend(fontsize=6)
  _save(fig, path)
  plt.close(fig)
  return path
