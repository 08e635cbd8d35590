"""Evaluate trained runs: per-language loss and bits per byte, and the built-in
multiple-choice tasks, from each run's latest checkpoint.

  python -m bigsci_jax.evaluate --model_dir=DIR [--model_dir=DIR2 ...] [--tasks=next_sentence/en,cloze/fr,...]
      [--split=validation|test] [--limit=200] [--out=DIR] [--prompt_dir=P] [--offload=host]
      [--mesh=DATAxFSDPxTENSOR]

The checkpoint is restored onto whatever devices are present (all of them data
parallel when they divide the micro-batch, else one), or over --mesh (as train's
MeshConfig; e.g. 1x1x4 splits every layer over 4 devices, for a model one device
cannot hold; its data x fsdp shards must divide the micro-batch). Writes eval_results.json
in each model_dir and prints a table; with several model_dirs, also
comparison.md and comparison.png in --out (default: the first model_dir). The
last stdout line is a JSON object of the results. Tasks (mc_tasks:
next_sentence/<lang>, translation/<lang>, cloze/<lang>) read text with the run's
tokenizer (model_dir/vocab.model, or an imported model's tokenizer.json), so a run
without one (synthetic data) gets losses only. With --prompt_dir (an adapter from
python -m bigsci_jax.prompt_tune, one model_dir) the tasks are scored with it applied
(a soft prompt starting every input, or LoRA factors merged into the weights; the
corpus losses stay the base model's) and eval_results.json goes to the adapter's
directory.
--offload=host keeps the parameters in pinned host memory and brings each layer's
weights to the device as it runs (model.Transformer): slower, for models larger
than the devices' memory.
"""

import argparse
import dataclasses
import json
import os
import sys

import jax

from bigsci_jax import held_out, likelihood, loop, mc_tasks, sharding, tokenizer
from bigsci_jax.config import OFFLOAD, ConfigError, MeshConfig, RunConfig, parse_mesh
from bigsci_jax.corpus import CorpusError

TASKS = {"next_sentence": mc_tasks.next_sentence_items,
         "translation": mc_tasks.translation_items,
         "cloze": mc_tasks.cloze_items,
         "word_choice": mc_tasks.word_choice_items}


class EvaluationError(ValueError):
  """The evaluation cannot run as asked; the message says why and what to do."""


def default_tasks(run: RunConfig, languages):
  if run.data.corpus != "handbook":
    return []
  return ([f"next_sentence/{lang}" for lang in languages]
          + [f"translation/{lang}" for lang in languages if lang != "en"]
          + [f"cloze/{lang}" for lang in languages if lang not in mc_tasks.NO_SPACES])


def parse_task(name):
  kind, _, lang = name.partition("/")
  if kind not in TASKS or not lang:
    raise EvaluationError(f"unknown task {name!r}: tasks are next_sentence/<lang>, "
                          f"translation/<lang>, cloze/<lang> and word_choice/<lang> (e.g. "
                          f"next_sentence/fr).")
  return kind, lang


def _mesh_config(batch_size):
  """All devices data parallel when they divide the batch, else one device."""
  if batch_size % jax.device_count() == 0:
    return MeshConfig(data=-1, fsdp=1, tensor=1)
  return MeshConfig(1, 1, 1)


def restore(model_dir, batch_size=None, offload="none", mesh=None):
  """(run config on this machine's mesh, its loop.Runtime, the latest checkpoint's
  params, that checkpoint's step). `mesh` ('DATAxFSDPxTENSOR', as train's MeshConfig;
  -1 takes the remaining devices) places the model over those devices, e.g. '1x1x4'
  splits every layer's heads and MLP over 4 (a model too large for one device); its
  data and fsdp shards must divide batch_size. By default the mesh is data parallel
  over every device when they divide batch_size (default: the run's micro-batch), else
  one device. Only the parameters are read: on the devices, or in pinned host memory
  for offload="host" (then runtime.model brings them to the device layer by layer)."""
  run = loop.read_run(model_dir)
  rows = batch_size or run.batch.micro_batch_size
  placed = MeshConfig(**parse_mesh(mesh)) if mesh else _mesh_config(rows)
  runtime = loop.Runtime(dataclasses.replace(run, mesh=placed), offload)
  shards = sharding.batch_shards(runtime.mesh)
  if mesh and rows % shards:
    raise EvaluationError(f"--mesh={mesh} splits each batch over {shards} data x fsdp shards, "
                          f"which do not divide its {rows} rows; make the batch a "
                          f"multiple of {shards} or put fewer devices on data and fsdp.")
  params, step = runtime.restore_params(model_dir)
  return runtime.run, runtime, params, step


def make_scorer(model_dir, run, runtime, params, batch_size=None, prompt_dir=None):
  """A likelihood.Scorer of these params (with the adapter of prompt_dir applied, if
  given) with the run's vocabulary."""
  from bigsci_jax.adapt import store
  params = store.attach_dir(params, prompt_dir, run.model)
  return likelihood.Scorer(runtime.model, params, loop.read_tokenizer(model_dir), run.batch.seq_len,
                           batch_size or run.batch.micro_batch_size, runtime.mesh)


def score_items(name, items, scorer, outcomes=False):
  """The metrics of task `name` on its items (TASKS) with a likelihood.Scorer
  (outcomes=True: with each item's, mc_tasks.score)."""
  if parse_task(name)[0] == "cloze":
    return mc_tasks.score_cloze(items, scorer, outcomes=outcomes)
  return mc_tasks.score(items, lambda requests: scorer.loglikelihood(requests)[0], outcomes)


def task_items(name, limit=200, split="test"):
  """The items of task `name` (TASKS) from `split` of its corpus, at most `limit`."""
  kind, lang = parse_task(name)
  return TASKS[kind](lang, limit=limit, split=split)


def score_task(name, scorer, limit=200, outcomes=False):
  return score_items(name, task_items(name, limit), scorer, outcomes)


METRICS = ("acc", "acc_norm", "exact_match", "ppl")


class TaskEval:
  """Built-in tasks scored again and again (training-time evaluation,
  TrainConfig.eval_tasks): the items are read once, when it is made, so a wrong name or
  language stops before training; scores(scorer) gives {'<task>/<metric>': value}."""

  def __init__(self, names, limit):
    self.items = {name: task_items(name, limit) for name in names}

  def scores(self, scorer):
    out = {}
    for name, items in self.items.items():
      values = score_items(name, items, scorer)
      out.update({f"{name}/{m}": values[m] for m in METRICS if m in values})
    return out


def evaluate_dir(model_dir, tasks=None, split="validation", limit=200, prompt_dir=None,
                 offload="none", mesh=None):
  for name in tasks or ():
    parse_task(name)  # a wrong name stops before anything is restored
  run, runtime, params, step = restore(model_dir, offload=offload, mesh=mesh)
  if tasks and tokenizer.from_dir(model_dir) is None:
    raise EvaluationError(f"{model_dir} trained on synthetic data, which has no vocabulary for "
                          f"text tasks; evaluate losses only (--tasks=).")
  corpus = loop.make_data(run, split, model_dir)
  eval_sets = held_out.make_eval_sets(run, corpus.evals, corpus.token_bytes, split)
  result = {"model_dir": model_dir, "step": step, "split": split, "prompt_dir": prompt_dir,
            **held_out.evaluate(runtime.eval_step, params, eval_sets, runtime.mesh,
                            run.batch.micro_batch_size)}
  languages = sorted(corpus.evals) if run.data.mixture != "synthetic" else []
  names = default_tasks(run, languages) if tasks is None else tasks
  if names:
    text_scorer = make_scorer(model_dir, run, runtime, params, prompt_dir=prompt_dir)
    result["tasks"] = {name: score_task(name, text_scorer, limit) for name in names}
  loop.write_atomic(os.path.join(prompt_dir or model_dir, "eval_results.json"),
                    json.dumps(result, indent=1, sort_keys=True) + "\n")
  return result


def _rows(result):
  rows = {k: v for k, v in result.items() if k.startswith(("loss", "bpb"))}
  for name, scores in result.get("tasks", {}).items():
    for metric in METRICS:
      if metric in scores:
        rows[f"{name} {metric}"] = scores[metric]
  return rows


def comparison(results, out_dir):
  """comparison.md (side by side) and comparison.png (bar chart of the shared metrics)."""
  names = [os.path.basename(os.path.normpath(r["model_dir"])) for r in results]
  tables = [_rows(r) for r in results]
  keys = [k for k in tables[0] if all(k in t for t in tables)]
  lines = ["| metric | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
  lines += [f"| {k} | " + " | ".join(f"{t[k]:.4f}" for t in tables) + " |" for k in keys]
  os.makedirs(out_dir, exist_ok=True)
  loop.write_atomic(os.path.join(out_dir, "comparison.md"), "\n".join(lines) + "\n")
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  import numpy as np
  fig, ax = plt.subplots(figsize=(max(6, 0.5 * len(keys) * len(names)), 4))
  width = 0.8 / len(names)
  for i, (name, table) in enumerate(zip(names, tables)):
    ax.bar(np.arange(len(keys)) + i * width, [table[k] for k in keys], width, label=name)
  ax.set_xticks(np.arange(len(keys)) + 0.4 - width / 2, keys, rotation=60, ha="right", fontsize=7)
  ax.legend()
  fig.tight_layout()
  fig.savefig(os.path.join(out_dir, "comparison.png"), dpi=110)
  return os.path.join(out_dir, "comparison.md"), os.path.join(out_dir, "comparison.png")


def main(argv):
  p = argparse.ArgumentParser(prog="python -m bigsci_jax.evaluate", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--model_dir", action="append", required=True)
  p.add_argument("--tasks", default=None, help="comma-separated; default: every built-in task "
                 "for the run's languages; empty: losses only")
  p.add_argument("--split", default="validation", choices=("validation", "test"))
  p.add_argument("--limit", type=int, default=200, help="items per task")
  p.add_argument("--out", default=None)
  p.add_argument("--prompt_dir", default=None, help="an adapter (soft prompt or LoRA) to score the tasks with")
  p.add_argument("--offload", default="none", choices=OFFLOAD,
                 help="host: parameters in pinned host memory, one layer on the device at a time")
  p.add_argument("--mesh", default=None, help="DATAxFSDPxTENSOR: the devices the model is "
                 "placed over (e.g. 1x1x4); default data parallel over all, or one device")
  args = p.parse_args(argv)
  tasks = None if args.tasks is None else [t for t in args.tasks.split(",") if t]
  from bigsci_jax.adapt.store import AdapterError
  try:
    if args.prompt_dir and len(args.model_dir) > 1:
      raise EvaluationError("--prompt_dir goes with one --model_dir (the model it was tuned for).")
    results = [evaluate_dir(d, tasks, args.split, args.limit, args.prompt_dir, args.offload,
                            args.mesh) for d in args.model_dir]
  except (EvaluationError, ConfigError, CorpusError, loop.TrainingError, loop.RunNotFound,
          AdapterError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  for result in results:
    print(f"{result['model_dir']} (step {result['step']}, {result['split']}):")
    for key, value in _rows(result).items():
      print(f"  {key:>28}  {value:.4f}")
  summary = {"results": results}
  if len(results) > 1:
    summary["comparison"] = comparison(results, args.out or args.model_dir[0])
  print(json.dumps(summary))
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
