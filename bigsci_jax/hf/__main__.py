"""Hugging Face interoperability commands ([hf] extra).

  python -m bigsci_jax.hf export --model_dir=DIR --out=HF_DIR [--arch=auto|bloom|llama]
      [--dtype=float32|bfloat16] [--shard_gib=5]
  python -m bigsci_jax.hf import --hf_dir=HF_DIR --model_dir=DIR [--max_len=N]
  python -m bigsci_jax.hf tokenizer --model_dir=DIR --out=HF_DIR

export: the run's latest parameters as a transformers BLOOM or Llama checkpoint
(config.json, safetensors, generation_config.json) with its tokenizer (hf/exporter.py).
import: a transformers BLOOM or Llama checkpoint as a run at step 0 (hf/importer.py).
tokenizer: the run's SentencePiece vocabulary (DIR/vocab.model) as a fast tokenizer
(tokenizer.json, tokenizer_config.json, special_tokens_map.json) giving the same ids,
for clients such as lm-evaluation-harness's `tokenizer_backend=huggingface`.
The last stdout line is a JSON summary; bad input stops with one sentence, exit 2.
"""

import argparse
import json
import os
import sys


def _tokenizer(args):
  from bigsci_jax import loop
  from bigsci_jax.hf.tokenizer import TokenizerExportError, write
  from bigsci_jax.tokenizer import SPM_FILE
  vocab = os.path.join(args.model_dir, SPM_FILE)
  if not os.path.exists(vocab):
    raise TokenizerExportError(f"{args.model_dir} has no {SPM_FILE}: give the model_dir of a "
                               f"run trained on text here.")
  run = loop.read_run(args.model_dir)
  with open(vocab, "rb") as f:
    return {"written": write(f.read(), args.out, run.model.max_len)}


def _export(args):
  from bigsci_jax.hf.exporter import export
  return export(args.model_dir, args.out, args.arch, args.dtype, args.shard_gib)


def _import(args):
  from bigsci_jax.hf.importer import import_hf
  return import_hf(args.hf_dir, args.model_dir, args.max_len)


def main(argv):
  p = argparse.ArgumentParser(prog="python -m bigsci_jax.hf", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  commands = p.add_subparsers(dest="command", required=True)
  exp = commands.add_parser("export", help="write the run as a transformers checkpoint")
  exp.add_argument("--model_dir", required=True)
  exp.add_argument("--out", required=True)
  exp.add_argument("--arch", default="auto", choices=("auto", "bloom", "llama"))
  exp.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
  exp.add_argument("--shard_gib", type=float, default=5.0, help="largest safetensors file")
  imp = commands.add_parser("import", help="write a transformers checkpoint as a run")
  imp.add_argument("--hf_dir", required=True)
  imp.add_argument("--model_dir", required=True)
  imp.add_argument("--max_len", type=int, default=None,
                   help="context window (default: the config's, 2048 for BLOOM)")
  tok = commands.add_parser("tokenizer", help="write the run's vocabulary as tokenizer.json")
  tok.add_argument("--model_dir", required=True)
  tok.add_argument("--out", required=True)
  args = p.parse_args(argv)
  from bigsci_jax import loop
  from bigsci_jax.checkpoint import CheckpointMismatch
  from bigsci_jax.config import ConfigError
  from bigsci_jax.hf.convert import ConversionError
  from bigsci_jax.hf.tokenizer import TokenizerExportError
  from bigsci_jax.tokenizer import TokenizerError
  try:
    summary = {"export": _export, "import": _import, "tokenizer": _tokenizer}[args.command](args)
  except ImportError as e:
    print(f"error: {args.command} needs the [hf] extra (cannot import {e.name}): "
          f"pip install -e '.[hf]'.", file=sys.stderr)
    return 2
  except (ConversionError, TokenizerExportError, loop.RunNotFound, CheckpointMismatch,
          ConfigError, TokenizerError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(json.dumps(summary))
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
