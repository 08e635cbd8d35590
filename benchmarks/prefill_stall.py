"""Chunked prefill: how long running rows stall when a long prompt joins them.

  python benchmarks/prefill_stall.py --model_dir=DIR [--rows=4] [--prompt_tokens=1536]
      [--chunks=0,256,512] [--max_batch=8] [--mesh=DATAxFSDPxTENSOR]
      [--results=benchmarks/RESULTS.md]
  python benchmarks/prefill_stall.py --model_dir=NEW --init_gin=models/125m.gin \
      --init_binding=ModelConfig.vocab_size=8192 --vocab=RUN/vocab.model ...

For each --prefill_chunk setting (0: the prompt prefilled whole), the serving engine
(serve/engine.py, in process, no HTTP) decodes --rows greedy rows of 16-token prompts;
once each has 8 tokens, one request with a prompt of --prompt_tokens random ids (8 new
tokens) joins them. Measured on the running rows: the longest gap between two of their
steps from the long request's arrival to its first token (the stall), against their
median gap before it (a plain step); and the long request's time to its first token.
Each setting runs the scene once to compile its shapes, then again to be timed.
--init_gin writes a random-weight run first (benchmarks/serve.py's init_run). The last
stdout line is a JSON object; --results appends a row per setting.
"""

import argparse
import json
import os
import sys
import threading
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.results_table import append_row  # noqa: E402
from benchmarks.serve import init_run  # noqa: E402


def _scene(engine, rows, prompt_tokens, rng):
  """One long prompt joining `rows` running rows: (stall s, step s, first token s)."""
  from bigsci_jax import generate
  from bigsci_jax.serve.rows import Choice, Job
  vocab = engine.tokenizer.vocab_size
  arrivals = []  # when the running rows got a token (the engine notifies once per step)
  # sampled (a random-weight model's greedy rows tend to reach EOS within a few tokens)
  short = [Choice(rng.integers(3, vocab, 16).tolist(), engine.window - 32,
                  generate.Sampling(temperature=1.0), seed) for seed in range(rows)]
  running = Job(short, lambda: arrivals.append(time.perf_counter()))
  engine.submit(running)
  while any(len(c.tokens) < 8 and not c.finished for c in short):
    time.sleep(0.001)
  first, done = [], threading.Event()
  long_row = Choice(rng.integers(3, vocab, prompt_tokens).tolist(), 8, generate.Sampling(1.0), 0)

  def long_moved():
    if (long_row.tokens or long_row.finished) and not first:  # EOS first: no tokens
      first.append(time.perf_counter())
    if long_row.finished or long_job.error:
      done.set()

  sent = time.perf_counter()
  long_job = Job([long_row], long_moved)
  engine.submit(long_job)
  done.wait(600)
  if long_job.error or running.error:
    raise SystemExit(f"the engine failed: {long_job.error or running.error}")
  if all(c.finished for c in short):
    raise SystemExit("every running row ended (EOS) before the long prompt's first token; "
                     "use more --rows.")
  time.sleep(0.2)  # a few more steps of the running rows
  running.cancel()
  while engine.status()["running"]:
    time.sleep(0.01)
  times = np.array(arrivals)
  gaps = np.diff(times)
  before = gaps[times[1:] < sent]
  during = gaps[(times[1:] > sent) & (times[:-1] < first[0] + 1e-3)]
  return float(during.max()), float(np.median(before)), first[0] - sent


def main(argv):
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--model_dir", required=True)
  p.add_argument("--rows", type=int, default=4)
  p.add_argument("--prompt_tokens", type=int, default=1536)
  p.add_argument("--chunks", default="0,256,512")
  p.add_argument("--max_batch", type=int, default=8)
  p.add_argument("--mesh", default=None, help="the serving mesh (default: the server's)")
  p.add_argument("--results", default=None)
  p.add_argument("--init_gin", action="append", default=[])
  p.add_argument("--init_binding", action="append", default=[])
  p.add_argument("--vocab", default=None, help="with --init_gin: the SentencePiece model to use")
  args = p.parse_args(argv)
  if args.init_gin:
    init_run(args.model_dir, args.init_gin, args.init_binding, args.vocab)
  import jax
  from bigsci_jax.serve.__main__ import load
  device = jax.devices()[0].device_kind
  levels = []
  for chunk in (int(c) for c in args.chunks.split(",")):
    engine, _, _ = load(args.model_dir, args.max_batch, mesh=args.mesh, prefill_chunk=chunk)
    try:
      _scene(engine, args.rows, args.prompt_tokens, np.random.default_rng(0))  # compiles
      stall, step, first = _scene(engine, args.rows, args.prompt_tokens, np.random.default_rng(1))
    finally:
      engine.stop()
    levels.append({"prefill_chunk": chunk, "stall_s": stall, "step_s": step,
                   "first_token_s": first, "window": engine.window})
    print(f"prefill_chunk {chunk}: running rows stalled {stall:.3f} s (a step: {step:.3f} s); "
          f"the {args.prompt_tokens}-token prompt's first token after {first:.3f} s", flush=True)
    if args.results:
      append_row(args.results, [
          os.path.basename(os.path.normpath(args.model_dir)), device, args.rows,
          args.prompt_tokens, chunk or "whole", f"{stall:.3f}", f"{step:.3f}", f"{first:.3f}",
          f"jax {jax.__version__}"])
  print(json.dumps({"model_dir": args.model_dir, "device": device, "mesh": args.mesh,
                    "levels": levels}))


if __name__ == "__main__":
  main(sys.argv[1:])
