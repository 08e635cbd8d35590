"""metrics.jsonl + TensorBoard event files, written by process 0 only.

One JSON object per line with `step` and `split` (DESIGN.md, "metrics.jsonl").
On resume, lines past the restored step are dropped (they belong to steps that
will be recomputed), so the file always reads like one uninterrupted run.
"""

import json
import math
import os

import jax
import numpy as np


def _plain(value):
  if isinstance(value, (np.generic, np.ndarray)):
    value = value.item()
  if isinstance(value, float) and not math.isfinite(value):
    return None if math.isnan(value) else value
  return value


def read_metrics(model_dir, split=None):
  path = os.path.join(model_dir, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  with open(path) as f:
    rows = [json.loads(line) for line in f if line.strip()]
  return [r for r in rows if split is None or r["split"] == split]


class MetricsWriter:
  def __init__(self, model_dir, resume_step=0):
    self.enabled = jax.process_index() == 0
    self.path = os.path.join(model_dir, "metrics.jsonl")
    self.tb = None
    if not self.enabled:
      return
    os.makedirs(model_dir, exist_ok=True)
    self._truncate_after(resume_step)
    from tensorboardX import SummaryWriter  # writer only on the logging process
    self.tb = SummaryWriter(logdir=model_dir, flush_secs=10)
    self.file = open(self.path, "a")

  def _truncate_after(self, step):
    """Keep only lines up to `step`; rewrite atomically (temp file, then rename)."""
    if not os.path.exists(self.path):
      return
    with open(self.path) as f:
      lines = [line for line in f if line.strip()]
    kept = [line for line in lines if json.loads(line)["step"] <= step]
    if len(kept) == len(lines):
      return
    tmp = self.path + ".tmp"
    with open(tmp, "w") as f:
      f.writelines(kept)
    os.replace(tmp, self.path)

  def write(self, step, split, values):
    if not self.enabled:
      return
    row = {"step": int(step), "split": split}
    row.update({k: _plain(v) for k, v in values.items()})
    self.file.write(json.dumps(row) + "\n")
    self.file.flush()
    for key, value in row.items():
      if key not in ("step", "split") and isinstance(value, (int, float)):
        self.tb.add_scalar(f"{split}/{key}", value, global_step=int(step))

  def close(self):
    if self.enabled:
      self.file.close()
      self.tb.close()


def bits_per_byte(nll_nats, utf8_bytes):
  """Tokenizer-independent loss: summed token NLL (nats) / (ln 2 * UTF-8 bytes of the text).

  Comparable across vocabularies and languages, where per-token loss is not.
  """
  if utf8_bytes <= 0:
    raise ValueError(f"bits_per_byte needs a positive byte count, got {utf8_bytes}.")
  return nll_nats / (math.log(2) * utf8_bytes)
