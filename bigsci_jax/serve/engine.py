"""The batching engine behind the server: one thread that decodes every running row
together, one token per step, and lets new rows join between steps (continuous
batching, as in Orca, Yu et al. 2022): a short request that arrives while long ones
run starts at the next step instead of waiting for them to end.

Every choice (a prompt, one of its n samples) is a row. The running rows sit in the
slots of one KV cache of max_batch rows, made once, so the server's memory is that of
a step of max_batch rows (what `aot --step=decode --decode_rows` checks). A step runs
only on the slots of the smallest row bucket (powers of two, then max_batch) holding
every running row (kv_cache.step_rows; the other rows are not read); rows join the
free slots that keep that bucket small, and when rows leave, the ones past the bucket
their number needs move into free slots below it (a copy of those rows only). A
slot's row writes its keys and values from its own cache index, so rows that joined
at different times share each step, and a step's attention reads only the slots the
longest live row has filled (rounded up to a power of two), not the whole window.
Between steps the rows waiting in the queue (up to the free room) join:
  - their prompt log-probabilities (echo with logprobs) from a causal pass over the
    prompts — for a prefix LM too: scored bidirectionally, each prompt token would
    see itself;
  - a prefill of their prompts, left-padded to a bucket of prompt widths (powers of
    two from 32 up to the context window), into a fresh cache of that width, and
    their first token; a causal model whose new rows all want at most one token
    takes it from the scoring pass and builds no cache;
  - their cache rows put into free slots, moved left past their padding, so a row
    uses only its own tokens' slots (a prompt fits when start token + prompt +
    max_tokens - 1 fits the window).
A causal model's prompt longer than `prefill_chunk` tokens (with its start token) is
prefilled a chunk at a time (chunked prefill, as in Sarathi, Agrawal et al. 2023): its
first chunk as above, then one more chunk per engine iteration, written straight into
its slot between the decoding steps of the other rows, which therefore pause for a
chunk's work at a time rather than for the whole prompt; its first token is picked
after its last chunk. (A prefix LM's prompt is one bidirectional prefix, which chunks
cannot compute: it is prefilled whole.)
Each row keeps its own temperature / top-k / top-p, seed and pick count (its
sampling key), so its tokens do not depend on which rows share its steps. It ends at
its max_tokens, EOS or a stop string, and its slot is free at once. When no row
runs, the engine waits for one and then gathers for a few milliseconds
(Engine._take), so clients that come together start together. After the buckets
have each been seen once (Engine.warmup) nothing compiles again: every pick
reports LOGPROBS_MAX alternatives, whatever the rows ask for.
A soft prompt attached to the params (adapt.soft_prompt) starts every row, after
BOS; requests get the rest of the window (max_len).
A cancelled job (its client went away) leaves the queue, and its rows stop at the
next step.
"""

import collections
import logging
import threading
import time

import jax
import numpy as np

from bigsci_jax import generate, kv_cache, sharding
from bigsci_jax.model import soft_prompt_ids
from bigsci_jax.serve.rows import Choice, Slate

log = logging.getLogger(__name__)
GATHER_CAP = 8  # a batch waits at most this many gather windows for its rows


class EngineStopped(RuntimeError):
  """The engine no longer takes work (the server is shutting down)."""


class EngineBusy(RuntimeError):
  """The queue is full."""


class Engine:
  def __init__(self, model, params, tokenizer, *, mesh=None, max_batch=16, gather_ms=5.0,
               max_queue=4096, max_prompt=None, prefill_chunk=512):
    self.model, self.params, self.tokenizer = model, params, tokenizer
    self.decoder = generate.Decoder(model, mesh, tokenizer.vocab_size)
    self.window = model.cfg.max_len
    self.lead = soft_prompt_ids(params)  # an attached soft prompt starts every row
    self.max_len = self.window - len(self.lead)  # what a request may use
    # the longest prompt taken (it bounds the prompt widths to compile), and its width
    self.max_prompt = min(self.max_len if max_prompt is None else max_prompt, self.max_len - 1)
    if self.max_prompt < 1:
      raise ValueError(f"max_prompt must be at least 1, not {max_prompt}.")
    self.prefix_lm = model.cfg.mask == "prefix"
    # prompt rows (start token, soft prompt, prompt) longer than this are prefilled in
    # chunks of it (0: never; a prefix LM: never); a power of two, as the prompt widths
    if prefill_chunk and (prefill_chunk < 2 + len(self.lead) or prefill_chunk & (prefill_chunk - 1)):
      raise ValueError(f"prefill_chunk={prefill_chunk} must be 0 or a power of two of at "
                       f"least {2 + len(self.lead)} tokens.")
    self.chunk = 0 if self.prefix_lm or prefill_chunk >= self.window else prefill_chunk
    self.blocks = 1 if mesh is None else sharding.batch_shards(mesh)  # the model's row blocks
    # row counts: the batch-parallel size times powers of two, then max_batch (rounded
    # down to a multiple of it): the cache's rows
    blocks = self.blocks
    self.max_batch = max(max_batch // blocks, 1) * blocks
    self.row_buckets = [blocks << i for i in range((self.max_batch // blocks).bit_length())
                        if blocks << i < self.max_batch] + [self.max_batch]
    self.reads = sorted({generate.bucket_width(1 << i, self.window)
                         for i in range(self.window.bit_length() + 1)})  # slots a step reads
    widest = generate.bucket_width(1 + len(self.lead) + self.max_prompt, self.window)
    self.widths = [w for w in self.reads if w <= widest]  # prompt widths
    self.gather_s, self.max_queue = gather_ms / 1000.0, max_queue
    self._queue = collections.deque()  # (job, choice)
    self._last_arrival = 0.0
    self._expected = 1  # the most rows the last slate ran together
    self._slate, self._peak = None, 0
    self._cache = None  # the cache of max_batch rows, kept while no row runs
    self._cv = threading.Condition()
    self._stopping = False
    self.batches = 0         # groups of rows that joined (one prefill each)
    self.steps = 0           # decoding steps run
    self.chunks = 0          # prefill chunks run after the first (chunked prefill)
    self.running = 0         # rows being decoded
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

  def _take(self, room, wait):
    """Up to `room` queued rows. With `wait` (no row is running): wait for one, then
    gather until gather_ms pass with no new row once the queue holds as many rows as
    last ran together (those clients tend to come back together), or GATHER_CAP times
    gather_ms in all; None once stopping with nothing queued. (Clients answered
    together return one by one as the server writes their responses, the first well
    ahead of the rest: a window from the first arrival split 16 clients into batches
    of 1 and 15.)"""
    with self._cv:
      if wait:
        while not self._queue and not self._stopping:
          self._cv.wait()
        if not self._queue:
          return None
        cap = time.monotonic() + GATHER_CAP * self.gather_s
        while len(self._queue) < room and not self._stopping:
          until = cap
          if len(self._queue) >= self._expected:
            until = min(cap, self._last_arrival + self.gather_s)
          left = until - time.monotonic()
          if left <= 0:
            break
          self._cv.wait(left)
      rows = []
      while self._queue and len(rows) < room:
        job, choice = self._queue.popleft()
        if job.cancelled:
          self.cancelled_rows += 1
        else:
          rows.append((job, choice))
      return rows

  def status(self):
    return {"queued": len(self._queue), "running": self.running,
            "cancelled": self.cancelled_rows, "batches": self.batches, "steps": self.steps,
            "prefill_chunks": self.chunks}

  def _loop(self):
    while True:
      live = 0 if self._slate is None else len(self._slate.live())
      rows = self._take(self.max_batch - live, wait=self._slate is None)
      if rows is None:
        return
      self._peak = max(self._peak, live + len(rows))
      if rows:
        self._guarded(rows, self._admit, rows)
      if self._slate is not None and len(self._slate.decoding()) < len(self._slate.live()):
        self._guarded([], self._prefill_chunk)
      if self._slate is not None and self._slate.decoding():
        self._guarded([], self._step)
      self.running = 0 if self._slate is None else len(self._slate.live())
      if self._slate is None and self._peak:
        self._expected, self._peak = self._peak, 0

  def _guarded(self, rows, work, *args):
    """work(*args); if it raises, every job of `rows` (the rows joining) and of the
    slate fails with the error (the slate's cache may be half-updated, so it ends)."""
    try:
      work(*args)
    except Exception as e:  # noqa: BLE001 - reported to every request it touched
      if self._slate is not None:
        rows = rows + [row for row in self._slate.rows if row]
        self._slate, self.running = None, 0
      self._cache = None  # maybe half-updated or given to a failed computation
      log.exception("decoding %d rows failed", len(rows))
      jobs = {id(j): j for j, _ in rows}.values()
      for job in jobs:
        job.error = f"{type(e).__name__}: {e}"
      for job in jobs:
        job.notify()

  # --- rows joining ----------------------------------------------------------
  def warmup(self, row_counts=None, widths=None):
    """Compile every shape these row buckets (default: all) and prompt widths can
    take: the scoring pass and the prefill per (rows, width), putting each prefill's
    rows into the cache, the step of each bucket of rows at each bucket of slots read,
    and moving each bucket of rows."""
    top = generate.LOGPROBS_MAX
    counts = row_counts or self.row_buckets
    slate = Slate(self._empty_cache(), self.max_batch, self.blocks)
    for rows in counts:
      keys = generate.row_keys(np.arange(rows))
      sampling = generate.sampling_rows([generate.Sampling()] * rows)
      for width in [w for w in widths or self.widths if w > 1 + len(self.lead)]:
        batch = generate.prompt_batch([[3] * (width - 1 - len(self.lead))] * rows,
                                      self.prefix_lm, width, self.lead, self.tokenizer.bos_id)
        jax.block_until_ready(self.decoder.prompt_logprobs(self.params, batch, keys,
                                                           sampling, top))
        if self.chunk and width > self.chunk:  # prefilled a chunk at a time
          tokens = np.full((rows, self.chunk), 3, np.int32)
          picked, slate.cache = self.decoder.extend(
              self.params, slate.cache, tokens, np.zeros_like(tokens), np.zeros(rows, np.int32),
              keys, 0, sampling, top, width,
              kv_cache.step_rows(self.max_batch, rows, self.blocks))
          jax.block_until_ready(picked)
          continue
        cache = self.decoder.prefill(self.params, batch, keys, sampling, width, top)[1]
        # rows put as Slate.places puts them: each shard's own, and over shards also
        # into the next shard's block (free slots too uneven for that: the global put)
        own = np.asarray(kv_cache.step_rows(self.max_batch, rows, self.blocks))
        block = self.max_batch // self.blocks
        for slots in [own] + [(own + block) % self.max_batch] * (self.blocks > 1):
          slate.cache = self.decoder.put_rows(slate.cache, cache, slots, np.zeros(rows))
    for rows in counts:
      slate.settle(rows)
      for reads in self.reads:
        picked, slate.cache = self.decoder.step(
            self.params, slate.cache, slate.token[slate.slots], slate.position[slate.slots],
            slate.keys, slate.picks[slate.slots], slate.sampling, top, filled=reads)
        jax.block_until_ready(picked)
      slate.cache = self.decoder.move_rows(slate.cache, np.zeros(rows), np.full(rows, self.max_batch))
    self._cache = jax.block_until_ready(slate.cache)

  def _empty_cache(self):
    cache, self._cache = self._cache, None
    return cache if cache is not None else self.decoder.empty_cache(self.max_batch, self.window)

  def _admit(self, rows):
    """Score and prefill the new rows, take their first tokens, and put the rows still
    going into the slate."""
    choices = [c for _, c in rows]
    slate = self._slate or Slate(None, self.max_batch, self.blocks)
    count, at, blocks_n = slate.places(len(choices), self.row_buckets)  # row j: prefill row at[j]
    pad = Choice([], 0, generate.Sampling(), 0)
    pad.finish_reason = "padding"
    padded = [pad] * count
    for j, c in zip(at, choices):
      padded[j] = c
    width = generate.bucket_width(1 + len(self.lead) + max(len(c.prompt) for c in padded), self.window)
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
      for (job, c), r in zip(rows, at):
        if c.echo and c.logprobs is not None:
          cols = slice(width - len(c.prompt), width)
          with job.lock:
            c.prompt_logprobs = [None] + [float(x) for x in token_lp[r, cols][1:]]
            c.prompt_top = [None] + [list(zip(top_ids[r, i, :c.logprobs].tolist(),
                                              top_lp[r, i, :c.logprobs].tolist()))
                                     for i in range(cols.start + 1, width)]
      if not self.prefix_lm:
        picked = causal_pick
    for job, c in rows:
      if c.max_tokens == 0:
        self._finish(job, c, "length")
    cache, heads = None, [c.prompt for c in padded]
    if any(c.max_tokens > 1 for c in choices) or (
        picked is None and any(c.max_tokens for c in choices)):
      heads = [self._head(c) for c in padded]  # a long prompt's first chunk
      if heads != [c.prompt for c in padded]:
        width = generate.bucket_width(1 + len(self.lead) + max(len(h) for h in heads),
                                      self.window)
        batch = generate.prompt_batch(heads, self.prefix_lm, width, self.lead,
                                      self.tokenizer.bos_id)
      picked, cache = self.decoder.prefill(self.params, batch, keys, sampling, width, top)
    whole = [j for j, (_, c) in enumerate(rows) if len(heads[at[j]]) == len(c.prompt)]
    if picked is not None:  # a chunked row picks after its last chunk
      self._take_picks([rows[j] for j in whole], picked, [at[j] for j in whole])
    self._notify(rows)
    joining = [j for j, (_, c) in enumerate(rows) if not c.finished]
    if joining:
      self._join(rows, joining, cache, heads, width, at, blocks_n)

  def _head(self, c):
    """The prompt tokens of c prefilled on joining: all, or a long prompt's first chunk."""
    if not self.chunk or c.max_tokens == 0:
      return c.prompt
    return c.prompt[:self.chunk - 1 - len(self.lead)]

  def _join(self, rows, joining, cache, heads, width, at, blocks_n):
    """Put rows[j] for j in `joining` (row at[j] of the prefilled `cache`, holding its
    prompt's first len(heads[at[j]]) tokens) into the free slot that comes first in the
    slate's fill order within block blocks_n[j] of the cache (Slate.places); a row
    with more of its prompt to prefill waits for its chunks."""
    slate = self._slate
    if slate is None:
      slate = Slate(self._empty_cache(), self.max_batch, self.blocks)
    slots = slate.slots_for([blocks_n[j] for j in joining])
    slots_n = np.full(len(heads), self.max_batch, np.int32)  # out of range: put nowhere
    shift = np.zeros(len(slots_n), np.int32)
    for j, s in zip(joining, slots):
      r, c = at[j], rows[j][1]
      filled = 1 + len(self.lead) + len(heads[r])
      slots_n[r], shift[r] = s, width - filled
      rest = c.prompt[len(heads[r]):] or None
      slate.put(s, rows[j], 0 if rest else c.tokens[-1], filled, c.seed, rest)
    slate.cache = self.decoder.put_rows(slate.cache, cache, slots_n, shift)
    self._settle(slate)
    self._slate = slate

  def _settle(self, slate):
    """Step on the smallest bucket that holds every live row."""
    top = max(slate.rank(s) for s in slate.live())
    slate.settle(next(b for b in self.row_buckets if b > top))

  def _pack(self, slate, live):
    """Move the live rows past the bucket their number needs into free slots below it."""
    need = next(b for b in self.row_buckets if b >= len(live))
    movers = [s for s in live if slate.rank(s) >= need]
    if not movers:
      return
    free = sorted((s for s, row in enumerate(slate.rows) if row is None and slate.rank(s) < need),
                  key=slate.rank)
    pairs = list(zip(movers, free))
    count = next(b for b in self.row_buckets if b >= len(pairs))  # one compile per bucket
    from_n, to_n = np.zeros(count, np.int32), np.full(count, self.max_batch, np.int32)
    from_n[:len(pairs)], to_n[:len(pairs)] = zip(*pairs)
    slate.cache = self.decoder.move_rows(slate.cache, from_n, to_n)
    slate.move(pairs)

  # --- one step --------------------------------------------------------------
  def _step(self):
    slate = self._slate
    slots, decoding = slate.slots, slate.decoding()
    order = {s: i for i, s in enumerate(slots)}
    at = [order[s] for s in decoding]  # their rows in the step
    live_B = np.zeros(len(slots), np.int32)
    live_B[at] = 1  # rows still prefilling keep their cache
    filled = int(slate.position[decoding].max()) + 1  # a row's slot = its position
    picked, slate.cache = self.decoder.step(self.params, slate.cache, slate.token[slots],
                                            slate.position[slots], slate.keys,
                                            slate.picks[slots], slate.sampling,
                                            generate.LOGPROBS_MAX, filled, live_B)
    self.steps += 1
    slate.set_rows("position", decoding, slate.position[decoding] + 1)
    slate.set_rows("picks", decoding, slate.picks[decoding] + 1)
    taken = [slate.rows[s] for s in decoding]
    self._take_picks(taken, picked, at)
    self._notify(taken)
    slate.set_rows("token", decoding, np.asarray(picked.token)[at])
    self._retire(slate)

  def _prefill_chunk(self):
    """One more chunk of every prefilling row's prompt, written into its slot; a row
    whose prompt is then whole picks its first token and decodes from the next step.
    The chunk runs on the prefilling rows alone, padded to a row bucket with other
    slots (which it leaves as they were); with the rows split over batch shards, each
    shard runs the same number of rows, its own prefilling ones padded with its other
    slots (kv_cache.Entry: each shard reads and writes only its rows)."""
    slate, width = self._slate, self.chunk
    for s in slate.live():
      job, c = slate.rows[s]
      if slate.pending[s] is not None and job.cancelled and not c.finished:
        self._finish(job, c, "cancelled")
        self.cancelled_rows += 1
    prefilling = [s for s in slate.live()
                  if slate.pending[s] is not None and not slate.rows[s][1].finished]
    if prefilling:
      block = self.max_batch // self.blocks
      own = [[s for s in prefilling if s // block == d] for d in range(self.blocks)]
      per = next(b for b in self.row_buckets if b >= self.blocks * max(map(len, own)))
      per //= self.blocks
      slots = []
      for d, mine in enumerate(own):
        slots += mine + [s for s in range(d * block, (d + 1) * block) if s not in mine][
            :per - len(mine)]
      keys = generate.row_keys(slate.seeds[slots])
      sampling = generate.sampling_rows([slate.samplings[s] for s in slots])
      tokens = np.zeros((len(slots), width), np.int32)
      positions = np.zeros((len(slots), width), np.int32)
      counts = np.zeros(len(slots), np.int32)
      at = [i for i, s in enumerate(slots) if s in prefilling]
      for i in at:
        s = slots[i]
        part = slate.pending[s][:width]
        tokens[i, :len(part)], counts[i] = part, len(part)
        positions[i] = slate.position[s] + np.arange(width)
      moved = [slots[i] for i in at]
      filled = int((slate.position[moved] + counts[at]).max())
      picked, slate.cache = self.decoder.extend(self.params, slate.cache, tokens, positions,
                                                counts, keys, 0, sampling,
                                                generate.LOGPROBS_MAX, filled, slots)
      self.chunks += 1
      slate.set_rows("position", moved, slate.position[moved] + counts[at])
      done = []
      for i, s in zip(at, moved):
        slate.pending[s] = slate.pending[s][width:] or None
        if slate.pending[s] is None:
          done.append(i)
      if done:
        ended = [slots[i] for i in done]
        self._take_picks([slate.rows[s] for s in ended], picked, done)
        slate.set_rows("token", ended, np.asarray(picked.token)[done])
        slate.set_rows("picks", ended, 1)
    self._notify([row for row in slate.rows if row is not None])
    self._retire(slate)

  def _retire(self, slate):
    """Free the slots of the rows that have ended; the rest move down into the bucket
    their number needs (or, with none left, the slate ends and its cache is kept)."""
    before = slate.live()
    for s in before:
      if slate.rows[s][1].finished:
        slate.free(s)
    live = slate.live()
    if not live:
      self._slate, self._cache = None, slate.cache
    elif len(live) < len(before):
      self._pack(slate, live)
      self._settle(slate)

  def _take_picks(self, rows, picked, at=None):
    """Give rows[i] the pick of batch row at[i] (default i): its token, log-probability
    and top alternatives; a row whose client went away stops instead."""
    token = np.asarray(picked.token)
    logprob, top_ids, top_lp = jax.device_get((picked.logprob, picked.top_ids,
                                               picked.top_logprobs))
    for i, (job, c) in enumerate(rows):
      r = i if at is None else at[i]
      if c.finished:
        continue
      if job.cancelled:
        self._finish(job, c, "cancelled")
        self.cancelled_rows += 1
        continue
      self._append(job, c, int(token[r]), float(logprob[r]),
                   list(zip(top_ids[r, :c.logprobs or 0].tolist(),
                            top_lp[r, :c.logprobs or 0].tolist())))

  @staticmethod
  def _notify(rows):
    for job in {id(j): j for j, _ in rows}.values():
      job.notify()

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
