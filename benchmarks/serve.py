"""Completions-server throughput: generated tokens/s with 1 and with N concurrent clients.

  python benchmarks/serve.py --model_dir=DIR [--concurrency=1,16] [--requests=8]
      [--prompt_tokens=32] [--max_tokens=32] [--min_tokens=N] [--max_batch=16]
      [--results=benchmarks/RESULTS.md]
  python benchmarks/serve.py --model_dir=NEW --init_gin=models/350m.gin \
      --init_binding=ModelConfig.vocab_size=8192 --vocab=RUN/vocab.model ...

With --init_gin, NEW (which must hold no run) first becomes a run of that model with
random weights (a checkpoint at step 0 and the given vocabulary): throughput does
not depend on what the weights are, and no data pipeline or TensorFlow is needed.

Starts `python -m bigsci_jax.serve --warmup --max_prompt_tokens=P` on the run (P =
--prompt_tokens: the warmup prefills only the prompt widths used, whatever the
window), then for each concurrency level C runs C clients, each sending
`--requests` greedy requests back to back (a
prompt of --prompt_tokens random in-vocabulary ids, up to --max_tokens new tokens, or
with --min_tokens a max_tokens drawn uniformly from [min_tokens, max_tokens] per
request, the same draws for every level and run; a row that reaches EOS stops early,
so tokens are counted from each response's `usage`). Throughput = completion tokens /
wall time of the level; latency = each request's time from sending to the whole
response (p50 and p90 of the level). One warm-up level at the same concurrency runs
first and is not counted. The last stdout line is a JSON object; with --results a row
per level is appended.
"""

import argparse
import concurrent.futures
import json
import multiprocessing
import os
import signal
import subprocess
import sys
import time

import numpy as np
import requests

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.results_table import append_row  # noqa: E402


def _level(url, clients, count, prompts, lengths):
  """(completion tokens, wall seconds, [seconds per request]) of `clients` clients each
  sending `count` requests back to back; request i: prompts[i], max_tokens lengths[i]."""
  def client(c):
    tokens, latencies = 0, []
    for k in range(count):
      i = (c * count + k) % len(prompts)
      sent = time.perf_counter()
      r = requests.post(f"{url}/v1/completions", timeout=600, json={
          "prompt": prompts[i], "max_tokens": int(lengths[i]), "temperature": 0})
      r.raise_for_status()
      latencies.append(time.perf_counter() - sent)
      tokens += r.json()["usage"]["completion_tokens"]
    return tokens, latencies

  start = time.perf_counter()
  with concurrent.futures.ThreadPoolExecutor(clients) as pool:
    done = list(pool.map(client, range(clients)))
  return (sum(t for t, _ in done), time.perf_counter() - start,
          [s for _, latencies in done for s in latencies])


def init_run(model_dir, gin_files, bindings, vocab):
  """A run of the gin files' model with random weights and `vocab`, at step 0."""
  import dataclasses
  import train
  from bigsci_jax import loop, tokenizer
  from bigsci_jax import step as steps
  from bigsci_jax.config import MeshConfig
  if os.path.exists(os.path.join(model_dir, "checkpoints")) or not vocab or not os.path.isfile(
      vocab):
    raise SystemExit(f"--init_gin needs an empty --model_dir ({model_dir} holds a run) and "
                     f"--vocab=FILE (a vocab.model or tokenizer.json).")
  run, _ = train.build_config(["runs/cpu_smoke.gin"] + gin_files, bindings)
  run = dataclasses.replace(run, mesh=MeshConfig(1, 1, 1))
  runtime = loop.Runtime(run)
  state = steps.init_state(runtime.model, runtime.tx, runtime.mesh, 0, run.batch.seq_len)
  loop.write_run(model_dir, run, state, 0, {"rows": 0}, tokenizer.read_files(vocab))
  print(f"wrote a random-weight run to {model_dir}", flush=True)


def main(argv):
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--model_dir", required=True)
  p.add_argument("--concurrency", default="1,16")
  p.add_argument("--requests", type=int, default=8)
  p.add_argument("--prompt_tokens", type=int, default=32)
  p.add_argument("--max_tokens", type=int, default=32)
  p.add_argument("--min_tokens", type=int, default=None,
                 help="draw each request's max_tokens from [min_tokens, max_tokens]")
  p.add_argument("--max_batch", type=int, default=16)
  p.add_argument("--results", default=None)
  p.add_argument("--init_gin", action="append", default=[],
                 help="write a random-weight run of these gin files into --model_dir first")
  p.add_argument("--init_binding", action="append", default=[])
  p.add_argument("--vocab", default=None, help="with --init_gin: the SentencePiece model to use")
  args = p.parse_args(argv)
  if args.init_gin:  # in its own process, so that it holds no accelerator memory after
    init = multiprocessing.get_context("spawn").Process(
        target=init_run, args=(args.model_dir, args.init_gin, args.init_binding, args.vocab))
    init.start()
    init.join()
    if init.exitcode:
      raise SystemExit(f"writing the random-weight run failed (exit {init.exitcode}).")
  proc = subprocess.Popen([sys.executable, "-m", "bigsci_jax.serve",
                           f"--model_dir={args.model_dir}", "--port=0", "--warmup",
                           f"--max_batch={args.max_batch}",
                           f"--max_prompt_tokens={args.prompt_tokens}"],
                          stdout=subprocess.PIPE, text=True)
  try:
    line = proc.stdout.readline()
    if not line.startswith("serving"):
      raise SystemExit(f"the server did not start: {line}")
    url = line.split(" on ")[1].strip()
    info = requests.get(f"{url}/tokenizer_info", timeout=60).json()
    rng = np.random.default_rng(0)
    prompts = rng.integers(3, info["vocab_size"], (64, args.prompt_tokens)).tolist()
    lengths = rng.integers(args.min_tokens or args.max_tokens, args.max_tokens + 1, 64)
    levels = []
    for clients in (int(c) for c in args.concurrency.split(",")):
      _level(url, clients, 1, prompts, lengths)  # warm-up
      batches = requests.get(f"{url}/health", timeout=60).json()["batches"]
      tokens, seconds, latencies = _level(url, clients, args.requests, prompts, lengths)
      batches = requests.get(f"{url}/health", timeout=60).json()["batches"] - batches
      levels.append({"clients": clients, "tokens": tokens, "seconds": seconds,
                     "tokens_per_s": tokens / seconds,
                     "latency_p50_s": float(np.percentile(latencies, 50)),
                     "latency_p90_s": float(np.percentile(latencies, 90)),
                     "rows_per_batch": clients * args.requests / batches})
  finally:
    proc.send_signal(signal.SIGTERM)
    proc.wait(120)
  import jax
  device = jax.devices()[0].device_kind
  base = levels[0]["tokens_per_s"]
  for level in levels:
    level["speedup"] = level["tokens_per_s"] / base
    if args.results:
      tokens = (f"{args.min_tokens}-{args.max_tokens}" if args.min_tokens
                else args.max_tokens)
      append_row(args.results, [
          os.path.basename(os.path.normpath(args.model_dir)), device, level["clients"],
          args.prompt_tokens, tokens, args.max_batch, level["tokens"],
          f"{level['seconds']:.1f}", f"{level['tokens_per_s']:,.0f}", f"{level['speedup']:.1f}x",
          f"{level['latency_p50_s']:.2f}", f"{level['latency_p90_s']:.2f}",
          f"jax {jax.__version__}"])
  print(json.dumps({"model_dir": args.model_dir, "device": device, "levels": levels}))


if __name__ == "__main__":
  main(sys.argv[1:])
