"""Evaluation on held-out rows: every process's rows cut into micro-batches of one
shape, and the token-weighted loss (and bits per byte, per language) over them."""

import jax
import numpy as np
from jax.experimental import multihost_utils

from bigsci_jax import data, sharding
from bigsci_jax.config import RunConfig
from bigsci_jax.corpus import CorpusError
from bigsci_jax.metrics import bits_per_byte


def _global_max_sum(value):
  """(max, sum) of a per-process number over all processes."""
  if jax.process_count() == 1:
    return value, value
  values = multihost_utils.process_allgather(np.asarray(value))
  return values.max().item(), values.sum().item()


def eval_micro_batches(rows, local_micro, token_bytes):
  """Host rows -> (list of [local_micro, L] micro-batches, global UTF-8 bytes of their
  weighted targets or None). Every process gets the same number of micro-batches;
  padding rows are all zero (segment 0, weight 0) and count for nothing."""
  count = len(rows["decoder_target_tokens"])
  batches, _ = _global_max_sum(-(-count // local_micro))
  pad = batches * local_micro - count
  padded = {k: np.concatenate([v, np.zeros((pad, v.shape[1]), v.dtype)]) for k, v in rows.items()}
  size = None
  if token_bytes is not None:
    local = int((token_bytes[padded["decoder_target_tokens"]]
                 * (padded["decoder_loss_weights"] > 0)).sum())
    _, size = _global_max_sum(local)
  return [{k: v[i * local_micro:(i + 1) * local_micro] for k, v in padded.items()}
          for i in range(batches)], size


def make_eval_sets(run: RunConfig, eval_rows, token_bytes, split="validation"):
  """{name: (micro-batches, UTF-8 bytes)} from make_data's rows; an empty set is an error."""
  local_micro = run.batch.micro_batch_size // jax.process_count()
  sets = {name: eval_micro_batches(rows, local_micro, token_bytes)
          for name, rows in eval_rows.items()}
  empty = [name for name, (batches, _) in sets.items() if not batches]
  if empty:
    raise CorpusError(f"the {split} split of {', '.join(empty)} is empty: evaluate on "
                      f"other languages (DataConfig.languages) or give them {split} text.")
  return sets


def evaluate(eval_step, params, eval_sets, mesh, micro_batch_size):
  """Eval-line metrics: `loss` over every eval set's target tokens; per language
  `loss/<lang>` and `bpb/<lang>`, and `bpb` over all their bytes."""
  shard = sharding.batch_sharding(mesh, 2)
  out, ce_all, weight_all, bytes_all = {}, 0.0, 0.0, 0
  for name, (batches, size) in eval_sets.items():
    ce_total, weight_total = 0.0, 0.0
    for host in batches:
      ce, weight = jax.device_get(eval_step(params, data.to_global(host, shard, micro_batch_size)))
      ce_total, weight_total = ce_total + float(ce), weight_total + float(weight)
    ce_all, weight_all = ce_all + ce_total, weight_all + weight_total
    if name:
      out[f"loss/{name}"] = ce_total / max(weight_total, 1.0)
      if size:
        out[f"bpb/{name}"] = bits_per_byte(ce_total, size)
        bytes_all += size
  out["loss"] = ce_all / max(weight_all, 1.0)
  if bytes_all:
    out["bpb"] = bits_per_byte(ce_all, bytes_all)
  return dict(sorted(out.items()))
