"""Log-likelihood of continuations given contexts, the way the evaluation harness
asks for it: the context (for a prefix LM, the bidirectional prefix) and the
continuation are encoded apart and concatenated; only continuation tokens count.

A row holds one request, packed like training rows (BOS-shifted inputs, segment
1, positions from 0); a too-long request loses context tokens from the left.
"""

import jax
import jax.numpy as jnp
import numpy as np

from bigsci_jax import step as steps


class LikelihoodError(ValueError):
  """A request cannot be scored; the message says why."""


def request_rows(requests, encode, seq_len, prefix_lm=False):
  """[(context, continuation)] -> batch features [N, seq_len] (numpy int32)."""
  n = len(requests)
  rows = {k: np.zeros((n, seq_len), np.int32) for k in (
      "decoder_input_tokens", "decoder_target_tokens", "decoder_loss_weights",
      "decoder_segment_ids", "decoder_positions", "decoder_causal_attention")}
  for r, (context, continuation) in enumerate(requests):
    ctx, cont = list(encode(context)), list(encode(continuation))
    if not cont:
      raise LikelihoodError(f"request {r} has an empty continuation.")
    if len(cont) > seq_len - 1:
      raise LikelihoodError(f"request {r}'s continuation is {len(cont)} tokens; the context "
                            f"window is {seq_len}.")
    ctx = ctx[max(0, len(ctx) + len(cont) - seq_len):]  # drop context from the left
    tokens = ctx + cont
    length = len(tokens)
    rows["decoder_target_tokens"][r, :length] = tokens
    rows["decoder_input_tokens"][r, 1:length] = tokens[:-1]
    rows["decoder_loss_weights"][r, len(ctx):length] = 1
    rows["decoder_segment_ids"][r, :length] = 1
    rows["decoder_positions"][r, :length] = np.arange(length)
    if prefix_lm:
      rows["decoder_causal_attention"][r, :len(ctx) + 1] = 1
  return rows


def make_loglik_fn(model, params, encode, seq_len, batch_size=16):
  """requests -> summed continuation log-likelihoods (numpy float64 [N])."""
  prefix_lm = model.cfg.mask == "prefix"

  @jax.jit
  def sums(params, batch):
    logits_BxLxV = model.apply({"params": params}, **steps.model_inputs(model.cfg, batch))
    logp_BxLxV = jax.nn.log_softmax(logits_BxLxV.astype(jnp.float32), axis=-1)
    target_BxL = jnp.take_along_axis(logp_BxLxV, batch["decoder_target_tokens"][..., None],
                                     axis=-1)[..., 0]
    return jnp.sum(target_BxL * batch["decoder_loss_weights"], axis=-1)

  def fn(requests):
    out = []
    for start in range(0, len(requests), batch_size):
      chunk = list(requests[start:start + batch_size])
      pad = batch_size - len(chunk)
      rows = request_rows(chunk + [chunk[0]] * pad, encode, seq_len, prefix_lm)
      out.append(np.asarray(sums(params, rows), np.float64)[:len(chunk)])
    return np.concatenate(out) if out else np.zeros(0)

  return fn
