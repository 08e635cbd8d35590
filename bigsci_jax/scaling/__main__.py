"""Scaling-law sweeps and fits.

  python -m bigsci_jax.scaling plan --budgets 1e15 3e15 1e16 --out PLAN [--base model_dir/config.json]
      [--decay wsd]                                     # runs of one model share a trunk
  python -m bigsci_jax.scaling plan-grid --params 1e6 3e6 1e7 --tokens_per_param 5 10 20 40
      --out PLAN --decay wsd      # each size x each ratio: one trunk + cooldown branches per size
  python -m bigsci_jax.scaling plan-languages --languages en fr de --tokens 1e6 3e6 1e7
      --source_tokens 1e7 --base model_dir/config.json --out PLAN   # data laws and transfer runs
  python -m bigsci_jax.scaling run --plan PLAN          # trains every run, writes PLAN/runs.csv
                                                        # (+ runs_by_lang.csv, curves.csv)
  python -m bigsci_jax.scaling fit --approach 1|2|3|kaplan --runs CSV [--bootstrap N]
      [--compute C ...] [--out DIR] [--by lang]
  python -m bigsci_jax.scaling fit-hparams --runs SWEEP.csv --out LAWS.json   # for plan --hparams
  python -m bigsci_jax.scaling stages --op width|depth (--params N | --metrics MODEL_DIR)
  python -m bigsci_jax.scaling diagnose --fit FIT.json (--model_dir DIR | --params N --tokens D --loss L)
      [--runs CSV --metric NAME [--against params|flops] [--metric_value V]]
  python -m bigsci_jax.scaling mixture --runs LANG_CSV --budget TOKENS [--sizes SIZES.json]
      [--epochs_max 4] [--objective mean|max]
  python -m bigsci_jax.scaling transfer --runs CSV [--out DIR]   # k (source x target), heatmap
  python -m bigsci_jax.scaling spectra --model_dir DIR [--out DIR] [--per_head]

Each command prints, as its last line, a JSON object; `fit` gives every fitted
quantity with its bootstrap 95% interval `<name>_ci`.
"""

import argparse
import dataclasses
import json
import os
import sys

import numpy as np

from bigsci_jax.config import ConfigError, RunConfig
from bigsci_jax.scaling import fit, plan, plots, table


def fit_by_group(args, runs, fitter, kwargs):
  """One fit per value of the --by column (e.g. per language), with intervals and a chart."""
  if args.by not in runs.extra:
    raise table.TableError(f"{runs.source} has no '{args.by}' column to group the fits by.")
  groups = {}
  for value in sorted(set(runs.extra[args.by].tolist())):
    part = runs.take(runs.extra[args.by] == value)
    point = fitter(part, **kwargs)
    fitted = {k: v for k, v in point.items() if isinstance(v, float)}
    if args.bootstrap:
      fitted.update(fit.bootstrap(fitter, part, point, samples=args.bootstrap, seed=args.seed, **kwargs))
    groups[str(value)] = fitted
  result = {"approach": args.approach, "runs": len(runs), "by": args.by, "groups": groups}
  if args.out:
    result["plots"] = plots.group_exponents(groups, args.by, args.out)
  for value, fitted in groups.items():
    print(f"{value:>12}: " + ", ".join(f"{k} = {v:.4g}" for k, v in fitted.items()
                                       if not k.endswith("_ci")))
  print(json.dumps(result))


def write_json(path, value):
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(value, f, indent=1)
  os.replace(tmp, path)


def fit_command(args):
  runs = table.read_csv(args.runs)
  fitter = fit.FITTERS[args.approach]
  kwargs = {"irreducible": args.irreducible} if args.approach == "kaplan" else {}
  if args.by:
    return fit_by_group(args, runs, fitter, kwargs)
  point = fitter(runs, **kwargs)
  result = {"approach": args.approach, "runs": len(runs)}
  result.update({k: v for k, v in point.items() if not k.startswith("_")})
  if args.bootstrap:
    result.update(fit.bootstrap(fitter, runs, point, samples=args.bootstrap, seed=args.seed, **kwargs))
  if args.approach in ("1", "2", "3"):
    counting = fit.by_counting(fitter, runs)
    if counting:  # the same runs under each FLOP / parameter count (Porian et al. 2024)
      result["counting"] = counting
  predictions = []
  for c in args.compute:
    if args.approach == "3":
      predictions.append({"flops": c, **fit.optimum_approach3(point, c)})
    elif args.approach in ("1", "2"):
      n = point["k_n"] * c ** point["a"]
      predictions.append({"flops": c, "N": n, "D": point["k_d"] * c ** point["b"]})
  if predictions:
    result["optimal"] = predictions
  if args.out:
    ci = {k: v for k, v in result.items() if k.endswith("_ci")}
    result["plots"] = plots.write_all(args.approach, runs, point, ci, args.out)
    result["fit_json"] = os.path.join(args.out, f"fit_approach{args.approach}.json")
    write_json(result["fit_json"], result)  # `diagnose --fit` reads approach 3's
  for key, value in result.items():
    if isinstance(value, float):
      ci = result.get(f"{key}_ci")
      band = f"  [{ci[0]:.4g}, {ci[1]:.4g}]" if ci else ""
      print(f"{key:>14} = {value:.4g}{band}")
  for convention, values in result.get("counting", {}).items():
    print(f"{'counting ' + convention:>20}: " + ", ".join(f"{k} = {v:.4g}" for k, v in values.items()))
  print(json.dumps(result))


def plan_command(args):
  """An isoFLOP plan (`plan`) or a sizes x data grid (`plan-grid`)."""
  base = _read_base(args.base) if args.base else RunConfig()
  if args.decay:
    base = dataclasses.replace(base, optimizer=dataclasses.replace(
        base.optimizer, decay=args.decay, cooldown_fraction=args.cooldown_fraction))
  learning_rate, batch_size = _hparam_rules(args)
  rule = plan.ShapeRule(aspect=args.aspect, head_dim=args.head_dim, ffn_ratio=args.ffn_ratio)
  if args.command == "plan-grid":
    spec = plan.PlanSpec(budgets=(), convention=args.convention, learning_rate=learning_rate,
                         batch_size=batch_size, b2=plan.HparamRule(args.b2))
    runs = plan.make_grid(base, spec, rule, args.params, args.tokens_per_param)
  else:
    spec = plan.PlanSpec(budgets=tuple(args.budgets), sizes_per_budget=args.sizes_per_budget,
                         spread=args.spread, tokens_per_param=args.tokens_per_param,
                         convention=args.convention, learning_rate=learning_rate,
                         batch_size=batch_size, b2=plan.HparamRule(args.b2))
    runs = plan.make_plan(base, spec, rule)
  plan.write_plan(runs, args.out)
  for _, _, row in runs:
    print(f"{row['run']:>24}  N={row['params']:.3g}  D={row['tokens']:.3g}  steps={row['train_steps']}")
  print(json.dumps({"plan": os.path.join(args.out, "plan.csv"), "runs": len(runs)}))


def _read_base(path):
  """The RunConfig in a JSON file, or in a model_dir's config.json."""
  file = os.path.join(path, "config.json") if os.path.isdir(path) else path
  return RunConfig.from_dict(table.read_json(
      file, "--base", "pass a RunConfig JSON such as a trained run's model_dir/config.json"))


def plan_languages_command(args):
  from bigsci_jax.scaling import languages
  if not args.base:
    raise table.TableError("plan-languages needs --base, a RunConfig JSON (e.g. a model_dir's "
                           "config.json) whose DataConfig names the corpus.")
  base = _read_base(args.base)
  pairs = None
  if args.pairs:
    if not all(p.count(":") == 1 for p in args.pairs):
      raise table.TableError(f"--pairs takes source:target pairs such as en:fr, got "
                             f"{' '.join(args.pairs)}.")
    pairs = [tuple(p.split(":")) for p in args.pairs]
  runs = languages.make_language_plan(base, args.languages, args.tokens, args.source_tokens,
                                      args.out, pairs)
  plan.write_plan(runs, args.out)
  for _, _, row in runs:
    print(f"{row['run']:>16}  {row['kind']:>4}  {row['language']:>6}  tokens={row['tokens']:.3g}  "
          f"steps={row['train_steps']}")
  print(json.dumps({"plan": os.path.join(args.out, "plan.csv"), "runs": len(runs)}))


def fit_hparams_command(args):
  from bigsci_jax.scaling import hparams
  result = hparams.fit_hparams(table.read_csv(args.runs))
  for key in ("learning_rate", "batch_size"):
    law = result[key]
    print(f"{key:>14} = {law['coefficient']:.4g} * N^{law['exponent']:.4f}  (r2 {law['r2']:.3f})")
  if args.out:
    write_json(args.out, result)
  print(json.dumps(result))


def _hparam_rules(args):
  """learning-rate and batch-size rules: from a fit-hparams JSON, else the flags."""
  if not args.hparams:
    return plan.HparamRule(args.learning_rate, args.lr_exponent), plan.HparamRule(args.batch_size)
  with open(args.hparams) as f:
    laws = json.load(f)
  return tuple(plan.HparamRule(laws[k]["coefficient"], laws[k]["exponent"])
               for k in ("learning_rate", "batch_size"))


def run_command(args):
  import jax

  from bigsci_jax.scaling import sweep  # imports the training stack
  if not os.path.isfile(os.path.join(args.plan, "plan.csv")):
    raise table.TableError(f"{args.plan} holds no plan.csv; write a plan there first with "
                           f"`python -m bigsci_jax.scaling plan ... --out {args.plan}`.")
  if not jax.config.jax_compilation_cache_dir:  # runs of one shape compile once across the plan
    jax.config.update("jax_compilation_cache_dir", os.path.join(args.plan, "xla_cache"))
  rows = sweep.run_plan(args.plan, progress=not args.no_progress)
  result = {"runs_csv": os.path.join(args.plan, "runs.csv"), "runs": len(rows),
            "curves_csv": os.path.join(args.plan, "curves.csv"),
            "tokens_planned": sum(float(r["tokens"]) for r in rows),
            "tokens_trained": sum(r["tokens_trained"] for r in rows)}
  for name in ("languages.csv", "transfer.csv", "sizes.json"):  # a language plan's
    if os.path.exists(os.path.join(args.plan, name)):
      result[name.replace(".", "_")] = os.path.join(args.plan, name)
  by_lang = os.path.join(args.plan, "runs_by_lang.csv")
  if os.path.exists(by_lang):
    result["runs_by_lang_csv"] = by_lang
  print(json.dumps(result))


def stages_command(args):
  """When to grow: on Kaplan's law for --params, or on a run's logged training curve."""
  from bigsci_jax.scaling import stages
  if args.metrics:
    from bigsci_jax.metrics import read_metrics
    rows = [r for r in read_metrics(args.metrics, "train") if r.get("flops_seen")]
    if len(rows) < 10:
      raise table.TableError(f"{args.metrics} has {len(rows)} logged training steps; the growth "
                             f"point needs a training curve (at least 10).")
    i = stages.measured_growth_step([r["flops_seen"] for r in rows], [r["loss"] for r in rows],
                                    args.op, args.window)
    result = {"op": args.op, "threshold": stages.THRESHOLDS[args.op],
              "growth_step": rows[i]["step"] if i is not None else None,
              "growth_loss": rows[i]["loss"] if i is not None else None}
  else:
    result = {**vars(stages.kaplan_stage(args.params, args.op)),
              "threshold": stages.THRESHOLDS[args.op]}
  print(json.dumps(result))


def diagnose_command(args):
  """Effective model size against an approach-3 law (and a downstream score law)."""
  from bigsci_jax.scaling import diagnose
  law = diagnose.read_fit(args.fit)
  if args.model_dir:
    point = diagnose.run_point(args.model_dir)
  else:
    given = {"--params": args.params, "--tokens": args.tokens, "--loss": args.loss}
    missing = [k for k, v in given.items() if v is None]
    if missing:
      raise table.TableError(f"diagnose needs --model_dir, or all of --params, --tokens and "
                             f"--loss (missing {', '.join(missing)}).")
    bad = [k for k, v in given.items() if not v > 0]
    if bad:
      raise table.TableError(f"{', '.join(bad)} must be positive.")
    point = {"N": args.params, "D": args.tokens, "loss": args.loss, "scores": {}}
  size = diagnose.effective_size(law, point["N"], point["D"], point["loss"])
  print(size.sentence())
  result = {k: v for k, v in vars(size).items()}
  if args.runs:
    if not args.metric:
      raise table.TableError("--runs needs --metric NAME, the column of downstream scores.")
    score_law = diagnose.metric_law(table.read_csv(args.runs), args.metric, args.against)
    score = args.metric_value if args.metric_value is not None else point["scores"].get(args.metric)
    if score is None:
      raise table.TableError(f"no value of '{args.metric}' for this model: pass --metric_value, "
                             f"or evaluate its model_dir with a task that reports it.")
    x, outside = diagnose.invert_metric(score_law, score)
    name = "N" if args.against == "params" else "C"
    mine = point["N"] if args.against == "params" else 6 * point["N"] * point["D"]
    print(f"{args.metric} = {score:.4g}: like a run with {name} = {x:.3g} on the reference runs' "
          f"law ({x / mine:.2f} of this model's{'; extrapolated' if outside else ''}).")
    result["metric"] = {**score_law, "value": float(score), f"{name}_eff": x,
                        f"{name}_eff_ratio": x / mine, "extrapolated": outside}
  print(json.dumps(result))


def _read_sizes(path):
  """{language: available tokens} from a JSON object."""
  sizes = table.read_json(path, "sizes file",
                          "write a JSON object {language: available training tokens}")
  if not isinstance(sizes, dict) or not all(isinstance(v, (int, float)) and v > 0
                                            for v in sizes.values()):
    raise table.TableError(f"sizes file {path} must be a JSON object of positive token counts "
                           f"per language, e.g. {{\"en\": 3e9, \"sw\": 2e7}}.")
  return {k: float(v) for k, v in sizes.items()}


def mixture_command(args):
  """Per-language laws L_l(D) = E_l + B_l D^-beta_l and the rates they imply."""
  from bigsci_jax.scaling import mixture
  if not args.budget > 0:
    raise table.TableError(f"--budget must be a positive number of tokens, got {args.budget:g}.")
  points = mixture.read_language_runs(args.runs)
  laws = {lang: mixture.fit_data_law(d, l, lang, args.runs) for lang, (d, l) in points.items()}
  sizes = caps = None
  if args.sizes:
    sizes = _read_sizes(args.sizes)
    missing = sorted(set(laws) - set(sizes))
    if missing:
      raise table.TableError(f"{args.sizes} has no size for {', '.join(missing)}; give every "
                             f"language of {args.runs} its available tokens.")
    caps = {lang: args.epochs_max * sizes[lang] / args.budget for lang in laws}
  rates = mixture.optimal_rates(laws, args.budget, args.objective, caps)
  predicted = {lang: float(laws[lang].loss(rates[lang] * args.budget)) for lang in laws}
  alone = {lang: float(laws[lang].loss(args.budget)) for lang in laws}
  alpha = None
  print(f"{'language':>10} {'E':>8} {'B':>10} {'beta':>7} {'rate':>7} {'loss':>8} {'given up':>9}")
  for lang, law in laws.items():
    capped = caps is not None and rates[lang] >= caps[lang] * (1 - 1e-9)
    print(f"{lang:>10} {law.E:8.4f} {law.B:10.4g} {law.beta:7.4f} {rates[lang]:7.4f} "
          f"{predicted[lang]:8.4f} {predicted[lang] - alone[lang]:9.4f}"
          + ("  (epoch cap)" if capped else ""))
  if sizes:
    alpha, distance = mixture.closest_temperature(rates, sizes)
    print(f"closest temperature sampling: rates proportional to size^{alpha:.3f} "
          f"(squared distance {distance:.2g})")
  snippet = mixture.gin_snippet(rates)
  print(snippet, end="")
  print(json.dumps({"objective": args.objective, "budget": args.budget, "rates": rates,
                    "alpha": alpha, "predicted_loss": predicted,
                    "laws": {lang: vars(law) for lang, law in laws.items()}, "gin": snippet}))


def transfer_command(args):
  """Effective data transferred between languages, D_T = k D_F^alpha N^beta per pair."""
  from bigsci_jax.scaling import transfer
  results = transfer.fit_transfer(transfer.read_transfer_runs(args.runs), args.runs)
  sources, targets, k = transfer.k_matrix(results)
  out = args.out or os.path.dirname(os.path.abspath(args.runs))
  os.makedirs(out, exist_ok=True)
  print(f"{'source':>10} {'target':>10} {'k':>10} {'alpha':>7} {'beta':>7}  points")
  for (src, tgt), e in results.items():
    fitted = (f"{e['k']:10.4g} {e['alpha']:7.4f} "
              + (f"{e['beta']:7.4f}" if e["beta"] is not None else f"{'-':>7}")
              if e["k"] is not None else f"{'not fitted':>26}")
    print(f"{src:>10} {tgt:>10} {fitted}  {e['points']}"
          + (f" ({e['negative']} without transfer)" if e["negative"] else ""))
  result = {"pairs": {f"{s}->{t}": e for (s, t), e in results.items()},
            "sources": sources, "targets": targets,
            "k": [[None if np.isnan(v) else float(v) for v in row] for row in k]}
  result["json"] = os.path.join(out, "transfer.json")
  write_json(result["json"], result)
  result["plot"] = plots.heatmap(k, sources, targets, os.path.join(out, "transfer_k.png"),
                                 "effective data transferred: k in D_T = k D_F^alpha N^beta",
                                 "source", "target", "k")
  print(json.dumps(result))


def spectra_command(args):
  """Power-law exponents of every weight matrix's spectrum, a table, a plot, warnings."""
  from bigsci_jax import evaluate, loop
  from bigsci_jax.checkpoint import CheckpointMismatch
  from bigsci_jax.scaling import spectra
  try:
    run, _, params, step = evaluate.restore(args.model_dir)
  except (loop.RunNotFound, CheckpointMismatch) as e:
    raise table.TableError(str(e)) from None
  found, skipped = spectra.analyse(params, spectra.logical_names(run.model),
                                   args.per_head, args.min_tail)
  print(f"{'matrix':<48} {'shape':>12} {'alpha':>7} {'xmin':>9} {'tail':>5}")
  for s in found:
    print(f"{s.name:<48} {'x'.join(map(str, s.shape)):>12} {s.alpha:7.3f} {s.xmin:9.3g} "
          f"{s.tail:5d}" + ("" if s.healthy else "  <- outside [2, 6]"))
  out = args.out or args.model_dir
  os.makedirs(out, exist_ok=True)
  result = {"step": step, "matrices": [dataclasses.asdict(s) for s in found],
            "skipped": skipped, "outside": [s.name for s in found if not s.healthy]}
  if found:
    result["plot"] = spectra.plot(found, os.path.join(out, "spectra.png"))
  result["json"] = os.path.join(out, "spectra.json")
  write_json(result["json"], result)
  if skipped:
    print(f"{len(skipped)} matrices have fewer than {args.min_tail} non-zero eigenvalues and no "
          f"tail fit (e.g. {skipped[0]}).", file=sys.stderr)
  if result["outside"]:
    high = sum(s.alpha > spectra.HEALTHY[1] for s in found if not s.healthy)
    print(f"warning: {len(result['outside'])} of {len(found)} matrices have alpha outside [2, 6] "
          f"({high} above: random-like, under-trained; {len(result['outside']) - high} below: "
          f"over-fitted or too large a learning rate).", file=sys.stderr)
  print(json.dumps(result))


def main(argv):
  parser = argparse.ArgumentParser(prog="python -m bigsci_jax.scaling", description=__doc__)
  commands = parser.add_subparsers(dest="command", required=True)
  p = commands.add_parser("fit", help="fit a scaling law to a runs CSV")
  p.add_argument("--approach", choices=sorted(fit.FITTERS), required=True)
  p.add_argument("--runs", required=True, help="CSV with params, tokens (or flops), loss")
  p.add_argument("--bootstrap", type=int, default=200, help="resamples for the 95%% intervals (0: none)")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--compute", type=float, nargs="*", default=[],
                 help="FLOP budgets to predict the compute-optimal N*, D* (and L*) for")
  p.add_argument("--out", default=None, help="folder for the PNG plots")
  p.add_argument("--by", default=None, help="fit each value of this column apart, e.g. lang")
  p.add_argument("--irreducible", action="store_true", help="kaplan: fit an irreducible loss E too")
  shared = argparse.ArgumentParser(add_help=False)  # the options of both plan commands
  shared.add_argument("--out", required=True)
  shared.add_argument("--base", default=None, help="a RunConfig JSON, or a model_dir (its config.json)")
  shared.add_argument("--convention", default="chinchilla", choices=("kaplan", "chinchilla", "porian"))
  shared.add_argument("--aspect", type=int, default=32)
  shared.add_argument("--head_dim", type=int, default=64)
  shared.add_argument("--ffn_ratio", type=float, default=4.0)
  shared.add_argument("--learning_rate", type=float, default=3e-3)
  shared.add_argument("--lr_exponent", type=float, default=0.0, help="lr = learning_rate * N^exponent")
  shared.add_argument("--batch_size", type=float, default=16)
  shared.add_argument("--b2", type=float, default=0.95)
  shared.add_argument("--hparams", default=None,
                      help="a fit-hparams JSON: learning rate and batch size as power laws in N")
  shared.add_argument("--decay", default=None, choices=("cosine", "linear", "wsd"),
                      help="the LR decay of every run (default: the base's); with wsd, `run` trains "
                           "runs of one model that differ in length as one trunk and cooldown "
                           "branches")
  shared.add_argument("--cooldown_fraction", type=float, default=0.2,
                      help="with --decay wsd: the share of each run spent cooling down")
  p = commands.add_parser("plan", parents=[shared],
                          help="write an isoFLOP sweep plan: shapes, tokens, hyperparameters")
  p.add_argument("--budgets", type=float, nargs="+", required=True, help="FLOP budgets")
  p.add_argument("--sizes_per_budget", type=int, default=4)
  p.add_argument("--spread", type=float, default=4.0)
  p.add_argument("--tokens_per_param", type=float, default=20.0)
  p = commands.add_parser("plan-grid", parents=[shared],
                          help="write a plan of model sizes x tokens-per-parameter ratios")
  p.add_argument("--params", type=float, nargs="+", required=True,
                 help="non-embedding sizes; the shape ladder's nearest are trained")
  p.add_argument("--tokens_per_param", type=float, nargs="+", required=True,
                 help="each size is trained on each of these multiples of its N in tokens")
  p = commands.add_parser("plan-languages", help="runs for per-language data laws and transfer")
  p.add_argument("--languages", nargs="+", required=True)
  p.add_argument("--tokens", type=float, nargs="+", required=True,
                 help="target-token amounts (at least 3) per language")
  p.add_argument("--source_tokens", type=float, required=True,
                 help="tokens each source language is pretrained on before the transfer runs")
  p.add_argument("--pairs", nargs="*", default=None,
                 help="source:target pairs for the transfer runs (default: every ordered pair)")
  p.add_argument("--base", default=None, help="a RunConfig JSON naming the corpus and the model, or a model_dir")
  p.add_argument("--out", required=True)
  p = commands.add_parser("fit-hparams", help="optimal LR and batch size as power laws in N")
  p.add_argument("--runs", required=True, help="CSV: params, loss, learning_rate, batch_size")
  p.add_argument("--out", default=None, help="write the laws here (for plan --hparams)")
  p = commands.add_parser("run", help="train every run of a plan; resumable")
  p.add_argument("--plan", required=True)
  p.add_argument("--no_progress", action="store_true")
  p = commands.add_parser("stages", help="when to grow a model (Shen et al. 2022)")
  p.add_argument("--op", choices=("width", "depth"), required=True)
  source = p.add_mutually_exclusive_group(required=True)
  source.add_argument("--params", type=float, help="non-embedding parameters (Kaplan's law)")
  source.add_argument("--metrics", help="a model_dir whose metrics.jsonl holds the curve")
  p.add_argument("--window", type=float, default=0.5, help="slope window in ln(compute)")
  p = commands.add_parser("diagnose", help="effective model size on a fitted law")
  p.add_argument("--fit", required=True, help="approach 3's fit JSON (E, A, B, alpha, beta)")
  p.add_argument("--model_dir", default=None)
  p.add_argument("--params", type=float, default=None, help="parameters N (all of them)")
  p.add_argument("--tokens", type=float, default=None, help="training tokens D")
  p.add_argument("--loss", type=float, default=None, help="eval loss, nats per token")
  p.add_argument("--runs", default=None, help="reference runs CSV with a downstream-score column")
  p.add_argument("--metric", default=None, help="that column's name")
  p.add_argument("--against", choices=("params", "flops"), default="params")
  p.add_argument("--metric_value", type=float, default=None,
                 help="this model's score (default: its eval_results.json)")
  p = commands.add_parser("mixture", help="mixture rates from per-language data laws")
  p.add_argument("--runs", required=True, help="CSV: language, tokens (of it seen), loss (on it)")
  p.add_argument("--budget", type=float, required=True, help="training tokens of the planned run")
  p.add_argument("--sizes", default=None, help="JSON {language: available tokens}")
  p.add_argument("--epochs_max", type=float, default=4.0,
                 help="with --sizes: at most this many passes over a language's data")
  p.add_argument("--objective", choices=("mean", "max"), default="mean")
  p = commands.add_parser("transfer", help="effective data transferred between languages")
  p.add_argument("--runs", required=True, help="CSV: target, source, params, tokens, loss")
  p.add_argument("--out", default=None, help="folder for transfer.json and transfer_k.png "
                 "(default: the CSV's)")
  p = commands.add_parser("spectra", help="weight-spectrum power-law exponents (weightwatcher's)")
  p.add_argument("--model_dir", required=True)
  p.add_argument("--out", default=None, help="folder for spectra.png and spectra.json "
                 "(default: model_dir)")
  p.add_argument("--per_head", action="store_true", help="attention projections per head")
  p.add_argument("--min_tail", type=int, default=50,
                 help="matrices with fewer non-zero eigenvalues are skipped")
  args = parser.parse_args(argv)
  command = {"fit": fit_command, "plan": plan_command, "plan-grid": plan_command,
             "run": run_command,
             "fit-hparams": fit_hparams_command, "stages": stages_command,
             "plan-languages": plan_languages_command,
             "diagnose": diagnose_command, "mixture": mixture_command,
             "transfer": transfer_command,
             "spectra": spectra_command}[args.command]
  try:
    command(args)
  except (table.TableError, ConfigError, FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
