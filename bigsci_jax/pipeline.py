"""seqio mixtures -> packed numpy rows for the training loop.

The same interface as data.SyntheticLM (`take`, `get_state`, `set_state`,
`position`): rows come packed to the sequence length by seqio's feature
converters (LM, or prefix LM with `decoder_causal_attention` on each segment's
prefix), in an order fixed by the seed; each process reads only its shard
(seqio.ShardInfo) and the iterator position (global rows consumed) is what a
checkpoint stores. Restoring re-reads the stream up to that position, so a
resumed run sees exactly the rows an uninterrupted one would.

Imports TensorFlow (kept off accelerators) and seqio: only the data path uses it.
"""

import itertools
import logging
import os

# Before TensorFlow loads: its C++ warnings (graph type inference, CUDA probing) are noise
# here. jax sets the level to 1 when imported, so 1 is raised to 2 as well.
if os.environ.get("TF_CPP_MIN_LOG_LEVEL", "1") in ("0", "1"):
  os.environ["TF_CPP_MIN_LOG_LEVEL"] = "2"

import jax
import numpy as np
import seqio
import tensorflow as tf
from jax.experimental import multihost_utils

from bigsci_jax.config import ConfigError
from bigsci_jax.data import FEATURES, Corpus
from bigsci_jax.tasks import handbook

tf.config.set_visible_devices([], "GPU")


class _QuietPacking(logging.Filter):
  """seqio warns on every packed dataset that `*_pretokenized` text is not packed."""

  def filter(self, record):
    return "will be removed during packing" not in str(record.msg)


logging.getLogger("absl").addFilter(_QuietPacking())


class SeqioSource:
  def __init__(self, mixture, seq_len, *, prefix_lm=False, loss_on_prefix=False, seed=0,
               split="train", process_index=0, process_count=1, shuffle=True, num_epochs=None,
               bos_id=0):
    self.mixture, self.seq_len, self.prefix_lm, self.seed = mixture, seq_len, prefix_lm, seed
    self.bos_id = bos_id  # the token inputs start from (the tokenizer's bos_id)
    self.loss_on_prefix = loss_on_prefix
    self.split, self.shuffle, self.num_epochs = split, shuffle, num_epochs
    self.process_index, self.process_count = process_index, process_count
    self.position = 0
    self._rows = self._stream()

  def _stream(self):
    if self.prefix_lm:
      lengths = {"inputs": self.seq_len // 2, "targets": self.seq_len - self.seq_len // 2}
      converter = seqio.PrefixLMFeatureConverter(loss_on_targets_only=not self.loss_on_prefix,
                                                 pack=True, bos_id=self.bos_id)
    else:
      lengths = {"targets": self.seq_len}
      converter = seqio.DecoderFeatureConverter(pack=True, bos_id=self.bos_id)
    shard = (seqio.ShardInfo(self.process_index, self.process_count)
             if self.process_count > 1 else None)
    dataset = seqio.get_dataset(self.mixture, lengths, converter, dataset_split=self.split,
                                shuffle=self.shuffle, num_epochs=self.num_epochs,
                                shard_info=shard, seed=self.seed, verbose=False)
    return dataset.as_numpy_iterator()

  def _next_local(self, count):
    return _stack([next(self._rows) for _ in range(count)], self.seq_len)

  def take(self, num_global_rows):
    """This process's share of the next `num_global_rows` packed rows."""
    if num_global_rows % self.process_count:
      raise ValueError(f"a global batch of {num_global_rows} rows does not split over "
                       f"{self.process_count} processes.")
    batch = self._next_local(num_global_rows // self.process_count)
    self.position += num_global_rows
    return batch

  def get_state(self):
    return {"rows": int(self.position)}

  def set_state(self, state):
    """Re-read the stream up to `state['rows']` (deterministic given the seed)."""
    self._rows = self._stream()
    local = int(state["rows"]) // self.process_count
    for _ in range(local):
      next(self._rows)
    self.position = int(state["rows"])


def read_rows(name, seq_len, max_rows=None, **kwargs):
  """This process's packed rows of one pass over a split in file order (evaluation
  sets): {feature: int32 [N, seq_len]}, at most max_rows of them."""
  source = SeqioSource(name, seq_len, shuffle=False, num_epochs=1, **kwargs)
  return _stack(list(itertools.islice(source._rows, max_rows)), seq_len)


def _stack(rows, seq_len):
  """Rows of features -> {feature: int32 [N, seq_len]}; plain LM rows get an all-zero
  decoder_causal_attention (no prefix anywhere)."""
  zeros = np.zeros(seq_len, np.int32)
  return {k: np.array([r.get(k, zeros) for r in rows], np.int32).reshape(-1, seq_len)
          for k in FEATURES}


def open_corpus(run, split="validation"):
  """data.Corpus for run.data (train SeqioSource, {lang: this process's rows of
  `split`}, token bytes, the vocabulary): process 0 prepares the data and vocabulary first, then the others find
  them. Each language's evaluation split is read once: whole when
  TrainConfig.eval_batches is 0, else its first eval_batches micro-batches."""
  index, count = jax.process_index(), jax.process_count()
  prefix_lm = run.model.mask == "prefix"
  if index == 0:
    prepared = handbook.prepare(run.data, prefix_lm=prefix_lm)
  if count > 1:
    multihost_utils.sync_global_devices("bigsci_jax: data prepared")
  if index != 0:
    prepared = handbook.prepare(run.data, prefix_lm=prefix_lm, primary=False)
  tok = prepared.tokenizer
  if tok.vocab_size > run.model.vocab_size:
    raise ConfigError(f"ModelConfig.vocab_size={run.model.vocab_size} is smaller than the "
                      f"{tok.vocab_size} tokens of {prepared.vocab_path}; raise it.")
  kwargs = dict(prefix_lm=prefix_lm, loss_on_prefix=run.data.loss_on_prefix, seed=run.data.seed,
                process_index=index, process_count=count, bos_id=tok.bos_id)
  train = SeqioSource(prepared.mixture, run.batch.seq_len, **kwargs)
  local_rows = run.batch.micro_batch_size // count * run.train.eval_batches or None
  evals = {lang: read_rows(task, run.batch.seq_len, local_rows, split=split, **kwargs)
           for lang, task in prepared.tasks.items()
           if split in seqio.get_mixture_or_task(task).splits}
  return Corpus(train, evals, tok.byte_lengths(), tok.files())
