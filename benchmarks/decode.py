"""KV-cache decoding throughput: generated tokens/s for a model config and batch size.

  python benchmarks/decode.py [--gin_file=models/350m.gin] [--batch=1] [--prompt_len=64]
      [--new_tokens=64] [--dtype=float32] [--results=benchmarks/RESULTS.md]

Random weights and prompts (greedy; throughput does not depend on the values).
Timed after a warmup generation that compiles the prefill and the step; the
tokens/s count new tokens over all rows. The last stdout line is a JSON object.
"""

import argparse
import json
import os
import sys
import time

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import train  # noqa: E402  (the gin edge: builds RunConfig from gin files)
from bigsci_jax import flops, generate  # noqa: E402
from bigsci_jax.model import Transformer  # noqa: E402
from benchmarks.results_table import append_row  # noqa: E402


def main(argv):
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--gin_file", action="append", default=[])
  p.add_argument("--batch", type=int, default=1)
  p.add_argument("--prompt_len", type=int, default=64)
  p.add_argument("--new_tokens", type=int, default=64)
  p.add_argument("--dtype", default="float32")
  p.add_argument("--results", default=None)
  args = p.parse_args(argv)
  run, _ = train.build_config(["runs/cpu_smoke.gin"] + args.gin_file,
                              [f"ModelConfig.dtype='{args.dtype}'"])
  model = Transformer(run.model)
  params = jax.jit(lambda key: model.init(key, np.zeros((1, 8), np.int32))["params"])(
      jax.random.key(0))
  rng = np.random.default_rng(0)
  prompts = rng.integers(2, run.model.vocab_size, (args.batch, args.prompt_len)).tolist()
  generate.generate(model, params, prompts, 2)  # compile prefill and step
  start = time.perf_counter()
  generate.generate(model, params, prompts, args.new_tokens)
  seconds = time.perf_counter() - start
  device = jax.devices()[0]
  result = {"model": "+".join(args.gin_file) or "tiny", "params": flops.param_counts(run.model).total,
            "device": device.device_kind, "batch": args.batch, "prompt_len": args.prompt_len,
            "new_tokens": args.new_tokens, "dtype": args.dtype, "seconds": seconds,
            "tokens_per_s": args.batch * args.new_tokens / seconds,
            "ms_per_step": 1e3 * seconds / args.new_tokens, "jax": jax.__version__}
  if args.results:
    append_row(args.results, [
        result["model"], f"{result['params'] / 1e6:.1f}M", result["device"], args.batch,
        args.prompt_len, args.new_tokens, args.dtype, f"{result['ms_per_step']:.1f}",
        f"{result['tokens_per_s']:,.0f}", f"jax {jax.__version__}"])
  print(json.dumps(result))


if __name__ == "__main__":
  main(sys.argv[1:])
