"""Batches: the feature contract, the batch-size ramp, a synthetic source, and
host numpy -> global jax.Array.

Batch contract (DESIGN.md): int32 [batch, length] features
  decoder_input_tokens    targets shifted right within each document (0 first)
  decoder_target_tokens   the tokens to predict
  decoder_loss_weights    1 where the loss counts
  decoder_segment_ids     document id within the row, 0 = padding
  decoder_positions       position within the document
  decoder_causal_attention 1 on each document's bidirectional prefix (prefix LM)

This module imports no TensorFlow: the model, the step and the benchmarks use it.
"""

import math
from typing import Any, NamedTuple

import jax
import numpy as np

from bigsci_jax.config import BatchConfig

FEATURES = ("decoder_input_tokens", "decoder_target_tokens", "decoder_loss_weights",
            "decoder_segment_ids", "decoder_positions", "decoder_causal_attention")


class Corpus(NamedTuple):
  """What a run reads: the train source, {eval set: this process's host rows}, the
  UTF-8 bytes each token spells (int64 [vocab], None without a vocabulary) and the
  tokenizer's files ({name: bytes}, bigsci_jax.tokenizer; None for synthetic data)."""
  train: Any
  evals: dict
  token_bytes: Any = None
  vocab_files: dict | None = None


def batch_size_at(cfg: BatchConfig, tokens_seen: int) -> int:
  """Global batch (sequences) for the next step, after `tokens_seen` tokens.

  Without warmup: cfg.batch_size. With it: warmup_start, growing by
  warmup_increment after every warmup_tokens / num_increments tokens.
  """
  if cfg.warmup_start is None:
    return cfg.batch_size
  num_increments = (cfg.batch_size - cfg.warmup_start) // cfg.warmup_increment
  if num_increments == 0:
    return cfg.batch_size
  tokens_per_increment = cfg.warmup_tokens / num_increments
  done = int(tokens_seen // tokens_per_increment)
  return min(cfg.batch_size, cfg.warmup_start + done * cfg.warmup_increment)


def gns_batch_size(cfg: BatchConfig, current: int, b_simple_tokens: float,
                   tokens_per_row: float) -> int:
  """The 'gns' schedule's next global batch (sequences): gns_factor x B_simple in
  sequences, rounded up to a multiple of warmup_increment, within [warmup_start,
  batch_size], never below `current`. A noise scale not measured yet (NaN) keeps it."""
  if not (math.isfinite(b_simple_tokens) and b_simple_tokens > 0 and tokens_per_row > 0):
    return max(current, cfg.warmup_start)
  rows = cfg.gns_factor * b_simple_tokens / tokens_per_row
  step = cfg.warmup_increment
  rounded = cfg.warmup_start + step * max(0, math.ceil((rows - cfg.warmup_start) / step))
  return min(cfg.batch_size, max(current, cfg.warmup_start, rounded))


def batch_schedule(cfg: BatchConfig, num_steps: int, tokens_seen: int = 0):
  """The global batch size of each of the next `num_steps` steps."""
  sizes = []
  for _ in range(num_steps):
    sizes.append(batch_size_at(cfg, tokens_seen))
    tokens_seen += sizes[-1] * cfg.seq_len
  return sizes


class SyntheticLM:
  """Packed documents from a fixed sparse Markov chain: learnable, deterministic.

  Each token has `branching` possible successors with fixed probabilities, so a
  model can go from ln(vocab) nats to about the chain's entropy (~1.1 nats).
  Row i is a pure function of (seed, split, i); the iterator position is the
  number of global rows consumed, so resuming is exact and independent of the
  batch size schedule. Each process builds only its own rows.
  """
  PAD, EOS = 0, 1
  PROBS = np.array([0.55, 0.25, 0.12, 0.08])

  def __init__(self, vocab_size, seq_len, *, seed=0, split="train", mean_doc_len=96,
               prefix_lm=False, process_index=0, process_count=1):
    if vocab_size < 8:
      raise ValueError(f"SyntheticLM needs vocab_size >= 8, got {vocab_size}.")
    self.vocab_size, self.seq_len, self.seed = vocab_size, seq_len, seed
    self.split_id = {"train": 0, "validation": 1, "test": 2}[split]
    self.mean_doc_len, self.prefix_lm = mean_doc_len, prefix_lm
    self.process_index, self.process_count = process_index, process_count
    table_rng = np.random.default_rng([seed, 12345])
    self.successors_VxC = table_rng.integers(2, vocab_size, size=(vocab_size, len(self.PROBS)))
    self.position = 0

  def rows(self, start, count):
    """Global rows [start, start + count) as a dict of int32 [count, L]."""
    n, length = count, self.seq_len
    choice_NxL = np.empty((n, length), np.int64)
    fresh_NxL = np.zeros((n, length), bool)     # first token of a document
    first_tok_NxL = np.zeros((n, length), np.int64)
    segment_NxL = np.zeros((n, length), np.int32)
    position_NxL = np.zeros((n, length), np.int32)
    prefix_NxL = np.zeros((n, length), np.int32)
    weight_NxL = np.zeros((n, length), np.int32)
    lo, hi = max(2, self.mean_doc_len // 2), max(3, 3 * self.mean_doc_len // 2)
    for r in range(n):
      rng = np.random.default_rng([self.seed, self.split_id, start + r])
      choice_NxL[r] = rng.choice(len(self.PROBS), size=length, p=self.PROBS)
      at, seg = 0, 1
      while at < length:
        doc_len = min(int(rng.integers(lo, hi + 1)), length)
        if at + doc_len > length:
          break  # whole documents only; the rest of the row is padding
        span = slice(at, at + doc_len)
        fresh_NxL[r, at] = True
        first_tok_NxL[r, at] = rng.integers(2, self.vocab_size)
        segment_NxL[r, span] = seg
        position_NxL[r, span] = np.arange(doc_len)
        inputs = int(rng.integers(1, doc_len)) if self.prefix_lm else 0
        prefix_NxL[r, at:at + inputs + 1] = 1 if self.prefix_lm else 0
        weight_NxL[r, at + inputs:at + doc_len] = 1
        at, seg = at + doc_len, seg + 1
    # Walk the chain for all rows at once; the last token of each document is EOS.
    target_NxL = np.zeros((n, length), np.int64)
    for j in range(length):
      prev = target_NxL[:, j - 1] if j else np.zeros(n, np.int64)
      step = self.successors_VxC[prev, choice_NxL[:, j]]
      target_NxL[:, j] = np.where(fresh_NxL[:, j], first_tok_NxL[:, j], step)
    next_segment_NxL = np.concatenate([segment_NxL[:, 1:], np.zeros((n, 1), np.int32)], axis=1)
    last_NxL = (segment_NxL > 0) & (next_segment_NxL != segment_NxL)
    target_NxL = np.where(last_NxL, self.EOS, target_NxL)
    target_NxL = np.where(segment_NxL > 0, target_NxL, self.PAD)
    inputs_NxL = np.where(fresh_NxL, 0, np.roll(target_NxL, 1, axis=1))
    inputs_NxL = np.where(segment_NxL > 0, inputs_NxL, self.PAD)
    return {
        "decoder_input_tokens": inputs_NxL.astype(np.int32),
        "decoder_target_tokens": target_NxL.astype(np.int32),
        "decoder_loss_weights": weight_NxL,
        "decoder_segment_ids": segment_NxL,
        "decoder_positions": position_NxL,
        "decoder_causal_attention": prefix_NxL,
    }

  def take(self, num_global_rows):
    """This process's share of the next `num_global_rows` rows."""
    if num_global_rows % self.process_count:
      raise ValueError(f"a global batch of {num_global_rows} rows does not split over "
                       f"{self.process_count} processes.")
    local = num_global_rows // self.process_count
    batch = self.rows(self.position + self.process_index * local, local)
    self.position += num_global_rows
    return batch

  def get_state(self):
    return {"rows": int(self.position)}

  def set_state(self, state):
    self.position = int(state["rows"])


def to_global(host_batch, sharding, global_rows):
  """Host numpy features -> global jax.Arrays; rows are the second-to-last axis.

  [local_m, L] -> [m, L] for evaluation, [A, local_m, L] -> [A, m, L] for training.
  """
  def one(x):
    shape = x.shape[:-2] + (global_rows, x.shape[-1])
    return jax.make_array_from_process_local_data(sharding, x, shape)
  return {k: one(v) for k, v in host_batch.items()}


def split_micro_batches(host_batch, accumulation_steps):
  """[n, L] -> [A, n / A, L]: the leading axis is scanned by the train step."""
  return {k: v.reshape((accumulation_steps, -1) + v.shape[1:]) for k, v in host_batch.items()}


def temperature_rates(sizes, alpha):
  """Sampling rate per language proportional to n_lang^alpha (mT5, XLM-R: alpha = 0.3).

  alpha = 1 samples in proportion to the data; alpha = 0 uniformly.
  """
  if not sizes or any(n <= 0 for n in sizes.values()):
    raise ValueError(f"temperature_rates needs positive sizes, got {sizes}.")
  weights = {lang: float(n) ** alpha for lang, n in sizes.items()}
  total = sum(weights.values())
  return {lang: w / total for lang, w in weights.items()}
