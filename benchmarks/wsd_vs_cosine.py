"""Warmup-stable-decay against cosine on the handbook mixture at CPU scale, and what
cooldown branches save (Hägele et al. 2024 find a 20% 1-sqrt cooldown matches cosine).

  python benchmarks/wsd_vs_cosine.py [--steps 150 300 600] [--work /tmp/wsd_vs_cosine]
      [--out benchmarks/wsd]

The embedded default run (gin/runs/default.gin: the ~1.5M-parameter model, 16 x 128
tokens per step, warmup 60) is trained for each length with the cosine schedule and
with 'wsd' (cooldown 20%, the same final fraction 0.1): the cosine runs one by one,
the wsd runs as the sweep trains them (scaling/sweep.branch_runs: the longest run is the
trunk and the others branch from their cooldown start). Each run's final evaluation is
on the whole validation split of the 14 languages. results.json goes to --out; the last
stdout line is its JSON: per length the two final losses and bits per byte, and the
steps each schedule trained.
"""

import argparse
import dataclasses
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import train  # noqa: E402
from bigsci_jax import loop  # noqa: E402
from bigsci_jax.metrics import read_metrics  # noqa: E402
from bigsci_jax.scaling.sweep import branch_runs  # noqa: E402


def _final(model_dir, steps):
  (line,) = [r for r in read_metrics(model_dir, "eval") if r["step"] == steps]
  return {"loss": line["loss"], "bpb": line["bpb"]}


def main(argv):
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--steps", type=int, nargs="+", default=[150, 300, 600])
  p.add_argument("--work", default="/tmp/wsd_vs_cosine")
  p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "wsd"))
  args = p.parse_args(argv)
  base, _ = train.build_config([train.DEFAULT_GIN], ["TrainConfig.eval_every = 0"])

  def with_schedule(steps, decay):
    return dataclasses.replace(
        base, optimizer=dataclasses.replace(base.optimizer, decay=decay, cooldown_fraction=0.2),
        train=dataclasses.replace(base.train, train_steps=steps, checkpoint_every=steps))

  results = {"steps": args.steps, "cosine": {}, "wsd": {}, "trained_steps": {}}
  cosine = {f"cosine_{s}": with_schedule(s, "cosine") for s in args.steps}
  wsd = {f"wsd_{s}": with_schedule(s, "wsd") for s in args.steps}
  dirs = {name: os.path.join(args.work, name) for name in [*cosine, *wsd]}
  arranged, branched = branch_runs(wsd, dirs)
  for name, run in [*cosine.items(), *arranged.items()]:
    if not [r for r in read_metrics(dirs[name], "eval") if r["step"] == run.train.train_steps]:
      loop.train(run, dirs[name])  # (resuming a run cut short)
  for steps in args.steps:
    results["cosine"][steps] = _final(dirs[f"cosine_{steps}"], steps)
    results["wsd"][steps] = _final(dirs[f"wsd_{steps}"], steps)
  results["trained_steps"] = {"cosine": sum(args.steps),
                              "wsd": sum(args.steps) - sum(branched.values())}
  os.makedirs(args.out, exist_ok=True)
  with open(os.path.join(args.out, "results.json"), "w") as f:
    json.dump(results, f, indent=1)
  for steps in args.steps:
    c, w = results["cosine"][steps], results["wsd"][steps]
    print(f"{steps:>5} steps: cosine loss {c['loss']:.4f} bpb {c['bpb']:.4f} | "
          f"wsd loss {w['loss']:.4f} bpb {w['bpb']:.4f}")
  print(json.dumps(results))
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
