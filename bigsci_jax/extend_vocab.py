"""`python -m bigsci_jax.extend_vocab`: a run's vocabulary extended with a new language's
tokens, written as a new run to continue training on that language.

  python -m bigsci_jax.extend_vocab --from_dir=RUN --to_dir=NEW --text_dir=/data/sw
      [--new_tokens=4000] [--pad_to=128] [--sample_chars=2000000] [--eval_docs=64] [--seed=0]

RUN: any run with a tokenizer (trained here, grown, or imported with
`python -m bigsci_jax.hf import`). --text_dir holds the new language as UTF-8 text, one
document per line (<dir>/train/*.txt and optionally <dir>/validation/*.txt, or
<dir>/*.txt), as DataConfig.text_dirs reads it. Tokens are learned on the first
--sample_chars characters of its training text and appended to RUN's tokenizer (every
existing token keeps its id; bigsci_jax.adapt.vocabulary says how, and how the new
embedding rows start). The model's vocab_size grows to hold them, rounded up to a
multiple of --pad_to (the tensor axis shards the vocabulary).

NEW is a run at step 0: RUN's config with the new vocab_size, the extended tokenizer
(its text is read with it), RUN's latest parameters with the new rows, and a fresh
optimizer state. Continue it with gin/recipes/adapt_language.gin:

  python train.py --model_dir=NEW --gin_file=recipes/adapt_language.gin \\
      --gin.NEW_LANGUAGE="{'sw': '/data/sw'}"

The last stdout line is a JSON object: tokens added and how many of them the text uses,
tokens per UTF-8 byte of the new language before and after, and, when the folder has a
validation split, bits per byte of its first --eval_docs documents under RUN and under
NEW (before any training: the new rows are only a starting point).
"""

import argparse
import dataclasses
import json
import os
import sys

import jax

from bigsci_jax import corpus, evaluate, loop, tokenizer
from bigsci_jax.adapt import vocabulary
from bigsci_jax.config import ConfigError
from bigsci_jax.metrics import bits_per_byte


def _bits_per_byte(model_dir, restored, texts):
  """Bits per UTF-8 byte of texts under model_dir's run, restored: evaluate.restore's
  (run, runtime, params, step) with batch_size 1."""
  run, runtime, params, _ = restored
  scorer = evaluate.make_scorer(model_dir, run, runtime, params, batch_size=1)
  return float(bits_per_byte(-scorer.loglikelihood_rolling(texts).sum(),
                             sum(len(t.encode()) for t in texts)))


def extend_run(from_dir, to_dir, text_dir, new_tokens=4000, *, pad_to=128,
               sample_chars=2_000_000, eval_docs=64, seed=0):
  """Write to_dir as from_dir with new_tokens tokens of text_dir's language; the summary."""
  if os.path.exists(os.path.join(to_dir, "checkpoints")):
    raise vocabulary.VocabularyError(f"{to_dir} already holds a run; pass an empty --to_dir.")
  if pad_to < 1:
    raise vocabulary.VocabularyError(f"--pad_to={pad_to} must be >= 1.")
  run = loop.read_run(from_dir)
  files = tokenizer.read_files(from_dir)
  if files is None:
    raise vocabulary.VocabularyError(f"{from_dir} keeps no tokenizer (it trained on synthetic "
                                     f"data); extend a run that reads text.")
  old_tok = tokenizer.from_files(files)
  texts = [t for t in corpus.folder_texts(text_dir, sample_chars) if t.strip()]
  extension = vocabulary.extend(files, texts, new_tokens, seed)
  new_tok = tokenizer.from_files(extension.files)
  needed = max(run.model.vocab_size, new_tok.vocab_size)
  vocab_size = -(-needed // pad_to) * pad_to
  held_out = [t for t in corpus.folder_texts(text_dir, sample_chars, "validation")
              if t.strip()][:eval_docs]
  sample = held_out or texts
  sample_bytes = sum(len(t.encode()) for t in sample)
  sample_ids = [i for t in sample for i in new_tok.encode(t, special_tokens=False)]
  result = {"new_tokens": len(extension.new_ids),
            "new_tokens_used": len(set(sample_ids).intersection(extension.new_ids)),
            "vocab_size_before": run.model.vocab_size, "vocab_size_after": vocab_size,
            "tokens_per_byte_before": sum(len(old_tok.encode(t, special_tokens=False))
                                          for t in sample) / sample_bytes,
            "tokens_per_byte_after": len(sample_ids) / sample_bytes}

  source = evaluate.restore(from_dir, batch_size=1)  # on this machine's devices
  if held_out:
    result["bpb_before"] = _bits_per_byte(from_dir, source, held_out)
  here, _, params, _ = source
  params, result["rows_from_mean"] = vocabulary.extend_params(
      jax.device_get(params), run.model, old_tok, new_tok, extension.new_ids, vocab_size)
  del source
  extended = dataclasses.replace(
      run, model=dataclasses.replace(run.model, vocab_size=vocab_size),
      data=dataclasses.replace(run.data, vocab_path="", vocab_size=new_tok.vocab_size))
  loop.write_params_run(to_dir, extended, params, extension.files, seed, mesh=here.mesh)
  if held_out:
    result["bpb_after"] = _bits_per_byte(to_dir, evaluate.restore(to_dir, batch_size=1),
                                         held_out)
  return result


def main(argv):
  p = argparse.ArgumentParser(prog="python -m bigsci_jax.extend_vocab", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--from_dir", required=True)
  p.add_argument("--to_dir", required=True)
  p.add_argument("--text_dir", required=True)
  p.add_argument("--new_tokens", type=int, default=4000)
  p.add_argument("--pad_to", type=int, default=128)
  p.add_argument("--sample_chars", type=int, default=2_000_000)
  p.add_argument("--eval_docs", type=int, default=64)
  p.add_argument("--seed", type=int, default=0)
  args = p.parse_args(argv)
  try:
    result = extend_run(args.from_dir, args.to_dir, args.text_dir, args.new_tokens,
                        pad_to=args.pad_to, sample_chars=args.sample_chars,
                        eval_docs=args.eval_docs, seed=args.seed)
  except (vocabulary.VocabularyError, corpus.CorpusError, ConfigError, loop.RunNotFound,
          tokenizer.TokenizerError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(json.dumps(result))
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
