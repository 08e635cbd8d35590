"""Run a plan: train each run in turn (resuming interrupted ones, skipping finished
ones) and collect the final evaluation losses into `runs.csv`, and, when the runs
evaluate per language, one row per run and language into `runs_by_lang.csv`
(`loss` = that language's loss in nats per token, plus its `bpb`), for
`scaling fit --by lang`; every logged training step goes into `curves.csv`
(tokens and FLOPs seen so far, train loss), for `scaling fit --approach 1`. A
language plan (scaling/languages.py) also gets languages.csv, transfer.csv and
sizes.json."""

import csv
import json
import os

import tqdm

from bigsci_jax import loop
from bigsci_jax.config import RunConfig
from bigsci_jax.metrics import read_metrics

RESULT_COLUMNS = ("run", "budget", "params", "params_non_embedding", "tokens", "flops",
                  "flops_kaplan", "flops_chinchilla", "flops_porian", "loss")


LANG_COLUMNS = RESULT_COLUMNS + ("lang", "bpb")
CURVE_COLUMNS = RESULT_COLUMNS + ("step",)
_FLOPS = ("flops", "flops_kaplan", "flops_chinchilla", "flops_porian")


def _curve(model_dir, planned):
  """The run's training curve as rows: FLOP columns scaled from the plan's by tokens seen."""
  rows = []
  for line in read_metrics(model_dir, "train"):
    share = line["tokens_seen"] / float(planned["tokens"])
    rows.append({**planned, "tokens": line["tokens_seen"], "loss": line["loss"],
                 "step": line["step"],
                 **{k: float(planned[k]) * share for k in _FLOPS if k in planned}})
  return rows


def _final_eval(model_dir, train_steps):
  rows = [r for r in read_metrics(model_dir, "eval") if r["step"] == train_steps]
  return rows[-1] if rows else None


def _write_csv(path, columns, rows):
  tmp = path + ".tmp"
  with open(tmp, "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)
  os.replace(tmp, path)


def run_plan(plan_dir, progress=True):
  """Train every run of plan_dir; returns the rows written to plan_dir/runs.csv."""
  with open(os.path.join(plan_dir, "plan.csv"), newline="") as f:
    plan = list(csv.DictReader(f))
  results, by_lang, curves, finished = [], [], [], []
  for row in tqdm.tqdm(plan, desc="sweep", disable=not progress):
    with open(os.path.join(plan_dir, "configs", f"{row['run']}.json")) as f:
      run = RunConfig.from_dict(json.load(f))
    model_dir = os.path.join(plan_dir, "runs", row["run"])
    final = _final_eval(model_dir, run.train.train_steps)
    if final is None:  # not finished: train, resuming from a checkpoint if there is one
      loop.train(run, model_dir, progress=False)
      final = _final_eval(model_dir, run.train.train_steps)
    planned = {k: row[k] for k in RESULT_COLUMNS if k in row}
    results.append({**planned, "loss": final["loss"]})
    finished.append((row, final, run))
    curves += _curve(model_dir, planned)
    for key in sorted(k for k in final if k.startswith("loss/")):
      lang = key.split("/", 1)[1]
      by_lang.append({**planned, "lang": lang, "loss": final[key], "bpb": final[f"bpb/{lang}"]})
  _write_csv(os.path.join(plan_dir, "runs.csv"), RESULT_COLUMNS, results)
  _write_csv(os.path.join(plan_dir, "curves.csv"), CURVE_COLUMNS, curves)
  if by_lang:
    _write_csv(os.path.join(plan_dir, "runs_by_lang.csv"), LANG_COLUMNS, by_lang)
  if plan and "kind" in plan[0]:  # a language plan (scaling/languages.py)
    from bigsci_jax.scaling import languages
    languages.write_tables(plan_dir, finished)
  return results
