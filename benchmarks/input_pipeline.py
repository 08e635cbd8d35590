"""Input pipeline throughput against what training consumes, on the embedded default.

  python benchmarks/input_pipeline.py [--batches=200] [--gin_file=runs/default.gin]
      [--gin=BINDING ...] [--results=benchmarks/RESULTS.md]

Reads `--batches` global batches of the run's mixture through the real pipeline
(seqio + TFDS + SentencePiece, packed; the data prepared first if needed) and
reports packed tokens/s; then trains the run's model on those same batches and
reports tokens/s consumed. Each is timed alone, after a warmup (the first batch,
the compile). The last stdout line is a JSON object.
"""

import argparse
import json
import os
import sys
import time

import jax

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import train  # noqa: E402  (the gin edge: builds RunConfig from gin files)
from bigsci_jax import data, sharding  # noqa: E402
from bigsci_jax import step as steps  # noqa: E402
from bigsci_jax.model import Transformer  # noqa: E402
from bigsci_jax.optim import make_optimizer  # noqa: E402
from benchmarks.results_table import append_row  # noqa: E402


def main(argv):
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--gin_file", action="append", default=[])
  p.add_argument("--gin", action="append", default=[], help="extra binding")
  p.add_argument("--batches", type=int, default=200)
  p.add_argument("--train_steps", type=int, default=30)
  p.add_argument("--results", default=None, help="append a markdown row to this file")
  args = p.parse_args(argv)
  run, _ = train.build_config(args.gin_file or [train.DEFAULT_GIN], args.gin)
  rows, seq_len = run.batch.batch_size, run.batch.seq_len

  from bigsci_jax import pipeline  # TensorFlow only from here on
  start = time.perf_counter()
  source, _, _ = pipeline.open_corpus(run)
  source.take(rows)
  startup = time.perf_counter() - start
  start = time.perf_counter()
  batches = [source.take(rows) for _ in range(args.batches)]
  read_s = time.perf_counter() - start
  real = sum(int((b["decoder_segment_ids"] > 0).sum()) for b in batches)
  pipeline_tokens_per_s = args.batches * rows * seq_len / read_s

  mesh = sharding.make_mesh(run.mesh)
  model = Transformer(run.model)
  tx, schedule = make_optimizer(run.optimizer, run.train.train_steps, run.batch.batch_size)
  _, shardings = steps.abstract_state(model, tx, mesh, seq_len)
  state = steps.init_state(model, tx, mesh, 0, seq_len)
  train_step = steps.make_train_step(model, tx, schedule, mesh, shardings)
  in_sharding = sharding.batch_sharding(mesh, 3, batch_axis=1)
  accumulation = rows // run.batch.micro_batch_size
  device_batches = [data.to_global(data.split_micro_batches(b, accumulation), in_sharding,
                                   run.batch.micro_batch_size) for b in batches]
  state, metrics = train_step(state, device_batches[0])
  jax.block_until_ready(metrics)
  start = time.perf_counter()
  for i in range(args.train_steps):
    state, metrics = train_step(state, device_batches[(i + 1) % len(device_batches)])
  jax.block_until_ready(metrics)
  train_tokens_per_s = args.train_steps * rows * seq_len / (time.perf_counter() - start)

  result = {
      "mixture": run.data.mixture,
      "batch_rows": rows, "seq_len": seq_len, "startup_s": startup,
      "pipeline_tokens_per_s": pipeline_tokens_per_s, "non_padding_fraction": real / (
          args.batches * rows * seq_len),
      "train_tokens_per_s": train_tokens_per_s,
      "ratio": pipeline_tokens_per_s / train_tokens_per_s,
      "device": jax.devices()[0].device_kind, "cpus": os.cpu_count(), "jax": jax.__version__,
  }
  if args.results:
    append_row(args.results, [
        run.data.mixture, f"{rows} x {seq_len}", f"{result['device']} ({os.cpu_count()} cores)",
        f"{startup:.1f}", f"{pipeline_tokens_per_s:,.0f}", f"{result['non_padding_fraction']:.1%}",
        f"{train_tokens_per_s:,.0f}", f"{result['ratio']:.1f}x"])
  print(json.dumps(result))


if __name__ == "__main__":
  main(sys.argv[1:])
