"""Evaluate trained runs: per-language loss and bits per byte, and the built-in
multiple-choice tasks, from each run's latest checkpoint.

  python -m bigsci_jax.evaluate --model_dir=DIR [--model_dir=DIR2 ...] [--tasks=next_sentence/en,...]
      [--split=validation|test] [--limit=200] [--out=DIR]

The checkpoint is restored onto whatever devices are present (all of them data
parallel when they divide the micro-batch, else one). Writes eval_results.json
in each model_dir and prints a table; with several model_dirs, also
comparison.md and comparison.png in --out (default: the first model_dir). The
last stdout line is a JSON object of the results. Tasks need the run's
SentencePiece vocabulary, so a synthetic run gets losses only.
"""

import argparse
import dataclasses
import json
import os
import sys

import jax

from bigsci_jax import likelihood, loop, mc_tasks
from bigsci_jax.config import ConfigError, MeshConfig, RunConfig
from bigsci_jax.corpus import CorpusError

TASKS = {"next_sentence": mc_tasks.next_sentence_items, "translation": mc_tasks.translation_items}


class EvaluationError(ValueError):
  """The evaluation cannot run as asked; the message says why and what to do."""


def default_tasks(run: RunConfig, languages):
  if run.data.corpus != "handbook":
    return []
  return ([f"next_sentence/{lang}" for lang in languages]
          + [f"translation/{lang}" for lang in languages if lang != "en"])


def _parse_task(name):
  kind, _, lang = name.partition("/")
  if kind not in TASKS or not lang:
    raise EvaluationError(f"unknown task {name!r}: tasks are next_sentence/<lang> and "
                          f"translation/<lang> (e.g. next_sentence/fr).")
  return kind, lang


def _mesh_config(run: RunConfig):
  """All devices data parallel when they divide the micro-batch, else one device."""
  if run.batch.micro_batch_size % jax.device_count() == 0:
    return MeshConfig(data=-1, fsdp=1, tensor=1)
  return MeshConfig(1, 1, 1)


def restore(model_dir):
  """(run config on this machine's mesh, its loop.Runtime, the latest checkpoint's
  params, that checkpoint's step)."""
  run = loop.read_run(model_dir)
  run = dataclasses.replace(run, mesh=_mesh_config(run))
  runtime = loop.Runtime(run)
  state, _, step = runtime.restore_latest(model_dir)
  return run, runtime, state.params, step


def evaluate_dir(model_dir, tasks=None, split="validation", limit=200):
  run, runtime, params, step = restore(model_dir)
  model = runtime.model
  _, eval_rows, token_bytes = loop.make_data(run, split)
  eval_sets = loop.make_eval_sets(run, eval_rows, token_bytes, split)
  result = {"model_dir": model_dir, "step": step, "split": split,
            **loop.evaluate(runtime.eval_step, params, eval_sets, runtime.mesh,
                            run.batch.micro_batch_size)}
  languages = sorted(eval_rows) if run.data.mixture != "synthetic" else []
  names = default_tasks(run, languages) if tasks is None else tasks
  parsed = [_parse_task(n) for n in names]
  if parsed:
    if run.data.mixture == "synthetic":
      raise EvaluationError(f"{model_dir} trained on synthetic data, which has no vocabulary for "
                            f"text tasks; evaluate losses only (--tasks=).")
    from bigsci_jax.tasks import handbook  # the data pipeline: the run's vocabulary
    import sentencepiece as spm
    prepared = handbook.prepare(run.data, prefix_lm=run.model.mask == "prefix")
    sp = spm.SentencePieceProcessor(model_file=prepared.vocab_path)
    loglik = likelihood.make_loglik_fn(model, params, sp.encode, run.batch.seq_len,
                                       run.batch.micro_batch_size)
    result["tasks"] = {name: mc_tasks.score(TASKS[kind](lang, limit=limit), loglik)
                       for name, (kind, lang) in zip(names, parsed)}
  loop.write_atomic(os.path.join(model_dir, "eval_results.json"),
                    json.dumps(result, indent=1, sort_keys=True) + "\n")
  return result


def _rows(result):
  rows = {k: v for k, v in result.items() if k.startswith(("loss", "bpb"))}
  for name, scores in result.get("tasks", {}).items():
    rows[f"{name} acc"] = scores["acc"]
    rows[f"{name} acc_norm"] = scores["acc_norm"]
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
  args = p.parse_args(argv)
  tasks = None if args.tasks is None else [t for t in args.tasks.split(",") if t]
  try:
    results = [evaluate_dir(d, tasks, args.split, args.limit) for d in args.model_dir]
  except (EvaluationError, ConfigError, CorpusError, loop.TrainingError, loop.RunNotFound) as e:
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
