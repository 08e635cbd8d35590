"""Prompt tuning (Lester et al. 2021) or LoRA (Hu et al. 2021) on a run's latest
checkpoint, kept frozen.

  python -m bigsci_jax.prompt_tune --model_dir=DIR --task=NAME --out=P
      [--adapter=prompt|lora] [--num_virtual_tokens=20]
      [--lora_rank=8 --lora_alpha=16 --lora_targets=query,key,value,out]
      [--steps=300 --batch_size=8 --learning_rate=R]
      [--objective=auto|choice|lm] [--limit=200] [--include_path=DIR] [--seed=0]
      [--mesh=DATAxFSDPxTENSOR]

Tasks: the built-in ones (next_sentence/<lang>, translation/<lang>, cloze/<lang>,
word_choice/<lang>:
tuned on items from the handbook's train chapters, measured on the test chapters'
items as `evaluate` measures them), or a multiple-choice lm-evaluation-harness task
from a local YAML (--include_path DIR; tuned on its training split, measured on
its evaluation split). The objective `auto` is `choice` (cross-entropy over the
choices' log-likelihoods) for multiple choice and `lm` (the answer's likelihood)
for cloze.

--adapter=prompt (the default) trains --num_virtual_tokens embeddings that start
every input, their rows first set to embeddings of common vocabulary pieces;
--adapter=lora trains rank --lora_rank factors added to the attention projections
named by --lora_targets (scaled by alpha / rank; B starts at zero, so tuning starts
from the base model). --learning_rate defaults to 3e-2 for a prompt, 3e-3 for LoRA.
Only P is written: the adapter (orbax, `embeddings/` or `lora/`) and prompt.json
(its kind, the model's shape, the task, the settings, the losses, and the task's
scores without and with the adapter, --limit items, also printed, and the gain: the
tuned minus the untuned score with the standard error of their paired per-item
difference, mc_tasks.paired_gain — a gain of 1.96 of them is significant at 5%). The checkpoint
is only read. Use either kind with --prompt_dir=P in evaluate, generate and serve,
and model_args prompt_dir=P in python -m bigsci_jax.lm_eval (LoRA factors are
merged into the weights once, when P is loaded). The last stdout line is a JSON
object of the scores. --mesh places the frozen model over those devices as evaluate's
--mesh does (e.g. 1x1x4: every layer split over 4; the data x fsdp shards must divide
--batch_size and the scorer's batch); the adapter is replicated.
"""

import argparse
import dataclasses
import json
import sys

from bigsci_jax import evaluate, likelihood, loop, mc_tasks
from bigsci_jax.adapt import lora, store, tune
from bigsci_jax.corpus import CorpusError


def builtin_items(name, split, limit):
  items = evaluate.task_items(name, limit, split)
  if evaluate.parse_task(name)[0] == "cloze":
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
  """(the task's metrics with this scorer, each item's 0/1 outcomes): a built-in task as
  `evaluate` scores it, a harness task by mc_tasks.score over its evaluation items."""
  if items is None:
    scores = evaluate.score_task(name, scorer, limit, outcomes=True)
  else:
    scores = mc_tasks.score(items, lambda requests: scorer.loglikelihood(requests)[0], True)
  return scores, scores.pop("outcomes")


def main(argv):
  p = argparse.ArgumentParser(prog="python -m bigsci_jax.prompt_tune", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--model_dir", required=True)
  p.add_argument("--task", required=True)
  p.add_argument("--out", required=True, help="the prompt directory to write")
  p.add_argument("--adapter", default="prompt", choices=tune.ADAPTERS)
  p.add_argument("--num_virtual_tokens", type=int, default=20)
  p.add_argument("--lora_rank", type=int, default=8)
  p.add_argument("--lora_alpha", type=float, default=16.0)
  p.add_argument("--lora_targets", default=",".join(lora.TARGETS),
                 help="attention projections LoRA adapts")
  p.add_argument("--steps", type=int, default=300)
  p.add_argument("--batch_size", type=int, default=8, help="items per step")
  p.add_argument("--learning_rate", type=float, default=0.0,
                 help="Adam's peak rate (default: 3e-2 for a prompt, 3e-3 for LoRA)")
  p.add_argument("--objective", default="auto", choices=("auto",) + tune.OBJECTIVES)
  p.add_argument("--limit", type=int, default=200, help="items scored before and after")
  p.add_argument("--train_limit", type=int, default=100000, help="training items at most")
  p.add_argument("--include_path", default=None, help="directory of harness task YAMLs")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--mesh", default=None, help="DATAxFSDPxTENSOR: the devices the frozen model "
                 "is placed over (e.g. 1x1x4); default data parallel over all, or one device")
  args = p.parse_args(argv)
  builtin = "/" in args.task
  objective = args.objective
  if objective == "auto":
    objective = "lm" if args.task.startswith("cloze/") else "choice"
  try:
    cfg = tune.TuneConfig(args.adapter, args.num_virtual_tokens, args.lora_rank, args.lora_alpha,
                          tuple(t for t in args.lora_targets.split(",") if t), args.steps,
                          args.batch_size, args.learning_rate, min(20, args.steps // 10),
                          objective, args.seed)
    if builtin:
      train_items, eval_items = builtin_items(args.task, "train", args.train_limit), None
    else:
      train_items = lm_eval_items(args.task, "train", args.train_limit, args.include_path)
      eval_items = lm_eval_items(args.task, "eval", args.limit, args.include_path)
    run, runtime, params, step = evaluate.restore(args.model_dir, mesh=args.mesh)
    base = evaluate.make_scorer(args.model_dir, run, runtime, params)
    untuned, before = task_scores(args.task, eval_items, base, args.limit)
    scores = {"untuned": untuned}
    print(f"untuned: {_line(scores['untuned'])}", flush=True)
    arrays, losses = tune.tune(
        runtime.model, params, train_items, base.tokenizer, cfg.initial(params), cfg,
        run.batch.seq_len, runtime.mesh,
        lambda i, loss: print(f"step {i}: loss {loss:.4f}", flush=True))
    tuned = likelihood.Scorer(runtime.model, cfg.apply(params, arrays),
                              base.tokenizer, base.seq_len, base.batch_size, runtime.mesh)
    scores["tuned"], after = task_scores(args.task, eval_items, tuned, args.limit)
    scores["gain"] = mc_tasks.paired_gain(before, after)
    print(f"tuned:   {_line(scores['tuned'])}", flush=True)
    print(f"gain:    {_line(scores['gain'])} (paired over the same items)", flush=True)
    out = store.save(args.out, cfg.kind, arrays, run.model, {
        **cfg.info(), "task": args.task, "base_model_dir": args.model_dir, "base_step": step,
        "train_items": len(train_items), "settings": dataclasses.asdict(cfg),
        "loss_first": losses[0], "loss_last": losses[-1], "scores": scores})
  except (evaluate.EvaluationError, store.AdapterError, CorpusError, ValueError,
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
