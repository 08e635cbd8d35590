"""Hugging Face interoperability commands.

  python -m bigsci_jax.hf tokenizer --model_dir=DIR --out=HF_DIR

tokenizer: the run's SentencePiece vocabulary (DIR/vocab.model) as a fast tokenizer
(tokenizer.json, tokenizer_config.json, special_tokens_map.json) giving the same ids,
for clients such as lm-evaluation-harness's `tokenizer_backend=huggingface`. Needs the
[hf] extra (tokenizers; transformers to load it with AutoTokenizer).
"""

import argparse
import json
import os
import sys


def main(argv):
  p = argparse.ArgumentParser(prog="python -m bigsci_jax.hf", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  commands = p.add_subparsers(dest="command", required=True)
  tok = commands.add_parser("tokenizer", help="write the run's vocabulary as tokenizer.json")
  tok.add_argument("--model_dir", required=True)
  tok.add_argument("--out", required=True)
  args = p.parse_args(argv)
  from bigsci_jax import loop
  from bigsci_jax.hf.tokenizer import TokenizerExportError, write
  vocab = os.path.join(args.model_dir, loop.VOCAB_FILE)
  try:
    if not os.path.exists(vocab):
      raise TokenizerExportError(f"{args.model_dir} has no {loop.VOCAB_FILE}: give the "
                                 f"model_dir of a run trained on text.")
    run = loop.read_run(args.model_dir)
    with open(vocab, "rb") as f:
      paths = write(f.read(), args.out, run.model.max_len)
  except ImportError:
    print("error: exporting a tokenizer needs the [hf] extra: pip install -e '.[hf]'.",
          file=sys.stderr)
    return 2
  except (TokenizerExportError, loop.RunNotFound) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(json.dumps({"written": paths}))
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
