"""Prompt tuning (Lester et al. 2021) on a run's latest checkpoint, kept frozen.

  python -m bigsci_jax.prompt_tune --model_dir=DIR --task=NAME --out=P
      [--num_virtual_tokens=20 --steps=300 --batch_size=8 --learning_rate=3e-2]
      [--objective=auto|choice|lm] [--limit=200] [--include_path=DIR] [--seed=0]

Tasks: the built-in ones (next_sentence/<lang>, translation/<lang>, cloze/<lang>,
word_choice/<lang>:
tuned on items from the handbook's train chapters, measured on the test chapters'
items as `evaluate` measures them), or a multiple-choice lm-evaluation-harness task
from a local YAML (--include_path DIR; tuned on its training split, measured on
its evaluation split). The objective `auto` is `choice` (cross-entropy over the
choices' log-likelihoods) for multiple choice and `lm` (the answer's likelihood)
for cloze.

The prompt's rows start as embeddings of common vocabulary pieces. Only P is
written: the prompt (orbax, `embeddings/`) and prompt.json (the model's shape,
the task, the settings, the losses, and the task's scores without and with the
prompt, --limit items, also printed). The checkpoint is only read. Use the prompt
with --prompt_dir=P in evaluate, generate and serve, and model_args
prompt_dir=P in python -m bigsci_jax.lm_eval. The last stdout line is a JSON
object of the scores.
"""

import argparse
import dataclasses
import json
import sys

from bigsci_jax import evaluate, likelihood, loop, mc_tasks
from bigsci_jax.adapt import soft_prompt, tune
from bigsci_jax.corpus import CorpusError


def builtin_items(name, split, limit):
  kind, lang = evaluate.parse_task(name)
  items = evaluate.TASKS[kind](lang, limit=limit, split=split)
  if kind == "cloze":
    return [mc_tasks.Item(item.context, (item.word,), 0) for item in items]
  return items


def lm_eval_items(name, split, limit, include_path, manager=None):
  """mc_tasks.Item of a multiple-choice harness task, as the harness asks for them
  zero-shot: its training docs (split "train") or its evaluation docs. `manager`: a
  harness TaskManager (default: the harness's tasks and include_path's)."""
  try:
    from lm_eval.tasks import TaskManager, get_task_dict
  except ImportError as e:
    raise evaluate.EvaluationError("harness tasks need the [eval] extra: pip install -e "
                                   "'.[eval]'.") from e
  manager = manager or TaskManager(include_path=include_path)
  if name not in manager.all_tasks:
    raise evaluate.EvaluationError(
        f"unknown task {name!r}: a built-in task is KIND/<lang> (kinds: "
        f"{', '.join(evaluate.TASKS)}); a harness task needs its YAML's directory in "
        f"--include_path.")
  task = get_task_dict([name], manager)[name]
  if getattr(task, "OUTPUT_TYPE", None) != "multiple_choice" or task.multiple_input:
    raise evaluate.EvaluationError(f"task {name!r} is not a multiple-choice task with one "
                                   f"context; prompt tuning takes those.")
  if split == "train" and not task.has_training_docs():
    raise evaluate.EvaluationError(f"task {name!r} has no training split; add training_split "
                                   f"to its YAML.")
  docs = list(task.training_docs() if split == "train" else task.eval_docs)[:limit]
  items = []
  for doc in docs:
    choices = list(task.doc_to_choice(doc))
    target = task.doc_to_target(doc)
    answer = target if isinstance(target, int) else choices.index(target)
    items.append(mc_tasks.Item(task.fewshot_context(doc, 0), tuple(choices), answer,
                               task.config.target_delimiter))
  return items


def task_scores(name, items, scorer, limit):
  """The task's metrics with this scorer: a built-in task as `evaluate` scores it, a
  harness task by mc_tasks.score over its evaluation items."""
  if items is None:
    return evaluate.score_task(name, scorer, limit)
  return mc_tasks.score(items, lambda requests: scorer.loglikelihood(requests)[0])


def main(argv):
  p = argparse.ArgumentParser(prog="python -m bigsci_jax.prompt_tune", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--model_dir", required=True)
  p.add_argument("--task", required=True)
  p.add_argument("--out", required=True, help="the prompt directory to write")
  p.add_argument("--num_virtual_tokens", type=int, default=20)
  p.add_argument("--steps", type=int, default=300)
  p.add_argument("--batch_size", type=int, default=8, help="items per step")
  p.add_argument("--learning_rate", type=float, default=3e-2)
  p.add_argument("--objective", default="auto", choices=("auto",) + tune.OBJECTIVES)
  p.add_argument("--limit", type=int, default=200, help="items scored before and after")
  p.add_argument("--train_limit", type=int, default=100000, help="training items at most")
  p.add_argument("--include_path", default=None, help="directory of harness task YAMLs")
  p.add_argument("--seed", type=int, default=0)
  args = p.parse_args(argv)
  builtin = "/" in args.task
  objective = args.objective
  if objective == "auto":
    objective = "lm" if args.task.startswith("cloze/") else "choice"
  try:
    cfg = tune.TuneConfig(args.num_virtual_tokens, args.steps, args.batch_size,
                          args.learning_rate, min(20, args.steps // 10), objective, args.seed)
    if builtin:
      train_items, eval_items = builtin_items(args.task, "train", args.train_limit), None
    else:
      train_items = lm_eval_items(args.task, "train", args.train_limit, args.include_path)
      eval_items = lm_eval_items(args.task, "eval", args.limit, args.include_path)
    run, runtime, params, step = evaluate.restore(args.model_dir)
    base = evaluate.make_scorer(args.model_dir, run, runtime, params)
    init_PxD = soft_prompt.init_from_vocab(params, cfg.num_virtual_tokens, args.seed)
    scores = {"untuned": task_scores(args.task, eval_items, base, args.limit)}
    print(f"untuned: {_line(scores['untuned'])}", flush=True)
    prompt_PxD, losses = tune.tune(
        runtime.model, params, train_items, base.tokenizer, init_PxD, cfg, run.batch.seq_len,
        runtime.mesh, lambda i, loss: print(f"step {i}: loss {loss:.4f}", flush=True))
    tuned = likelihood.Scorer(runtime.model, soft_prompt.attach(params, prompt_PxD),
                              base.tokenizer, base.seq_len, base.batch_size, runtime.mesh)
    scores["tuned"] = task_scores(args.task, eval_items, tuned, args.limit)
    print(f"tuned:   {_line(scores['tuned'])}", flush=True)
    out = soft_prompt.save(args.out, prompt_PxD, run.model, {
        "task": args.task, "base_model_dir": args.model_dir, "base_step": step,
        "train_items": len(train_items), "settings": dataclasses.asdict(cfg),
        "loss_first": losses[0], "loss_last": losses[-1], "scores": scores})
  except (evaluate.EvaluationError, soft_prompt.PromptError, CorpusError, ValueError,
          loop.RunNotFound, loop.TrainingError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(json.dumps({"out": out, "task": args.task, **scores}))
  return 0


def _line(scores):
  return ", ".join(f"{k} {scores[k]:.4f} ± {scores.get(k + '_stderr', 0):.4f}"
                   for k in ("acc", "acc_norm", "exact_match", "ppl") if k in scores)


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
