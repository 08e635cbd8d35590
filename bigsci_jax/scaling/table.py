"""The scaling runs table: a CSV with `params`, `tokens`, `loss`, optional `flops`
and grouping columns (`budget`, `run`, `step`, `lang`, ...). DESIGN.md, "Scaling runs table".
"""

import csv
import dataclasses
import json
import math

import numpy as np

NUMERIC = ("params", "tokens", "loss", "flops", "budget", "step")


class TableError(ValueError):
  """The runs table is unusable; the message says which column or row and what to do."""


def read_json(path, what, to_write):
  """The JSON value in `path`; a missing file or bad JSON is a TableError naming `what`
  the file is, with `to_write` (how to get one) for a missing file."""
  try:
    with open(path) as f:
      return json.load(f)
  except FileNotFoundError:
    raise TableError(f"{what} {path} does not exist; {to_write}.") from None
  except json.JSONDecodeError as e:
    raise TableError(f"{what} {path} is not valid JSON ({e.msg}, line {e.lineno}).") from None


@dataclasses.dataclass
class Runs:
  """Columns as numpy arrays; `flops` defaults to 6 * params * tokens."""
  params: np.ndarray
  tokens: np.ndarray
  loss: np.ndarray
  flops: np.ndarray
  extra: dict  # other columns: float arrays where numeric, else arrays of str
  source: str = "<table>"

  def __len__(self):
    return len(self.loss)

  def take(self, index):
    """The rows at `index` (an integer array or a boolean mask), as a new Runs."""
    return Runs(self.params[index], self.tokens[index], self.loss[index], self.flops[index],
                {k: v[index] for k, v in self.extra.items()}, self.source)


def _number(text, column, line, source):
  try:
    value = float(text)
  except ValueError:
    raise TableError(f"{source}, line {line}: column '{column}' holds {text!r}, which is not a "
                     f"number; write plain numbers (scientific notation allowed).") from None
  if not math.isfinite(value):
    raise TableError(f"{source}, line {line}: column '{column}' holds {text!r}; values must be "
                     f"finite numbers.")
  return value


def _all_numbers(values):
  try:
    return all(math.isfinite(float(v)) for v in values)
  except (TypeError, ValueError):
    return False


def from_rows(rows, source="<table>"):
  """Validate a list of dicts (strings or numbers) into Runs."""
  if not rows:
    raise TableError(f"{source} has no rows; it needs a header and at least one run.")
  header = list(rows[0])
  missing = [c for c in ("params", "tokens", "loss") if c not in header]
  if missing and not ("flops" in header and missing == ["tokens"]):
    raise TableError(f"{source} is missing column(s) {', '.join(missing)}; a runs table needs "
                     f"params, tokens (or flops) and loss.")
  columns = {c: [] for c in header}
  for line, row in enumerate(rows, start=2):
    for c in header:
      value = row.get(c)
      if c in NUMERIC:
        if value in (None, "") and c in ("flops", "budget", "step"):
          value = math.nan
        else:
          value = _number(value, c, line, source)
          if c in ("params", "tokens", "loss", "flops", "budget") and value <= 0:
            raise TableError(f"{source}, line {line}: column '{c}' is {value:g}; it must be "
                             f"positive.")
      columns[c].append(value)
  arrays = {c: (np.asarray(v, float) if c in NUMERIC or _all_numbers(v) else np.asarray(v, str))
            for c, v in columns.items()}
  params, loss = arrays.pop("params"), arrays.pop("loss")
  flops = arrays.pop("flops", np.full(len(loss), math.nan))
  tokens = arrays.pop("tokens", flops / (6 * params))
  flops = np.where(np.isnan(flops), 6 * params * tokens, flops)
  return Runs(params, tokens, loss, flops, arrays, source)


def read_csv(path):
  """A runs CSV -> Runs, or one TableError sentence naming the problem."""
  try:
    with open(path, newline="") as f:
      rows = list(csv.DictReader(f))
  except FileNotFoundError:
    raise TableError(f"runs table {path} does not exist; pass the CSV written by "
                     f"`scaling run` or any CSV with params, tokens and loss.") from None
  return from_rows(rows, source=path)
