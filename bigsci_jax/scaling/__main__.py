"""python -m bigsci_jax.scaling fit --approach 1|2|3|kaplan --runs CSV [--bootstrap N]
[--compute C ...] [--out DIR]

Prints one line per fitted quantity and, as the last line, a JSON object with every
fitted quantity and its bootstrap 95% interval `<name>_ci`.
"""

import argparse
import json
import sys

from bigsci_jax.scaling import fit, plots, table


def fit_command(args):
  runs = table.read_csv(args.runs)
  fitter = fit.FITTERS[args.approach]
  kwargs = {"irreducible": args.irreducible} if args.approach == "kaplan" else {}
  point = fitter(runs, **kwargs)
  result = {"approach": args.approach, "runs": len(runs)}
  result.update({k: v for k, v in point.items() if not k.startswith("_")})
  if args.bootstrap:
    result.update(fit.bootstrap(fitter, runs, point, samples=args.bootstrap, seed=args.seed, **kwargs))
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
  for key, value in result.items():
    if isinstance(value, float):
      ci = result.get(f"{key}_ci")
      band = f"  [{ci[0]:.4g}, {ci[1]:.4g}]" if ci else ""
      print(f"{key:>14} = {value:.4g}{band}")
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
  p.add_argument("--irreducible", action="store_true", help="kaplan: fit an irreducible loss E too")
  args = parser.parse_args(argv)
  try:
    fit_command(args)
  except table.TableError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
