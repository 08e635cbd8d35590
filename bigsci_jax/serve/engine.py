"""The batching engine behind the server: one thread that gathers the choices of
concurrent requests for a few milliseconds (Engine._take) and decodes them together.

Every choice (a prompt, one of its n samples) is a row. A batch of rows is padded
to a bucket of row counts (powers of two up to max_batch) and prompt widths
(powers of two from 32 up to the context window), so after the buckets have each
been seen once nothing compiles again (every pick reports LOGPROBS_MAX
alternatives, whatever the rows ask for, so log-probabilities add no shapes). A
batch runs, with the jitted pieces of
generate.Decoder:
  - prompt log-probabilities (echo with logprobs) from a causal pass over the
    prompts — for a prefix LM too: scored bidirectionally, each prompt token would
    see itself;
  - a prefill of the prompts into a fresh KV cache (for a prefix LM the prompt is
    the bidirectional prefix) and one decoding step per further token, each row
    with its own temperature / top-k / top-p and seed, until every row has met
    its max_tokens, EOS or a stop string. A causal model whose rows all want at
    most one token takes it from the scoring pass and builds no cache.
A soft prompt attached to the params (adapt.soft_prompt) starts every row, after
BOS; requests get the rest of the window (max_len).
The cache has context-window slots when the widest prompt bucket plus the
longest generation fits (the last new token is never fed back), twice that
otherwise (left padding takes slots).
A cancelled job (its client went away) leaves the queue, and its rows stop at the
next step; a batch whose rows have all stopped ends early.
"""

import collections
import logging
import threading
import time

import jax
import numpy as np

from bigsci_jax import generate
from bigsci_jax.likelihood import bucket_width
from bigsci_jax.model import soft_prompt_ids

log = logging.getLogger(__name__)
GATHER_CAP = 8  # a batch waits at most this many gather windows for its rows


class EngineStopped(RuntimeError):
  """The engine no longer takes work (the server is shutting down)."""


class EngineBusy(RuntimeError):
  """The queue is full."""


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


class Engine:
  def __init__(self, model, params, tokenizer, *, mesh=None, max_batch=16, gather_ms=5.0,
               max_queue=4096):
    self.model, self.params, self.tokenizer = model, params, tokenizer
    self.decoder = generate.Decoder(model, mesh, tokenizer.vocab_size)
    self.window = model.cfg.max_len
    self.lead = soft_prompt_ids(params)  # an attached soft prompt starts every row
    self.max_len = self.window - len(self.lead)  # what a request may use
    self.prefix_lm = model.cfg.mask == "prefix"
    step = 1 if mesh is None else int(np.prod([mesh.shape[a] for a in mesh.axis_names
                                               if a in ("data", "fsdp")]))
    # row counts: the batch-parallel size times powers of two, up to max_batch
    self.row_buckets = [step << i for i in range(max(max_batch // step, 1).bit_length())]
    self.max_batch = self.row_buckets[-1]
    self.widths = sorted({bucket_width(1 << i, self.window)
                          for i in range(self.window.bit_length() + 1)})
    self.gather_s, self.max_queue = gather_ms / 1000.0, max_queue
    self._queue = collections.deque()  # (job, choice)
    self._last_arrival = 0.0
    self._expected = 1  # rows the last batch took
    self._cv = threading.Condition()
    self._stopping = False
    self.batches = 0         # batches run
    self.running = 0         # rows of the batch being decoded that have not finished
    self.cancelled_rows = 0  # rows stopped because their client went away
    self._thread = threading.Thread(target=self._loop, name="bigsci-engine", daemon=True)
    self._thread.start()

  # --- the queue -------------------------------------------------------------
  def submit(self, job):
    with self._cv:
      if self._stopping:
        raise EngineStopped("the server is shutting down.")
      if len(self._queue) + len(job.choices) > self.max_queue:
        raise EngineBusy(f"{len(self._queue)} rows are already queued; retry later.")
      for choice in job.choices:
        self._queue.append((job, choice))
      self._last_arrival = time.monotonic()
      self._cv.notify()

  def stop(self, timeout=None):
    """Finish the queued and running work, then end the thread."""
    with self._cv:
      self._stopping = True
      self._cv.notify()
    self._thread.join(timeout)

  def _take(self):
    """Up to max_batch rows: wait for one, then gather until gather_ms pass with no new
    row once the queue holds as many rows as the last batch ran (those clients tend
    to come back together), or GATHER_CAP times gather_ms in all. (Clients answered
    together return one by one as the server writes their responses, the first well
    ahead of the rest: a window from the first arrival split 16 clients into batches
    of 1 and 15.)"""
    with self._cv:
      while not self._queue and not self._stopping:
        self._cv.wait()
      if not self._queue:
        return None
      cap = time.monotonic() + GATHER_CAP * self.gather_s
      while len(self._queue) < self.max_batch and not self._stopping:
        until = cap
        if len(self._queue) >= self._expected:
          until = min(cap, self._last_arrival + self.gather_s)
        left = until - time.monotonic()
        if left <= 0:
          break
        self._cv.wait(left)
      rows = []
      while self._queue and len(rows) < self.max_batch:
        job, choice = self._queue.popleft()
        if job.cancelled:
          self.cancelled_rows += 1
        else:
          rows.append((job, choice))
      self._expected = max(len(rows), 1)
      return rows

  def status(self):
    return {"queued": len(self._queue), "running": self.running,
            "cancelled": self.cancelled_rows, "batches": self.batches}

  def _loop(self):
    while True:
      rows = self._take()
      if rows is None:
        return
      if not rows:
        continue
      try:
        self.running = len(rows)
        self._run(rows)
      except Exception as e:  # noqa: BLE001 - reported to every request in the batch
        log.exception("a batch of %d rows failed", len(rows))
        for job, _ in rows:
          job.error = f"{type(e).__name__}: {e}"
      self.running = 0
      for job in {id(j): j for j, _ in rows}.values():
        if job.done or job.cancelled:
          job.notify()

  # --- one batch -------------------------------------------------------------
  def warmup(self, row_counts=None, widths=None):
    """Compile every shape a batch of these bucket sizes (default: all) can take: the
    scoring pass, and the prefill and step for both cache lengths."""
    top = generate.LOGPROBS_MAX
    for rows in row_counts or self.row_buckets:
      keys = generate.row_keys(np.arange(rows))
      sampling = generate.sampling_rows([generate.Sampling()] * rows)
      for cache_len in (self.window, 2 * self.window):
        for width in [w for w in widths or self.widths if w > 1 + len(self.lead)]:
          batch = generate.prompt_batch([[3] * (width - 1 - len(self.lead))] * rows,
                                        self.prefix_lm, width, self.lead, self.tokenizer.bos_id)
          if cache_len == self.window:
            jax.block_until_ready(self.decoder.prompt_logprobs(self.params, batch, keys,
                                                               sampling, top))
          picked, cache = self.decoder.prefill(self.params, batch, keys, sampling, cache_len, top)
        picked, cache = self.decoder.step(self.params, cache, np.asarray(picked.token),
                                          batch[1][:, -1] + 1,
                                          keys, 1, sampling, top)
        jax.block_until_ready(picked)

  def _run(self, rows):
    choices = [c for _, c in rows]
    count = next(s for s in self.row_buckets if s >= len(choices))
    pad = Choice([], 0, generate.Sampling(), 0)
    pad.finish_reason = "padding"
    padded = choices + [pad] * (count - len(choices))
    width = bucket_width(1 + len(self.lead) + max(len(c.prompt) for c in padded), self.window)
    steps = max(c.max_tokens for c in padded)
    cache_len = self.window if width + steps - 1 <= self.window else 2 * self.window
    top = generate.LOGPROBS_MAX  # one shape whatever the rows ask for; rows take their share
    batch = generate.prompt_batch([c.prompt for c in padded], self.prefix_lm, width, self.lead,
                                  self.tokenizer.bos_id)
    keys = generate.row_keys([c.seed for c in padded])
    sampling = generate.sampling_rows([c.sampling for c in padded])
    self.batches += 1
    picked = None
    if any(c.echo and c.logprobs is not None for c in choices):
      token_lp, top_ids, top_lp, causal_pick = jax.device_get(
          self.decoder.prompt_logprobs(self.params, batch, keys, sampling, top))
      for r, (job, c) in enumerate(rows):
        if c.echo and c.logprobs is not None:
          cols = slice(width - len(c.prompt), width)
          with job.lock:
            c.prompt_logprobs = [None] + [float(x) for x in token_lp[r, cols][1:]]
            c.prompt_top = [None] + [list(zip(top_ids[r, i, :c.logprobs].tolist(),
                                              top_lp[r, i, :c.logprobs].tolist()))
                                     for i in range(cols.start + 1, width)]
          job.notify()
      if not self.prefix_lm:
        picked = causal_pick
    for job, c in rows:
      if c.max_tokens == 0:
        self._finish(job, c, "length")
    if steps == 0:
      return
    cache = None
    if picked is None or steps > 1:
      picked, cache = self.decoder.prefill(self.params, batch, keys, sampling, cache_len, top)
    next_pos = batch[1][:, -1] + 1
    for i in range(steps):
      token = np.asarray(picked.token)
      logprob, top_ids, top_lp = jax.device_get((picked.logprob, picked.top_ids,
                                                  picked.top_logprobs))
      changed = set()
      for r, (job, c) in enumerate(rows):
        if c.finished:
          continue
        if job.cancelled:
          self._finish(job, c, "cancelled")
          self.cancelled_rows += 1
          continue
        self._append(job, c, int(token[r]), float(logprob[r]),
                     list(zip(top_ids[r, :c.logprobs or 0].tolist(),
                              top_lp[r, :c.logprobs or 0].tolist())))
        changed.add(id(job))
      self.running = sum(not c.finished for c in choices)
      for job in {id(j): j for j, _ in rows}.values():
        if id(job) in changed and not job.done:
          job.notify()
      if i + 1 == steps or all(c.finished for c in choices):
        return
      picked, cache = self.decoder.step(self.params, cache, token, next_pos, keys, i + 1,
                                        sampling, top)
      next_pos = next_pos + 1

  def _finish(self, job, c, reason):
    with job.lock:
      self._end(c, reason)

  def _end(self, c, reason):
    """A row's text is decoded once, when it ends (_stopped cuts it at a stop string)."""
    c.text = self.tokenizer.decode(c.tokens)
    c.finish_reason = reason

  def _append(self, job, c, token, logprob, top):
    """Add one generated token to a row; end it at EOS, a stop string or max_tokens."""
    with job.lock:
      if token == self.tokenizer.eos_id:
        self._end(c, "stop")
        return
      c.tokens.append(token)
      c.token_logprobs.append(logprob)
      c.top.append(top)
      if c.stop and self._stopped(c):
        c.finish_reason = "stop"
      elif len(c.tokens) >= c.max_tokens:
        self._end(c, "length")

  def _stopped(self, c):
    """True (and the text and tokens cut before the stop string) if the newest token
    completes one of c.stop. Only the last few tokens are decoded to look for it."""
    tail_tokens = 4 * max(len(s) for s in c.stop) + 4
    if not any(s in self.tokenizer.decode(c.tokens[-tail_tokens:]) for s in c.stop):
      return False
    text = self.tokenizer.decode(c.tokens)
    found = [text.index(s) for s in c.stop if s in text]
    if not found:
      return False
    cut = min(found)
    offsets = self.tokenizer.offsets(c.tokens)
    keep = sum(1 for o in offsets if o < cut)
    c.text = text[:cut]
    del c.tokens[keep:], c.token_logprobs[keep:], c.top[keep:]
    return True
