"""The engine's rows: a request's choices (Choice, each one row; Job, the request) and
the cache slots they sit in while they run (Slate: which row holds which slot, the rows'
next tokens and sampling settings, and where rows joining go). Plain Python and numpy
bookkeeping; the engine (engine.py) runs the device work.
"""

import threading

import numpy as np

from bigsci_jax import generate, kv_cache


class Choice:
  """One row: a prompt (token ids, no BOS) and how to continue it; the engine fills
  in the outcome (generated ids, their log-probabilities and alternatives, the
  prompt's, and — once it has finished — the text and why)."""

  def __init__(self, prompt, max_tokens, sampling, seed, logprobs=None, echo=False, stop=()):
    self.prompt, self.max_tokens, self.sampling, self.seed = list(prompt), max_tokens, sampling, seed
    self.logprobs, self.echo, self.stop = logprobs, echo, tuple(s for s in stop if s)
    self.tokens, self.token_logprobs, self.top = [], [], []
    self.prompt_logprobs, self.prompt_top = None, None
    self.text, self.finish_reason = "", None

  @property
  def finished(self):
    return self.finish_reason is not None


class Job:
  """The choices of one request. notify() is called from the engine thread after every
  decoding step that changed a choice and when the job is done; cancel() drops it."""

  def __init__(self, choices, notify=lambda: None):
    self.choices, self.notify = choices, notify
    self.lock = threading.Lock()
    self.cancelled, self.error = False, None

  @property
  def done(self):
    return self.error is not None or all(c.finished for c in self.choices)

  def cancel(self):
    self.cancelled = True



class Slate:
  """The server's rows: slot s of the cache holds rows[s] ((job, choice), None when
  free), fed token[s] at position[s] next, its picks[s]-th pick. A step runs on
  `slots` (kv_cache.step_rows of the current bucket, in the step's row order); keys
  and sampling are the device-ready settings of those rows, rebuilt when rows join or
  move. The arrays are replaced, never written in place: a computation still in
  flight may be reading them (on CPU a numpy argument can be the device buffer
  itself)."""

  ROW_ARRAYS = ("token", "position", "picks", "seeds")

  def __init__(self, cache, size, blocks):
    self.cache, self.rows, self.blocks = cache, [None] * size, blocks
    self.pending = [None] * size  # a prefilling row's prompt tokens still to write
    self.token, self.position = np.zeros(size, np.int32), np.zeros(size, np.int32)
    self.picks, self.seeds = np.zeros(size, np.int32), np.zeros(size, np.int64)
    self.samplings = [generate.Sampling()] * size
    self.slots, self.keys, self.sampling = [], None, None

  def live(self):
    return [s for s, row in enumerate(self.rows) if row is not None]

  def decoding(self):
    """The live slots whose rows have their whole prompt in the cache."""
    return [s for s in self.live() if self.pending[s] is None]

  def free(self, slot):
    self.rows[slot], self.pending[slot] = None, None

  def rank(self, slot):
    """The slot's place in the order in which rows fill the cache: the first n slots
    of that order are the step rows of a bucket of n rows."""
    block = len(self.rows) // self.blocks
    return (slot % block) * self.blocks + slot // block

  def _free(self):
    """The free slots in fill order."""
    return sorted((s for s, row in enumerate(self.rows) if row is None), key=self.rank)

  def places(self, n, buckets):
    """Where n rows joining are prefilled: (count, at, blocks_n). The prefill runs on
    `count` rows, the smallest of `buckets` that holds n, in `blocks` blocks of count /
    blocks rows, one per shard of the batch axis. Where the free slots allow, row j is
    row at[j] of the prefill, in the block of the shard whose part of the cache will
    hold it (blocks_n[j]; the rows go where the first free slots in fill order whose
    block has room are), so that it is put into the cache on its own device
    (Decoder.put_rows). Where they do not (the free slots are too unevenly spread over
    the shards), row j is row j and blocks_n[j] is None: the rows take the first free
    slots in fill order and cross devices (cheaper than a larger prefill)."""
    block, free = len(self.rows) // self.blocks, self._free()
    count = next(b for b in buckets if b >= n)
    per, used, at, blocks_n = count // self.blocks, [0] * self.blocks, [], []
    for s in free:
      d = s // block
      if used[d] < per and len(at) < n:
        at.append(d * per + used[d])
        blocks_n.append(d)
        used[d] += 1
    if len(at) < n:
      return count, list(range(n)), [None] * n
    return count, at, blocks_n

  def slots_for(self, blocks_n):
    """The slots rows of these blocks of the cache's rows take, in order: each the first
    free one in fill order of its block (None: of any block)."""
    block, free, slots = len(self.rows) // self.blocks, self._free(), []
    for d in blocks_n:
      slots.append(next(s for s in free if d is None or s // block == d))
      free.remove(slots[-1])
    return slots

  def put(self, slot, row, token, position, seed, pending=None):
    """A row joins at `slot` after its first pick, or, with `pending` prompt tokens
    still to prefill, before it (token unused, no picks yet)."""
    self.rows[slot], self.samplings[slot], self.pending[slot] = row, row[1].sampling, pending
    for name, value in (("token", token), ("position", position),
                        ("picks", 0 if pending else 1), ("seeds", seed)):
      self.set_rows(name, slot, value)

  def move(self, pairs):
    """Rows move from slot a to slot b for each (a, b) of `pairs` (their cache rows are
    copied by the caller)."""
    for a, b in pairs:
      self.rows[b], self.rows[a] = self.rows[a], None
      self.pending[b], self.pending[a] = self.pending[a], None
      self.samplings[b] = self.samplings[a]
    moved_from, moved_to = [a for a, _ in pairs], [b for _, b in pairs]
    for name in self.ROW_ARRAYS:
      self.set_rows(name, moved_to, getattr(self, name)[moved_from])

  def set_rows(self, name, slots, values):
    """Row array `name` with slots' entries set to values (a new array)."""
    array = getattr(self, name).copy()
    array[slots] = values
    setattr(self, name, array)

  def settle(self, count):
    """Steps run on the step rows of a bucket of `count` rows."""
    self.slots = kv_cache.step_rows(len(self.rows), count, self.blocks)
    self.keys = generate.row_keys(self.seeds[self.slots])
    self.sampling = generate.sampling_rows([self.samplings[s] for s in self.slots])
