"""transformers BLOOM and Llama checkpoints in and out: tiny models made here with random
weights (never downloaded), compared with transformers' own float32 forward pass."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
safetensors_numpy = pytest.importorskip("safetensors.numpy")

from bigsci_jax import evaluate  # noqa: E402
from bigsci_jax.config import ModelConfig  # noqa: E402
from bigsci_jax.hf import convert  # noqa: E402
from bigsci_jax.hf.__main__ import main as hf_main  # noqa: E402

VOCAB = 96


def _tiny(arch):
  if arch == "bloom":
    config = transformers.BloomConfig(vocab_size=VOCAB, hidden_size=32, n_layer=2, n_head=4)
  else:  # grouped-query attention, untied head, biases, an unusual rotary base
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=64,
        rope_theta=5000.0, tie_word_embeddings=False, attention_bias=True, mlp_bias=True)
  torch.manual_seed(0)
  model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
  with torch.no_grad():  # every tensor random, so no norm or bias is trivially 1 or 0
    for p in model.parameters():
      p.copy_(torch.randn_like(p) * 0.2 + (1.0 if p.ndim == 1 and p.shape[0] == 32 else 0.0))
  return model


TEXTS = ["Debian est un système d'exploitation libre.", "The package is installed twice.",
         "apt-get install debian-handbook", "Le paquet </s> est installé"]


def _save_tokenizer(folder):
  """A small BPE tokenizer (ids below VOCAB) trained here, with its special tokens named."""
  from tokenizers import Tokenizer, models, pre_tokenizers, trainers
  backend = Tokenizer(models.BPE(unk_token="<unk>"))
  backend.pre_tokenizer = pre_tokenizers.Whitespace()
  backend.train_from_iterator(TEXTS * 4, trainers.BpeTrainer(
      vocab_size=VOCAB - 6, special_tokens=["<unk>", "<s>", "</s>", "<pad>"]))
  backend.save(os.path.join(folder, "tokenizer.json"))
  with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
    json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>",
               "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"}, f)


def _files(directory):
  return {n: safetensors_numpy.load_file(os.path.join(directory, n))
          for n in os.listdir(directory) if n.endswith(".safetensors")}


def _tensors(directory):
  return {k: v for f in _files(directory).values() for k, v in f.items()}


@pytest.fixture(scope="module", params=["bloom", "llama"])
def imported(request, tmp_path_factory):
  arch = request.param
  root = tmp_path_factory.mktemp(arch)
  model = _tiny(arch)
  model.save_pretrained(str(root / "hf"), safe_serialization=True)
  _save_tokenizer(str(root / "hf"))
  assert hf_main(["import", f"--hf_dir={root / 'hf'}", f"--model_dir={root / 'run'}",
                  "--max_len=64"]) == 0
  return arch, model, root


def test_import_then_export_gives_back_every_tensor_bit_for_bit(imported, capsys):
  arch, _, root = imported
  assert hf_main(["export", f"--model_dir={root / 'run'}", f"--out={root / 'out'}",
                  "--shard_gib=0.00002"]) == 0   # about 21 KB: several shards and an index
  summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert summary["arch"] == arch and "model.safetensors.index.json" in summary["files"]
  original, exported = _tensors(root / "hf"), _tensors(root / "out")
  assert len(_files(root / "out")) > 1
  assert set(exported) == set(original) - ({"lm_head.weight"} if arch == "bloom" else set())
  for name, array in exported.items():
    assert array.dtype == original[name].dtype and array.shape == original[name].shape, name
    np.testing.assert_array_equal(array, original[name], err_msg=name)
  # The sharded export imports again to the same parameters; bf16 export rounds each tensor.
  assert hf_main(["import", f"--hf_dir={root / 'out'}", f"--model_dir={root / 'again'}"]) == 0
  first, again = (evaluate.restore(str(root / d))[2] for d in ("run", "again"))
  jax.tree.map(np.testing.assert_array_equal, first, again)
  assert hf_main(["export", f"--model_dir={root / 'run'}", f"--out={root / 'bf16'}",
                  "--dtype=bfloat16"]) == 0
  for name, array in _tensors(root / "bf16").items():
    assert array.dtype.name == "bfloat16", name
    np.testing.assert_array_equal(array, original[name].astype(array.dtype), err_msg=name)
  assert json.load(open(root / "bf16" / "config.json"))["torch_dtype"] == "bfloat16"
  config, back = (json.load(open(root / d / "config.json")) for d in ("hf", "out"))
  keys = (["n_layer", "n_head", "hidden_size", "layer_norm_epsilon"] if arch == "bloom" else
          ["num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
           "intermediate_size", "rms_norm_eps", "tie_word_embeddings", "attention_bias"])
  keys += ["vocab_size", "bos_token_id", "eos_token_id"]
  assert {k: config[k] for k in keys} == {k: back[k] for k in keys}
  theirs, ours = (transformers.AutoTokenizer.from_pretrained(str(root / d)) for d in ("hf", "out"))
  assert [ours(t).input_ids for t in TEXTS] == [theirs(t).input_ids for t in TEXTS]
  assert max(max(theirs(t).input_ids) for t in TEXTS) < VOCAB
  assert (ours.bos_token_id, ours.eos_token_id) == (theirs.bos_token_id, theirs.eos_token_id) == (1, 2)


def _left_padded_batch(rng, rows=3, length=12):
  tokens = rng.integers(3, VOCAB, (rows, length))
  mask = np.ones((rows, length), np.int64)
  mask[1, :4] = 0   # left padding
  mask[2, :9] = 0
  tokens[mask == 0] = 0
  return tokens, mask


def _assert_same_logits(arch, model, run_dir, rng):
  """The run's logits equal the transformers model's (float32) within 1e-4 on a
  left-padded batch with an attention mask, at every non-padding position."""
  tokens, mask = _left_padded_batch(rng)
  positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
  extra = {} if arch == "bloom" else {"position_ids": torch.tensor(positions)}  # ALiBi: none
  with torch.no_grad():
    theirs = model(input_ids=torch.tensor(tokens), attention_mask=torch.tensor(mask),
                   **extra).logits.numpy()
  _, runtime, params, _ = evaluate.restore(run_dir)
  with jax.default_matmul_precision("highest"):
    ours = np.asarray(runtime.model.apply({"params": params}, jnp.asarray(tokens, jnp.int32),
                                          jnp.asarray(positions, jnp.int32),
                                          jnp.asarray(mask, jnp.int32)))
  live = mask.astype(bool)
  np.testing.assert_allclose(ours[live], theirs[live], atol=1e-4, rtol=1e-4)


def test_imported_logits_equal_transformers(imported):
  arch, model, root = imported
  _assert_same_logits(arch, model, str(root / "run"), np.random.default_rng(0))


def test_models_the_architectures_cannot_express_are_refused():
  llama = ModelConfig(position="rotary", activation="swiglu", norm="rmsnorm", use_bias=False)
  assert convert.architecture(llama) == "llama"
  with pytest.raises(convert.ConversionError, match="it is a prefix LM"):
    convert.architecture(ModelConfig(position="rotary", activation="swiglu", norm="rmsnorm",
                                     mask="prefix"), "llama")
  with pytest.raises(convert.ConversionError, match="squared|'relu2'"):
    convert.architecture(ModelConfig(position="alibi", activation="relu2", embedding_norm=True),
                         "bloom")
  with pytest.raises(convert.ConversionError, match="neither a BLOOM nor a Llama.*'sinusoidal'"):
    convert.architecture(ModelConfig(position="sinusoidal"))


def test_a_checkpoint_with_missing_or_misshapen_tensors_names_them(imported, tmp_path, capsys):
  arch, _, root = imported
  if arch != "llama":
    pytest.skip("one architecture is enough")
  broken = tmp_path / "broken"
  broken.mkdir()
  tensors = _tensors(root / "hf")
  del tensors["model.layers.1.mlp.up_proj.weight"]
  tensors["model.norm.weight"] = tensors["model.norm.weight"][:16]
  safetensors_numpy.save_file(tensors, str(broken / "model.safetensors"), metadata={"format": "pt"})
  (broken / "config.json").write_text((root / "hf" / "config.json").read_text())
  assert hf_main(["import", f"--hf_dir={broken}", f"--model_dir={tmp_path / 'run'}"]) == 2
  err = capsys.readouterr().err
  assert "missing: model.layers.1.mlp.up_proj.weight" in err
  assert "misshapen: model.norm.weight (16,) (expected (32,))" in err
  assert not (tmp_path / "run").exists()   # nothing written
  assert hf_main(["import", f"--hf_dir={tmp_path}", f"--model_dir={tmp_path / 'run'}"]) == 2
  assert "has no config.json" in capsys.readouterr().err


@pytest.fixture(scope="module")
def held_out_and_vocab(tmp_path_factory):
  """({lang: a held-out chapter's text}, a 1500-piece vocabulary trained on the rest)."""
  from bigsci_jax import corpus, vocab
  try:
    root = corpus.handbook_root()
  except corpus.CorpusError as e:
    pytest.skip(str(e))
  train_texts, held = {}, {}
  for locale in corpus.locales(root):
    docs = list(corpus.documents(root, locale))
    train_texts[docs[0]["lang"]] = [d["text"] for d in docs[:-1]]
    held[docs[0]["lang"]] = docs[-1]["text"][:3000]
  path = vocab.train(train_texts, str(tmp_path_factory.mktemp("vocab")),
                     vocab.VocabConfig(vocab_size=1500, sample_chars=100_000,
                                                       character_coverage=0.98))
  with open(path, "rb") as f:
    return held, f.read()


def _train_and_export(tmp_path, flags, vocab_model):
  """(run dir, HF dir): the smoke model with `flags` trained a few steps here, given the
  text vocabulary vocab_model, and exported."""
  import train
  run_dir, hf_dir = str(tmp_path / "run"), str(tmp_path / "hf")
  assert train.main([f"--model_dir={run_dir}", "--no_progress", "--gin.MIXTURE='synthetic'",
                     "--gin.ModelConfig.vocab_size=1536", "--gin.TRAIN_STEPS=3",
                     "--gin.BATCH_SIZE=8", "--gin.SEQ_LEN=32", "--gin.ModelConfig.d_model=32",
                     "--gin.ModelConfig.d_ff=128", "--gin.TrainConfig.eval_every=0", *flags]) == 0
  with open(os.path.join(run_dir, "vocab.model"), "wb") as f:  # the text vocabulary
    f.write(vocab_model)
  assert hf_main(["export", f"--model_dir={run_dir}", f"--out={hf_dir}"]) == 0
  return run_dir, hf_dir


@pytest.mark.parametrize("arch, flags", [
    ("bloom", ["--gin_file=arch/bloom.gin"]),
    pytest.param("llama", ["--gin_file=arch/llama.gin", "--gin.ModelConfig.num_kv_heads=2"],
                 marks=pytest.mark.slow)])  # the same path; the fast suite's budget
def test_a_run_trained_here_loads_in_transformers_with_the_same_logits_and_ids(
    arch, flags, held_out_and_vocab, tmp_path, capsys):
  from bigsci_jax import tokenizer as tokenizers
  held, vocab_model = held_out_and_vocab
  run_dir, hf_dir = _train_and_export(tmp_path, flags, vocab_model)
  assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["arch"] == arch
  # The exporter holds the parameters split over the 8 devices: each device an eighth of
  # the embedding table (d_model 32 over fsdp 8), not a whole copy.
  from bigsci_jax.hf.exporter import restore_split
  params, _ = restore_split(run_dir)
  table = params["embed"]["embedding"]
  assert len(table.sharding.device_set) == 8
  assert {s.data.shape for s in table.addressable_shards} == {(1536, 4)}

  model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
  assert type(model).__name__ == convert.CLASSES[arch]
  _assert_same_logits(arch, model, run_dir, np.random.default_rng(1))

  theirs_tok, ours_tok = transformers.AutoTokenizer.from_pretrained(hf_dir), tokenizers.SentencePieceTokenizer(vocab_model)
  assert len(held) >= 14
  for lang, text in held.items():
    assert theirs_tok(text, add_special_tokens=False).input_ids == ours_tok.encode(text), lang


@pytest.mark.slow  # two harness runs, one through transformers (about a minute)
def test_lm_eval_scores_the_export_and_the_run_alike(held_out_and_vocab, tmp_path, monkeypatch,
                                                      capsys):
  """`lm_eval --model hf` on the exported directory and `--model bigsci_jax` on the run: the
  same accuracies and per-choice log-likelihoods on a local multiple-choice task (the
  exported tokenizer puts the run's start token first, as the library scores)."""
  lm_eval = pytest.importorskip("lm_eval")
  import importlib
  import lm_eval.models.huggingface  # noqa: F401  (registers hf)
  from lm_eval.tasks import TaskManager
  from bigsci_jax import mc_tasks
  from test_lm_eval import MULTIPLE_CHOICE, _mc_rows, _task
  importlib.import_module("bigsci_jax.lm_eval")  # registers the model bigsci_jax
  monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
  _, vocab_model = held_out_and_vocab
  run_dir, hf_dir = _train_and_export(tmp_path, ["--gin_file=arch/bloom.gin", "--gin.SEQ_LEN=128"],
                                     vocab_model)
  capsys.readouterr()
  from bigsci_jax import tokenizer as tokenizers
  tok = tokenizers.SentencePieceTokenizer(vocab_model)
  items = [i for i in mc_tasks.next_sentence_items("en", limit=60)  # no truncation either side
           if max(len(tok.encode(i.context + " " + c)) for c in i.choices) < 120][:16]
  assert len(items) >= 10
  _task(str(tmp_path), "bj_hf_mc", _mc_rows(items), MULTIPLE_CHOICE)
  manager = TaskManager(include_path=str(tmp_path))
  results = {model: lm_eval.simple_evaluate(
      model=model, model_args=args, tasks=["bj_hf_mc"], task_manager=manager, device="cpu",
      log_samples=True, bootstrap_iters=0) for model, args in (
          ("hf", f"pretrained={hf_dir},dtype=float32"), ("bigsci_jax", f"model_dir={run_dir}"))}
  theirs, ours = (results[m]["results"]["bj_hf_mc"] for m in ("hf", "bigsci_jax"))
  assert theirs["acc,none"] == ours["acc,none"]
  by_doc = {m: {s["doc_id"]: [x[0][0] for x in s["resps"]]
                for s in results[m]["samples"]["bj_hf_mc"]} for m in results}
  assert len(by_doc["hf"]) == len(items)
  gap = max(abs(a - b) for d, v in by_doc["bigsci_jax"].items() for a, b in zip(v, by_doc["hf"][d]))
  print(json.dumps({"acc_hf": theirs["acc,none"], "acc_bigsci_jax": ours["acc,none"],
                    "items": len(items), "max_loglik_gap": gap}))  # shown with -s
  for doc, values in by_doc["bigsci_jax"].items():
    np.testing.assert_allclose(by_doc["hf"][doc], values, atol=1e-3)
