"""Run a plan: train each run in turn (resuming interrupted ones, skipping finished
ones) and collect the final evaluation losses into `runs.csv`."""

import csv
import json
import os

import tqdm

from bigsci_jax import loop
from bigsci_jax.config import RunConfig
from bigsci_jax.metrics import read_metrics

RESULT_COLUMNS = ("run", "budget", "params", "params_non_embedding", "tokens", "flops",
                  "flops_kaplan", "flops_chinchilla", "flops_porian", "loss")


def _final_eval_loss(model_dir, train_steps):
  rows = [r for r in read_metrics(model_dir, "eval") if r["step"] == train_steps]
  return rows[-1]["loss"] if rows else None


def run_plan(plan_dir, progress=True):
  """Train every run of plan_dir; returns the rows written to plan_dir/runs.csv."""
  with open(os.path.join(plan_dir, "plan.csv"), newline="") as f:
    plan = list(csv.DictReader(f))
  results = []
  for row in tqdm.tqdm(plan, desc="sweep", disable=not progress):
    with open(os.path.join(plan_dir, "configs", f"{row['run']}.json")) as f:
      run = RunConfig.from_dict(json.load(f))
    model_dir = os.path.join(plan_dir, "runs", row["run"])
    loss = _final_eval_loss(model_dir, run.train.train_steps)
    if loss is None:  # not finished: train, resuming from a checkpoint if there is one
      loop.train(run, model_dir, progress=False)
      loss = _final_eval_loss(model_dir, run.train.train_steps)
    results.append({**{k: row[k] for k in RESULT_COLUMNS if k in row}, "loss": loss})
  tmp = os.path.join(plan_dir, "runs.csv.tmp")
  with open(tmp, "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=RESULT_COLUMNS)
    writer.writeheader()
    writer.writerows(results)
  os.replace(tmp, os.path.join(plan_dir, "runs.csv"))
  return results
