"""gin/recipes/adapt_language.gin end to end: a transformers BLOOM checkpoint (random
weights, a byte-level BPE tokenizer trained here with `tokenizers`) imported, then its
pretraining continued on a new language read from a folder of text, with English from
the embedded handbook replayed; the new language's loss falls, and a run stopped halfway
resumes bit-exactly."""

import json
import os
import shutil

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("seqio")

import train  # noqa: E402
from bigsci_jax import corpus, evaluate  # noqa: E402
from bigsci_jax.hf.__main__ import main as hf_main  # noqa: E402
from bigsci_jax.metrics import read_metrics  # noqa: E402

NEW = "fr-FR"  # the language the imported model is adapted to


def _documents(locale):
  try:
    root = corpus.handbook_root()
  except corpus.CorpusError as e:
    pytest.skip(str(e))
  english = corpus.english_paragraphs(root)
  return [d["text"] for d in corpus.documents(root, locale, english)]


def _hf_checkpoint(folder, locales=("en-US", NEW)):
  """A tiny BLOOM with a byte-level BPE tokenizer trained on these locales' text."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
  backend = Tokenizer(models.BPE())
  backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  backend.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=512, special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  backend.train_from_iterator([t[:5000] for locale in locales for t in _documents(locale)],
                              trainer)
  os.makedirs(folder)
  backend.save(os.path.join(folder, "tokenizer.json"))
  with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
    json.dump({"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>",
               "unk_token": "<unk>"}, f)
  config = transformers.BloomConfig(vocab_size=512, hidden_size=32, n_layer=2, n_head=4,
                                    bos_token_id=1, eos_token_id=2, pad_token_id=3)
  torch.manual_seed(0)
  model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
  model.save_pretrained(folder, safe_serialization=True)


def _text_folder(folder, docs):
  """docs as a text folder: one document per line, the last two in validation/."""
  for split, part in (("train", docs[:-2]), ("validation", docs[-2:])):
    os.makedirs(os.path.join(folder, split))
    with open(os.path.join(folder, split, "part0.txt"), "w", encoding="utf-8") as f:
      f.writelines(" ".join(d.split()) + "\n" for d in part)


def _adapt(model_dir, steps, texts, data_dir):
  """gin/recipes/adapt_language.gin on model_dir: French from texts, English replayed."""
  return train.main([
      f"--model_dir={model_dir}", "--no_progress", "--gin_file=recipes/adapt_language.gin",
      f"--gin.NEW_LANGUAGE={{'fr': '{texts}'}}", "--gin.DataConfig.languages=('en',)",
      f"--gin.DataConfig.data_dir='{data_dir}'", f"--gin.TRAIN_STEPS={steps}",
      "--gin.BATCH_SIZE=8", "--gin.SEQ_LEN=64", "--gin.TrainConfig.eval_batches=2",
      "--gin.TrainConfig.checkpoint_every=10", "--gin.OptimizerConfig.learning_rate=3e-3",
      "--gin.OptimizerConfig.warmup_steps=2", "--gin.OptimizerConfig.decay_steps=20"])


@pytest.mark.slow  # three short training runs over the handbook (about 2 minutes)
def test_an_imported_model_learns_a_new_language_and_resumes_exactly(handbook_data_dir,
                                                                     tmp_path):
  hf_dir, run_dir, texts = str(tmp_path / "hf"), str(tmp_path / "run"), str(tmp_path / "fr")
  _hf_checkpoint(hf_dir)
  _text_folder(texts, _documents(NEW))
  assert hf_main(["import", f"--hf_dir={hf_dir}", f"--model_dir={run_dir}", "--max_len=64"]) == 0
  halves_dir = str(tmp_path / "halves")
  shutil.copytree(run_dir, halves_dir)

  assert _adapt(run_dir, 20, texts, handbook_data_dir) == 0
  before, after = read_metrics(run_dir, "eval")
  assert (before["step"], after["step"]) == (0, 20)
  assert {"loss/fr", "bpb/fr", "loss/en", "bpb/en"} <= set(before) & set(after)
  assert after["loss/fr"] < before["loss/fr"] - 0.2, (before, after)
  assert after["bpb/fr"] < before["bpb/fr"]
  print(json.dumps({k: (before[k], after[k]) for k in ("loss/fr", "bpb/fr", "loss/en", "bpb/en")}))

  assert _adapt(halves_dir, 10, texts, handbook_data_dir) == 0
  assert _adapt(halves_dir, 20, texts, handbook_data_dir) == 0
  train_lines = lambda d: [(r["step"], r["loss"]) for r in read_metrics(d, "train")]  # noqa: E731
  assert train_lines(halves_dir) == train_lines(run_dir)
  assert [s for s, _ in train_lines(run_dir)] == list(range(1, 21))
  _, _, straight, _ = evaluate.restore(run_dir)
  _, _, resumed, step = evaluate.restore(halves_dir)
  assert step == 20
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(resumed), jax.device_get(straight))


def test_an_imported_model_scores_and_generates_from_its_own_start_token(tmp_path):
  """The imported run reads text with the checkpoint's tokenizer.json and starts every row
  from its <s>: the library's log-likelihood of a continuation equals transformers' with
  <s> first, and generation decodes through the same tokenizer."""
  from bigsci_jax import generate
  hf_dir, run_dir = str(tmp_path / "hf"), str(tmp_path / "run")
  _hf_checkpoint(hf_dir)
  assert hf_main(["import", f"--hf_dir={hf_dir}", f"--model_dir={run_dir}", "--max_len=64"]) == 0
  run, runtime, params, _ = evaluate.restore(run_dir, batch_size=1)
  scorer = evaluate.make_scorer(run_dir, run, runtime, params, batch_size=1)
  tok = scorer.tokenizer
  assert (type(tok).__name__, tok.bos_id, tok.eos_id) == ("HFTokenizer", 1, 2)
  context, continuation = "Le paquet est installé", " sur la machine"
  ours = scorer.loglikelihood([(context, continuation)])[0][0]
  ctx, cont = tok.encode(context), tok.encode(continuation)
  model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
  with torch.no_grad():
    logits = model(torch.tensor([[1] + ctx + cont[:-1]])).logits[0]
  logp = torch.log_softmax(logits, -1)[len(ctx):].gather(1, torch.tensor(cont)[:, None]).sum()
  assert abs(ours - float(logp)) < 1e-4 * len(cont)
  prompt = tok.encode("Debian")
  ours_ids = generate.generate(runtime.model, params, [prompt], 6, bos_id=tok.bos_id)[0]
  with torch.no_grad():
    theirs_ids = model.generate(torch.tensor([[1] + prompt]), max_new_tokens=6, do_sample=False,
                                eos_token_id=None, pad_token_id=3)[0, 1 + len(prompt):]
  assert ours_ids == theirs_ids.tolist()
  assert generate.main([f"--model_dir={run_dir}", "--prompt=Debian", "--max_new_tokens=4"]) == 0


@pytest.mark.slow  # an import, an extension and two short training runs (about 2 minutes)
def test_an_extended_vocabulary_reads_the_new_language_in_fewer_tokens_and_learns_it(
    handbook_data_dir, tmp_path, capsys):
  from bigsci_jax.extend_vocab import main as extend_main
  hf_dir, run_dir, wide_dir, texts = (str(tmp_path / n) for n in ("hf", "run", "wide", "fr"))
  _hf_checkpoint(hf_dir, locales=("en-US",))  # a tokenizer that never saw French
  _text_folder(texts, _documents(NEW))
  assert hf_main(["import", f"--hf_dir={hf_dir}", f"--model_dir={run_dir}", "--max_len=64"]) == 0
  capsys.readouterr()
  assert extend_main([f"--from_dir={run_dir}", f"--to_dir={wide_dir}", f"--text_dir={texts}",
                      "--new_tokens=128", "--pad_to=64"]) == 0
  extension = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert extension["vocab_size_after"] == 640 and extension["new_tokens"] == 128
  assert extension["tokens_per_byte_after"] < 0.85 * extension["tokens_per_byte_before"]
  tokens = {}
  for model_dir in (run_dir, wide_dir):
    assert _adapt(model_dir, 20, texts, handbook_data_dir) == 0
    before, after = read_metrics(model_dir, "eval")
    assert after["bpb/fr"] < before["bpb/fr"] - 0.2, (before, after)
    tokens[model_dir] = read_metrics(model_dir, "train")[-1]["tokens_seen"]
    print(json.dumps({k: (before[k], after[k]) for k in ("loss/fr", "bpb/fr", "bpb/en")}))
  print(json.dumps(extension))
