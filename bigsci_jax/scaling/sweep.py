"""Run a plan: train each run in turn (resuming interrupted ones, skipping finished
ones) and collect the final evaluation losses into `runs.csv`, and, when the runs
evaluate per language, one row per run and language into `runs_by_lang.csv`
(`loss` = that language's loss in nats per token, plus its `bpb`), for
`scaling fit --by lang`; every logged training step goes into `curves.csv`
(tokens and FLOPs seen so far, train loss), for `scaling fit --approach 1`. A
language plan (scaling/languages.py) also gets languages.csv, transfer.csv and
sizes.json."""

import csv
import dataclasses
import json
import os

import tqdm

from bigsci_jax import loop
from bigsci_jax.config import RunConfig
from bigsci_jax.metrics import read_metrics
from bigsci_jax.optim import cooldown_start

RESULT_COLUMNS = ("run", "budget", "params", "params_non_embedding", "tokens", "flops",
                  "flops_kaplan", "flops_chinchilla", "flops_porian", "loss")


RUNS_COLUMNS = RESULT_COLUMNS + ("tokens_trained",)
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


def _length_free(run: RunConfig):
  """What a run is apart from its length (and when it saves): runs alike in this differ
  only in train_steps."""
  train = dataclasses.replace(run.train, train_steps=1, checkpoint_every=1, keep_steps=())
  return json.dumps(dataclasses.replace(run, train=train).to_dict(), sort_keys=True)


def branch_runs(runs, model_dirs):
  """{name: RunConfig} -> the same runs, 'wsd' runs alike but for their length arranged
  as one trunk (the longest, keeping a checkpoint at every branch point) and branches
  that continue it from their own cooldown start: a branch trains only its cooldown
  and ends bit for bit where it would end trained alone (its learning rates up to
  there are the trunk's; model_dirs: {name: where it trains}). Returns ({name: RunConfig},
  {branch name: its step in the trunk}); trunks come first."""
  groups = {}
  for name, run in runs.items():
    if run.optimizer.decay == "wsd" and not run.train.branch_from:
      groups.setdefault(_length_free(run), []).append(name)
  arranged, branched = dict(runs), {}
  for names in groups.values():
    trunk = max(names, key=lambda n: runs[n].train.train_steps)
    points = {}
    for name in names:
      run = runs[name]
      at = cooldown_start(run.optimizer, run.train.train_steps)
      if name != trunk and 0 < at < run.train.train_steps < runs[trunk].train.train_steps:
        points[name] = at
    if not points:
      continue
    base = runs[trunk]
    arranged[trunk] = dataclasses.replace(base, train=dataclasses.replace(
        base.train, keep_steps=tuple(sorted(set(points.values()) | set(base.train.keep_steps)))))
    for name, at in points.items():
      arranged[name] = dataclasses.replace(runs[name], train=dataclasses.replace(
          runs[name].train, branch_from=model_dirs[trunk], branch_step=at))
    branched.update(points)
  order = sorted(arranged, key=lambda n: n in branched)  # trunks (and lone runs) first
  return {n: arranged[n] for n in order}, branched


def run_plan(plan_dir, progress=True):
  """Train every run of plan_dir; returns the rows written to plan_dir/runs.csv.

  'wsd' runs of one model and one set of hyperparameters share their trunk
  (branch_runs); each row's `tokens_trained` counts the tokens it trained itself (a
  branch: its cooldown)."""
  with open(os.path.join(plan_dir, "plan.csv"), newline="") as f:
    plan = list(csv.DictReader(f))
  configs = {}
  for row in plan:
    with open(os.path.join(plan_dir, "configs", f"{row['run']}.json")) as f:
      configs[row["run"]] = RunConfig.from_dict(json.load(f))
  model_dirs = {name: os.path.join(plan_dir, "runs", name) for name in configs}
  arranged, branched = branch_runs(configs, model_dirs)
  for name, run in tqdm.tqdm(arranged.items(), total=len(arranged), desc="sweep",
                             disable=not progress):
    if _final_eval(model_dirs[name], run.train.train_steps) is None:
      # not finished: train, resuming from a checkpoint if there is one
      loop.train(run, model_dirs[name], progress=False)
  results, by_lang, curves, finished = [], [], [], []
  for row in plan:
    run = configs[row["run"]]
    model_dir = model_dirs[row["run"]]
    final = _final_eval(model_dir, run.train.train_steps)
    planned = {k: row[k] for k in RESULT_COLUMNS if k in row}
    own_steps = run.train.train_steps - branched.get(row["run"], 0)
    results.append({**planned, "loss": final["loss"],
                    "tokens_trained": own_steps * run.batch.batch_size * run.batch.seq_len})
    finished.append((row, final, run))
    curves += _curve(model_dir, planned)
    for key in sorted(k for k in final if k.startswith("loss/")):
      lang = key.split("/", 1)[1]
      by_lang.append({**planned, "lang": lang, "loss": final[key], "bpb": final[f"bpb/{lang}"]})
  _write_csv(os.path.join(plan_dir, "runs.csv"), RUNS_COLUMNS, results)
  _write_csv(os.path.join(plan_dir, "curves.csv"), CURVE_COLUMNS, curves)
  if by_lang:
    _write_csv(os.path.join(plan_dir, "runs_by_lang.csv"), LANG_COLUMNS, by_lang)
  if plan and "kind" in plan[0]:  # a language plan (scaling/languages.py)
    from bigsci_jax.scaling import languages
    languages.write_tables(plan_dir, finished)
  return results
