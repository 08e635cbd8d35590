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

import numpy as np
import seqio
import tensorflow as tf

from bigsci_jax.data import FEATURES

tf.config.set_visible_devices([], "GPU")


class SeqioSource:
  def __init__(self, mixture, seq_len, *, prefix_lm=False, seed=0, split="train",
               process_index=0, process_count=1, shuffle=True, num_epochs=None):
    self.mixture, self.seq_len, self.prefix_lm, self.seed = mixture, seq_len, prefix_lm, seed
    self.split, self.shuffle, self.num_epochs = split, shuffle, num_epochs
    self.process_index, self.process_count = process_index, process_count
    self.position = 0
    self._rows = self._stream()

  def _stream(self):
    if self.prefix_lm:
      lengths = {"inputs": self.seq_len // 2, "targets": self.seq_len - self.seq_len // 2}
      converter = seqio.PrefixLMFeatureConverter(pack=True)
    else:
      lengths = {"targets": self.seq_len}
      converter = seqio.DecoderFeatureConverter(pack=True)
    shard = (seqio.ShardInfo(self.process_index, self.process_count)
             if self.process_count > 1 else None)
    dataset = seqio.get_dataset(self.mixture, lengths, converter, dataset_split=self.split,
                                shuffle=self.shuffle, num_epochs=self.num_epochs,
                                shard_info=shard, seed=self.seed, verbose=False)
    return dataset.as_numpy_iterator()

  def _next_local(self, count):
    rows = [next(self._rows) for _ in range(count)]
    batch = {}
    for name in FEATURES:
      if name in rows[0]:
        batch[name] = np.stack([r[name] for r in rows]).astype(np.int32)
      else:  # plain LM: no prefix anywhere
        batch[name] = np.zeros((count, self.seq_len), np.int32)
    return batch

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
