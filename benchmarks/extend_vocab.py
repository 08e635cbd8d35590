"""Adapting an English-only model to French with and without vocabulary extension, at
CPU scale (the BLOOM+1 question, Yong et al. 2022, on the embedded handbook).

  python benchmarks/extend_vocab.py [--work /tmp/extend_vocab] [--pretrain_steps 600]
      [--adapt_steps 300] [--new_tokens 1000]

1. pretrains the default tiny model (runs/cpu_smoke.gin) on English alone, with its own
   2000-piece SentencePiece vocabulary;
2. writes the handbook's French as a text folder (train / validation chapters);
3. `extend`: python -m bigsci_jax.extend_vocab adds --new_tokens French pieces, then
   gin/recipes/adapt_language.gin continues on French with English replayed;
   `plain`: the same recipe from the same weights (TrainConfig.init_from) with the
   English vocabulary.
Both adaptations see the same number of tokens. The last stdout line is a JSON object:
the extension's summary and, per run, French and English bits per byte before and after.
"""

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import train  # noqa: E402
from bigsci_jax import corpus  # noqa: E402
from bigsci_jax.extend_vocab import extend_run  # noqa: E402
from bigsci_jax.metrics import read_metrics  # noqa: E402


def _french_folder(folder):
  root = corpus.handbook_root()
  english, splits = corpus.english_paragraphs(root), corpus.split_chapters(root)
  for split in ("train", "validation"):
    docs = corpus.documents(root, "fr-FR", english, chapter_filter=splits[split])
    os.makedirs(os.path.join(folder, split), exist_ok=True)
    with open(os.path.join(folder, split, "part0.txt"), "w", encoding="utf-8") as f:
      f.writelines(" ".join(d["text"].split()) + "\n" for d in docs)


def main(argv):
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--work", default="/tmp/extend_vocab")
  p.add_argument("--pretrain_steps", type=int, default=600)
  p.add_argument("--adapt_steps", type=int, default=300)
  p.add_argument("--new_tokens", type=int, default=1000)
  args = p.parse_args(argv)
  work = args.work
  data = [f"--gin.DataConfig.data_dir='{work}/data'", "--no_progress"]
  english, texts = f"{work}/en", f"{work}/fr"
  if not os.path.exists(os.path.join(english, "checkpoints")):
    assert train.main([f"--model_dir={english}", "--gin.DataConfig.languages=['en']",
                       "--gin.DataConfig.vocab_size=2000",
                       f"--gin.TRAIN_STEPS={args.pretrain_steps}", *data]) == 0
  _french_folder(texts)
  extension = extend_run(english, f"{work}/extend", texts, args.new_tokens)
  adapt = ["--gin_file=recipes/adapt_language.gin", f"--gin.NEW_LANGUAGE={{'fr': '{texts}'}}",
           "--gin.DataConfig.languages=('en',)", f"--gin.TRAIN_STEPS={args.adapt_steps}",
           "--gin.BATCH_SIZE=16", "--gin.SEQ_LEN=128", "--gin.OptimizerConfig.learning_rate=1e-3",
           "--gin.OptimizerConfig.warmup_steps=30",
           f"--gin.TrainConfig.checkpoint_every={args.adapt_steps}", *data]
  assert train.main([f"--model_dir={work}/extend", *adapt]) == 0
  assert train.main([f"--model_dir={work}/plain", "--gin_file=runs/cpu_smoke.gin", *adapt,
                     f"--gin.TrainConfig.init_from='{english}'",
                     f"--gin.DataConfig.vocab_path='{english}/vocab.model'"]) == 0
  result = {"extension": extension}
  for name in ("extend", "plain"):
    before, after = read_metrics(f"{work}/{name}", "eval")
    result[name] = {key: [before[key], after[key]] for key in ("bpb/fr", "bpb/en")}
    result[name]["tokens_seen"] = read_metrics(f"{work}/{name}", "train")[-1]["tokens_seen"]
  print(json.dumps(result))


if __name__ == "__main__":
  main(sys.argv[1:])
