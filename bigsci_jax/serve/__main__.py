"""Serve a run's latest checkpoint over HTTP with OpenAI's legacy completions API.

  python -m bigsci_jax.serve --model_dir=DIR [--host 127.0.0.1 --port 8000] [--name NAME]
      [--max_batch 16 --gather_ms 5] [--max_prompt_tokens N] [--prefill_chunk 512]
      [--warmup] [--prompt_dir=P]
      [--offload=host] [--mesh=DATAxFSDPxTENSOR]

Endpoints: POST /v1/completions (text and log-probabilities, `echo` for scoring,
`stream` for server-sent events), GET /v1/models, GET /health, GET /tokenizer_info,
POST /tokenize, POST /detokenize (vLLM's shapes). lm-evaluation-harness drives it
with `--model local-completions --model_args base_url=http://HOST:PORT/v1/completions,
model=NAME,tokenizer_backend=remote`. The checkpoint is placed on every device
present (data parallel when they divide --max_batch), or as --mesh says: e.g. 1x1x4
splits every layer's heads and MLP over 4 devices (tensor parallel, for a model one
device cannot hold), 2x1x2 adds two data-parallel halves of the rows (--max_batch a
multiple of 2). Requests are batched
continuously (serve/engine.py: new rows join the running ones between decoding
steps); --warmup compiles every bucket before the port opens.
--max_prompt_tokens: refuse longer prompts (default: any that fits the window with its
max_tokens); the prompt widths to compile stop at its bucket, while rows may still
decode up to the whole window (a long window's warmup need not prefill long prompts).
--prefill_chunk: a causal model's longer prompts are prefilled this many tokens at a
time, between the running rows' decoding steps, so those pause for one chunk's work at
a time instead of the whole prompt's (0: whole; a prefix LM's prompts always are).
SIGTERM stops accepting connections, finishes what is in flight and exits 0.
--prompt_dir: an adapter (python -m bigsci_jax.prompt_tune), named in /v1/models'
metadata. A soft prompt starts every request's prompt, invisibly: tokens, offsets
and echo cover the request's own text, and max_model_len is the window less the
prompt's virtual tokens. LoRA factors are merged into the weights once, at load.
--offload=host: the parameters stay in pinned host memory and each layer's weights
reach the device as the layer scan gets to it, so a model larger than the devices'
memory is served (every call reads all weights over the host link).
Needs the [serve] extra (FastAPI, uvicorn). Port 0 picks a free port; the line
`serving NAME on http://HOST:PORT` says which.
"""

import argparse
import importlib
import os
import signal
import socket
import sys

from bigsci_jax.config import OFFLOAD


def bind(host, port):
  """A listening socket on (host, port); OSError if the port is taken."""
  family = socket.AF_INET6 if ":" in host else socket.AF_INET
  sock = socket.socket(family, socket.SOCK_STREAM)
  sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
  try:
    sock.bind((host, port))
  except OSError:
    sock.close()
    raise
  sock.listen(2048)
  sock.set_inheritable(True)
  return sock


def load(model_dir, max_batch, prompt_dir=None, offload="none", max_prompt=None, mesh=None,
         prefill_chunk=512):
  """(engine, tokenizer, name metadata) for a run's latest checkpoint (and an adapter),
  its parameters in pinned host memory for offload="host", over `mesh`
  ('DATAxFSDPxTENSOR'; default evaluate.restore's)."""
  from bigsci_jax import evaluate, loop
  from bigsci_jax.adapt import store
  from bigsci_jax.serve.engine import Engine
  run, runtime, params, step = evaluate.restore(model_dir, max_batch, offload, mesh)
  tokenizer = loop.read_tokenizer(model_dir)
  params = store.attach_dir(params, prompt_dir, run.model)
  engine = Engine(runtime.model, params, tokenizer, mesh=runtime.mesh, max_batch=max_batch,
                  max_prompt=max_prompt, prefill_chunk=prefill_chunk)
  metadata = {"attention": run.model.mask, "step": step, "bos_token_id": tokenizer.bos_id,
              "offload": offload,
              "mesh": {k: int(v) for k, v in runtime.mesh.shape.items()},
              "max_model_len": engine.max_len,
              "echo_logprobs": "causal: each prompt token after the tokens before it"
                               + (" (not inside the bidirectional prefix, where it would see "
                                  "itself); generated tokens follow the prompt as the prefix"
                                  if run.model.mask == "prefix" else "")}
  if prompt_dir:
    metadata["adapter"] = store.describe(prompt_dir)
  return engine, tokenizer, metadata


def main(argv):
  p = argparse.ArgumentParser(prog="python -m bigsci_jax.serve", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--model_dir", required=True)
  p.add_argument("--host", default="127.0.0.1")
  p.add_argument("--port", type=int, default=8000)
  p.add_argument("--name", default=None, help="the model's name in the API (default: the "
                 "model_dir's last component)")
  p.add_argument("--max_batch", type=int, default=16, help="rows decoded together: the KV cache's rows, made once")
  p.add_argument("--gather_ms", type=float, default=5.0, help="a batch stops gathering after this long with no new row")
  p.add_argument("--max_prompt_tokens", type=int, default=None,
                 help="refuse longer prompts (default: any that fits the window)")
  p.add_argument("--prefill_chunk", type=int, default=512,
                 help="prefill longer prompts this many tokens at a time (a power of two; 0: whole)")
  p.add_argument("--warmup", action="store_true", help="compile every bucket before serving")
  p.add_argument("--prompt_dir", default=None, help="an adapter (soft prompt or LoRA) to apply")
  p.add_argument("--offload", default="none", choices=OFFLOAD,
                 help="host: parameters in pinned host memory, one layer on the device at a time")
  p.add_argument("--mesh", default=None, help="DATAxFSDPxTENSOR: the devices the model is "
                 "placed over (e.g. 1x1x4); default data parallel over all, or one device")
  args = p.parse_args(argv)
  if args.max_prompt_tokens is not None and args.max_prompt_tokens < 1:
    print(f"error: --max_prompt_tokens must be at least 1, not {args.max_prompt_tokens}.",
          file=sys.stderr)
    return 2
  chunk = args.prefill_chunk
  if chunk < 0 or chunk == 1 or chunk & (chunk - 1):
    print(f"error: --prefill_chunk must be 0 or a power of two of at least 2, not {chunk}.",
          file=sys.stderr)
    return 2
  try:  # the whole web stack now, not after the model has loaded and compiled
    importlib.import_module("fastapi")
    import uvicorn
    from bigsci_jax.serve.api import make_app
  except ImportError as e:
    print(f"error: the server needs the [serve] extra (cannot import {e.name}): "
          f"pip install -e '.[serve]'.", file=sys.stderr)
    return 2
  from bigsci_jax import evaluate, loop
  from bigsci_jax.adapt.store import AdapterError
  from bigsci_jax.checkpoint import CheckpointMismatch
  from bigsci_jax.config import ConfigError
  try:
    sock = bind(args.host, args.port)
  except OSError as e:
    print(f"error: cannot listen on {args.host}:{args.port} ({e.strerror}): stop what is using "
          f"the port or pass another --port.", file=sys.stderr)
    return 2
  name = args.name or os.path.basename(os.path.normpath(args.model_dir))
  try:
    engine, tokenizer, metadata = load(args.model_dir, args.max_batch, args.prompt_dir,
                                       args.offload, args.max_prompt_tokens, args.mesh,
                                       args.prefill_chunk)
  except (loop.RunNotFound, evaluate.EvaluationError, CheckpointMismatch, AdapterError,
          ConfigError) as e:
    sock.close()
    print(f"error: {e}", file=sys.stderr)
    return 2
  if args.warmup:
    engine.warmup()
  app = make_app(engine, tokenizer, name, metadata)
  server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=600))
  # uvicorn re-raises the signal that stopped it once it has shut down gracefully; this
  # handler takes it, so SIGTERM ends the process with 0.
  signal.signal(signal.SIGTERM, lambda *_: None)
  host, port = sock.getsockname()[:2]
  print(f"serving {name} on http://{host}:{port}", flush=True)
  try:
    server.run(sockets=[sock])
  finally:
    engine.stop()
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
