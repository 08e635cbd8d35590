"""The bad-input catalogue: each stops with one clear sentence (no traceback) and writes
nothing. Command line, gin files, data folders, model / checkpoint directories, scaling CSVs."""

import json
import os

import pytest

import train
from bigsci_jax import aot, evaluate, generate
from bigsci_jax.hf.__main__ import main as hf_main
from bigsci_jax.scaling.__main__ import main as scaling_main

SYN = ["--no_progress", "--gin.MIXTURE='synthetic'", "--gin.ModelConfig.vocab_size=256",
       "--gin.TRAIN_STEPS=2", "--gin.TrainConfig.eval_batches=2"]


def _write(path, text):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w") as f:
    f.write(text)
  return str(path)


def _train(d, *flags):
  return train.main([f"--model_dir={d / 'run'}", *SYN, *flags])


CASES = {
    # command line
    "unknown flag value type": (lambda d: _train(d, "--num_processes=two"), "invalid int value"),
    "missing gin file": (lambda d: _train(d, "--gin_file=nope.gin"), "was found neither as given"),
    "coordinator without process count": (
        lambda d: _train(d, "--coordinator_address=127.0.0.1:1"), "needs --num_processes"),
    "aot mesh": (lambda d: aot.main([*SYN[1:], "--topology=cpu:8", "--mesh=8"]), "DATAxFSDPxTENSOR"),
    # gin
    "value not allowed": (lambda d: _train(d, "--gin.ModelConfig.norm='batchnorm'"),
                          "ModelConfig.norm='batchnorm' is not allowed"),
    "unknown parameter": (lambda d: _train(d, "--gin.ModelConfig.widht=3"), "bad gin configuration"),
    "malformed gin file": (lambda d: _train(d, "--gin_file=" + _write(d / "in" / "bad.gin",
                                                                    "ModelConfig.d_model = = 3\n")),
                           "bad gin configuration"),
    "micro-batch does not divide": (lambda d: _train(d, "--gin.BatchConfig.micro_batch_size=5"),
                                    "micro_batch_size=5 is invalid"),
    "mesh over the devices": (lambda d: _train(d, "--gin.MeshConfig.data=16"),
                              "needs 16 devices but only 8 are present"),
    "negative logits chunk": (lambda d: _train(d, "--gin.ModelConfig.logits_chunk=-8"),
                              "logits_chunk=-8 is invalid"),
    "negative spike factor": (lambda d: _train(d, "--gin.TrainConfig.loss_spike_factor=-1.0"),
                              "loss_spike_factor=-1.0 is invalid"),
    # data
    "missing vocabulary file": (
        lambda d: _train(d, "--gin.MIXTURE='handbook_en'", "--gin.ModelConfig.vocab_size=8192",
                         f"--gin.DataConfig.vocab_path='{d / 'in' / 'none.model'}'"),
        "none.model"),
    "tfds corpus without its pattern": (lambda d: _train(d, "--gin.MIXTURE='wiki40b_en'"),
                                        "tfds_pattern"),
    # model / checkpoint directories
    "evaluate an empty directory": (
        lambda d: evaluate.main([f"--model_dir={d / 'in' / 'empty'}"]), "holds no run"),
    "generate from a run without a vocabulary": (
        lambda d: generate.main([f"--model_dir={_run_without_checkpoint(d)}", "--prompt=hello"]),
        "has no checkpoint yet"),
    "generate with top_p over 1": (
        lambda d: generate.main([f"--model_dir={_run_without_checkpoint(d)}", "--prompt=hi",
                                 "--top_p=2"]), "top_p=2.0 (in (0, 1])"),
    "evaluate a run without a checkpoint": (
        lambda d: evaluate.main([f"--model_dir={_run_without_checkpoint(d)}"]), "has no checkpoint"),
    "export the tokenizer of a run without a vocabulary": (
        lambda d: hf_main(["tokenizer", f"--model_dir={_run_without_checkpoint(d)}",
                           f"--out={d / 'hf'}"]), "has no vocab.model"),
    "export a model neither BLOOM nor Llama": (
        lambda d: hf_main(["export", f"--model_dir={_run_without_checkpoint(d)}",
                           f"--out={d / 'hf'}"]), "neither a BLOOM nor a Llama"),
    "import a directory without a checkpoint": (
        lambda d: hf_main(["import", f"--hf_dir={d / 'in' / 'empty'}",
                           f"--model_dir={d / 'run'}"]), "has no config.json"),
    "corrupt config.json": (
        lambda d: evaluate.main([f"--model_dir={os.path.dirname(_write(d / 'in' / 'c' / 'config.json', '{'))}"]),
        "config.json is not valid JSON"),
    # scaling CSVs
    "missing CSV": (lambda d: scaling_main(["fit", "--approach", "3", "--runs", str(d / "in" / "none.csv")]), "none.csv"),
    "plan from a base that is not there": (
        lambda d: scaling_main(["plan", "--budgets", "1e12", "--out", str(d / "plan"),
                                "--base", str(d / "in" / "none.json")]), "--base"),
    "run a folder without a plan": (
        lambda d: scaling_main(["run", "--plan", str(d / "in" / "empty")]), "holds no plan.csv"),
    "CSV without a loss column": (
        lambda d: scaling_main(["fit", "--approach", "3", "--runs",
                               _write(d / "in" / "t.csv", "params,tokens\n1e6,1e9\n")]),
        "missing column(s) loss"),
    "CSV with a word for a number": (
        lambda d: scaling_main(["fit", "--approach", "3", "--runs", _write(
            d / "in" / "t.csv", "params,tokens,loss\n1e6,lots,3\n")]),
        "not a number"),
}


def _run_without_checkpoint(d):
  from bigsci_jax.config import RunConfig
  path = _write(d / "in" / "nockpt" / "config.json", json.dumps(RunConfig().to_dict()))
  return os.path.dirname(path)


def _files(root):
  return sorted(os.path.join(p, f) for p, _, names in os.walk(root) for f in names)


@pytest.mark.parametrize("name", CASES)
def test_bad_input_is_one_sentence_and_writes_nothing(name, tmp_path, capsys):
  run, words = CASES[name]
  try:
    code = run(tmp_path)
  except SystemExit as e:  # argparse
    code = e.code
  inputs = set(_files(tmp_path / "in"))
  out, err = capsys.readouterr()
  assert code not in (0, None), out
  assert "Traceback" not in err and "Traceback" not in out
  lines = [line for line in err.strip().splitlines() if not line.startswith("usage:")
           and not line.startswith(" ")]
  assert len(lines) == 1 and words in lines[0], err
  assert set(_files(tmp_path)) == inputs, "it wrote files"
