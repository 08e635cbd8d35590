"""Language plans: the runs that measure how each language scales with its own data and
how much one language's data is worth to another, for `scaling mixture` and
`scaling transfer`.

For languages L, target-token amounts D_1..D_k and one model (the base config's):

  mono_<l>_<i>   trained on <l> alone for D_i tokens; gives languages.csv
                 (language, tokens, loss on <l>) and transfer.csv's target-only rows;
  pre_<s>        trained on <s> alone for `source_tokens` tokens (the mono_<s> run of
                 that many tokens, when there is one);
  ft_<s>_<t>_<i> starts from pre_<s>'s weights (TrainConfig.init_from; fresh optimizer
                 and schedule) and trains on <t> for D_i tokens: Hernandez et al.'s
                 fine-tuning setup, so the target tokens seen are exact; gives
                 transfer.csv's rows with source <s>.

Token amounts are rounded to whole steps of the base batch. `scaling run` trains the
plan (pre_ runs before the ft_ runs that start from them) and writes the two CSVs
and sizes.json (each language's available training tokens, for --sizes: its train
split's UTF-8 bytes times the tokens per byte measured on its validation split).
"""

import dataclasses
import json
import math
import os

from bigsci_jax import flops
from bigsci_jax.config import ConfigError, RunConfig

LANGUAGE_COLUMNS = ("language", "tokens", "loss")
TRANSFER_COLUMNS = ("target", "source", "params", "tokens", "loss")


def _run(base: RunConfig, lang, tokens, init_from=""):
  rows_per_step = base.batch.batch_size * base.batch.seq_len
  steps = max(1, int(round(tokens / rows_per_step)))
  run = dataclasses.replace(
      base, data=dataclasses.replace(base.data, mixture=f"{base.data.corpus}_{lang}", languages=()),
      train=dataclasses.replace(base.train, train_steps=steps, eval_every=0,
                                checkpoint_every=steps, init_from=init_from),
      optimizer=dataclasses.replace(base.optimizer, decay_steps=None))
  return run, steps * rows_per_step


def make_language_plan(base: RunConfig, languages, amounts, source_tokens, plan_dir, pairs=None):
  """[(name, RunConfig, row)] in training order; `pairs` (source, target) default to every
  ordered pair of distinct languages."""
  if base.data.mixture == "synthetic":
    raise ConfigError("a language plan trains on a corpus's languages; give a --base whose "
                      "DataConfig.mixture names a corpus, e.g. 'handbook_multilingual'.")
  if len(set(amounts)) < 3:
    raise ConfigError(f"a language's data law needs at least 3 token amounts, got {len(set(amounts))}.")
  pairs = pairs if pairs is not None else [(s, t) for s in languages for t in languages if s != t]
  unknown = sorted({x for pair in pairs for x in pair} - set(languages))
  if unknown:
    raise ConfigError(f"the pairs name {', '.join(unknown)}, which is not among the plan's "
                      f"languages {', '.join(languages)}.")
  params = flops.param_counts(base.model).total
  plan = []

  def add(name, kind, run, tokens, language, source=""):
    plan.append((name, run, dict(run=name, kind=kind, language=language, source=source,
                                 params=params, tokens=tokens, train_steps=run.train.train_steps,
                                 flops=tokens * flops.flops_per_token(base.model, base.batch.seq_len))))

  for lang in languages:
    for i, amount in enumerate(sorted(amounts)):
      run, tokens = _run(base, lang, amount)
      add(f"mono_{lang}_{i}", "mono", run, tokens, lang)
  starts = {}
  for source in sorted({s for s, _ in pairs}):
    run, tokens = _run(base, source, source_tokens)
    same = [name for name, other, _ in plan if other == run]
    if same:  # a target-only run of the source already trains exactly this
      starts[source] = same[0]
    else:
      starts[source] = f"pre_{source}"
      add(starts[source], "pre", run, tokens, source)
  for source, target in pairs:
    start = os.path.abspath(os.path.join(plan_dir, "runs", starts[source]))
    for i, amount in enumerate(sorted(amounts)):
      run, tokens = _run(base, target, amount, init_from=start)
      add(f"ft_{source}_{target}_{i}", "ft", run, tokens, target, source)
  if len({_run(base, languages[0], a)[1] for a in amounts}) < 3:
    raise ConfigError(f"the token amounts {', '.join(f'{a:g}' for a in amounts)} round to fewer "
                      f"than 3 distinct numbers of {base.batch.batch_size} x {base.batch.seq_len}-"
                      f"token steps; spread them further apart.")
  return plan


def write_tables(plan_dir, finished):
  """languages.csv, transfer.csv and sizes.json from [(plan row, final eval line, RunConfig)]."""
  from bigsci_jax.scaling.sweep import _write_csv
  languages, transfer, per_byte, runs = [], [], {}, {}
  for row, final, run in finished:
    lang = row["language"]
    loss = final[f"loss/{lang}"]
    if row["kind"] == "mono":
      languages.append(dict(language=lang, tokens=row["tokens"], loss=loss))
      per_byte[lang] = final[f"bpb/{lang}"] * math.log(2) / loss  # tokens per UTF-8 byte
      runs[lang] = run
    if row["kind"] in ("mono", "ft"):
      transfer.append(dict(target=lang, source=row["source"], params=row["params"],
                           tokens=row["tokens"], loss=loss))
  _write_csv(os.path.join(plan_dir, "languages.csv"), LANGUAGE_COLUMNS, languages)
  _write_csv(os.path.join(plan_dir, "transfer.csv"), TRANSFER_COLUMNS, transfer)
  from bigsci_jax.tasks import handbook  # the data pipeline: the runs already imported it
  sizes = {lang: float(handbook.prepare(run.data).sizes[lang] * per_byte[lang])
           for lang, run in sorted(runs.items())}
  path = os.path.join(plan_dir, "sizes.json")
  with open(path + ".tmp", "w") as f:
    json.dump(sizes, f, indent=1)
  os.replace(path + ".tmp", path)
  return {name: os.path.join(plan_dir, name) for name in ("languages.csv", "transfer.csv",
                                                          "sizes.json")}
