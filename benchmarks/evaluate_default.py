"""Calibration of the built-in tasks: an untrained model against the embedded default
run's checkpoint, on every built-in task of the run's languages.

  python train.py                     # the embedded default -> runs/default
  python benchmarks/evaluate_default.py [--model_dir=runs/default] [--limit=200]
      [--results=benchmarks/RESULTS.md]

The untrained model is the run's own config initialised from its seed (what
step 0 would be), scored with the run's vocabulary on the same items. For each
task: accuracy with its 95% interval (1.96 standard errors), and whether the
untrained model's interval holds chance. The last stdout line is a JSON object.
"""

import argparse
import json
import os
import sys

import jax

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bigsci_jax import evaluate  # noqa: E402
from bigsci_jax import step as steps  # noqa: E402


def _interval(scores, metric):
  return f"{scores[metric]:.3f} ± {1.96 * scores[metric + '_stderr']:.3f}"


def main(argv):
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--model_dir", default="runs/default")
  p.add_argument("--limit", type=int, default=200)
  p.add_argument("--results", default=None)
  args = p.parse_args(argv)
  run, runtime, trained, step = evaluate.restore(args.model_dir)
  untrained = steps.init_state(runtime.model, runtime.tx, runtime.mesh, run.train.seed,
                               run.batch.seq_len).params
  languages = sorted(run.data.languages) if run.data.languages else None
  if languages is None:
    from bigsci_jax.tasks import handbook
    languages = handbook.handbook_languages(run.data.data_dir or handbook.default_data_dir())
  names = evaluate.default_tasks(run, languages)
  scorers = {"untrained": evaluate.make_scorer(args.model_dir, run, runtime, untrained),
             f"step {step}": evaluate.make_scorer(args.model_dir, run, runtime, trained)}
  table = {name: {label: evaluate.score_task(name, scorer, args.limit)
                  for label, scorer in scorers.items()} for name in names}
  rows, inside, checked = [], 0, 0
  for name, by_model in table.items():
    untrained_scores, trained_scores = by_model.values()
    metric = "exact_match" if name.startswith("cloze/") else "acc"
    chance = untrained_scores.get("chance", 0.0)
    half = 1.96 * untrained_scores[metric + "_stderr"]
    ok = abs(untrained_scores[metric] - chance) <= half
    checked += 1
    inside += ok
    rows.append([name, metric, untrained_scores["items"], f"{chance:.2f}",
                 _interval(untrained_scores, metric), "yes" if ok else "no",
                 _interval(trained_scores, metric)]
                + ([f"{untrained_scores['ppl']:.3g} / {trained_scores['ppl']:.3g}"]
                   if "ppl" in trained_scores else
                   [f"{_interval(trained_scores, 'acc_norm')}"]))
  summary = {"model_dir": args.model_dir, "step": step, "device": jax.devices()[0].device_kind,
             "untrained_within_95pct_of_chance": f"{inside}/{checked}", "tasks": table}
  for row in rows:
    print(" | ".join(str(c) for c in row))
  if args.results:
    with open(args.results, "a") as f:
      f.write(f"\n`{args.model_dir}` at step {step} against the same config untrained "
              f"({summary['device']}, {args.limit} items per task; untrained within its 95% "
              f"interval of chance on {inside}/{checked} tasks):\n\n"
              "| task | metric | items | chance | untrained | chance in 95% | trained | "
              "trained acc_norm, or cloze ppl untrained / trained |\n"
              "|---|---|---|---|---|---|---|---|\n")
      f.writelines("| " + " | ".join(str(c) for c in row) + " |\n" for row in rows)
  print(json.dumps(summary))
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
