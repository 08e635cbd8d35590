"""The gradient noise scale (McCandlish et al. 2018, "An Empirical Model of Large-Batch
Training", appendix A), estimated inside the train step. Pure jnp: the step imports it.

With per-token gradients of mean G and covariance Sigma, a mean gradient over b
tokens has E|g_b|^2 = |G|^2 + tr(Sigma) / b. The step has both a large batch (the
whole step, W loss tokens) and small ones (its A micro-batches, w_i tokens each),
so with s = mean_i |g_i|^2 and l = |g_W|^2,

  tr(Sigma) ~ (s - l) / (mean_i(1 / w_i) - 1 / W),    |G|^2 ~ l - tr(Sigma) / W,

both unbiased. Each is smoothed by an exponential moving average, and
B_simple = tr(Sigma) / |G|^2 is the ratio of the averages (in tokens: the batch
units are loss-weighted tokens). The averages share one debiasing factor, so the
ratio needs none.
"""

import jax.numpy as jnp
from flax import struct


class NoiseScale(struct.PyTreeNode):
  """Moving averages of the two estimates (part of the train state, so resume is exact)."""
  g2: jnp.ndarray             # EMA of the |G|^2 estimates
  trace: jnp.ndarray          # EMA of the tr(Sigma) estimates
  debias: jnp.ndarray         # 1 - decay^samples
  tokens_per_row: jnp.ndarray  # loss tokens per sequence of the last sample

  @classmethod
  def empty(cls):
    zero = jnp.zeros((), jnp.float32)
    return cls(g2=zero, trace=zero, debias=zero, tokens_per_row=zero)

  def update(self, g2, trace, tokens_per_row, decay):
    mix = lambda old, new: decay * old + (1.0 - decay) * new.astype(jnp.float32)  # noqa: E731
    return NoiseScale(g2=mix(self.g2, g2), trace=mix(self.trace, trace),
                      debias=mix(self.debias, jnp.ones(())),
                      tokens_per_row=jnp.asarray(tokens_per_row, jnp.float32))

  def b_simple(self):
    """tr(Sigma) / |G|^2 in tokens; NaN before the first sample or while |G|^2 <= 0."""
    return jnp.where(self.g2 > 0, self.trace / jnp.where(self.g2 > 0, self.g2, 1.0), jnp.nan)

  def metrics(self):
    safe = jnp.maximum(self.debias, 1e-30)
    return {"gns": self.b_simple(), "gns_g2": self.g2 / safe, "gns_trace": self.trace / safe}


def estimates(micro_sq_norms_A, micro_weights_A, big_sq_norm, big_weight):
  """(|G|^2, tr(Sigma)) from the micro-batches' squared mean-gradient norms and weights
  and the whole step's. A micro-batch of weight 0 (all padding) counts as weight 1."""
  w_A = jnp.maximum(micro_weights_A.astype(jnp.float32), 1.0)
  small = jnp.mean(micro_sq_norms_A.astype(jnp.float32))
  inv_small = jnp.mean(1.0 / w_A)
  inv_big = 1.0 / jnp.maximum(big_weight.astype(jnp.float32), 1.0)
  trace = (small - big_sq_norm) / (inv_small - inv_big)
  return big_sq_norm - trace * inv_big, trace
