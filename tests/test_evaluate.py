"""python -m bigsci_jax.evaluate: losses and tasks from checkpoints, on any devices."""

import json
import os
import subprocess
import sys

import pytest

from conftest import xla_flags
import train
from bigsci_jax import evaluate

SYNTHETIC = ["--no_progress", "--gin.MIXTURE='synthetic'", "--gin.ModelConfig.vocab_size=64",
             "--gin.TRAIN_STEPS=4", "--gin.BATCH_SIZE=8", "--gin.SEQ_LEN=32",
             "--gin.ModelConfig.d_model=32", "--gin.ModelConfig.d_ff=64",
             "--gin.TrainConfig.eval_batches=2", "--gin.TrainConfig.checkpoint_every=4"]


def _last_json(text):
  return json.loads(text.strip().splitlines()[-1])


def test_a_222_mesh_checkpoint_evaluates_the_same_on_one_device(tmp_path, capsys):
  model_dir = str(tmp_path / "run")
  assert train.main([f"--model_dir={model_dir}", *SYNTHETIC, "--gin.MeshConfig.data=2",
                     "--gin.MeshConfig.fsdp=2", "--gin.MeshConfig.tensor=2"]) == 0
  capsys.readouterr()
  assert evaluate.main([f"--model_dir={model_dir}", "--tasks="]) == 0  # 8 devices
  eight = _last_json(capsys.readouterr().out)["results"][0]
  # Placed as --mesh asks: every layer split over 4 devices, the batch over 2 fsdp shards.
  assert evaluate.main([f"--model_dir={model_dir}", "--tasks=", "--mesh=1x2x4"]) == 0
  split = _last_json(capsys.readouterr().out)["results"][0]
  assert split["loss"] == pytest.approx(eight["loss"], rel=1e-5)
  for mesh, why in [("3x1x1", "3 data x fsdp shards, which do not divide its 8 rows"),
                    ("1x1x16", "needs 16 devices but only 8 are present"),
                    ("4x2", "write DATAxFSDPxTENSOR")]:
    assert evaluate.main([f"--model_dir={model_dir}", "--tasks=", f"--mesh={mesh}"]) == 2
    err = capsys.readouterr().err
    assert why in err and len(err.strip().splitlines()) == 1, err
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=xla_flags(1))
  out = subprocess.run([sys.executable, "-m", "bigsci_jax.evaluate", f"--model_dir={model_dir}",
                        "--tasks="], env=env, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-2000:]
  one = _last_json(out.stdout)["results"][0]
  assert one["loss"] == pytest.approx(eight["loss"], rel=1e-5) and one["step"] == 4
  assert json.load(open(os.path.join(model_dir, "eval_results.json")))["loss"] == one["loss"]


def test_bad_input_is_one_sentence(tmp_path, capsys):
  assert evaluate.main([f"--model_dir={tmp_path}"]) == 2
  assert "no config.json" in capsys.readouterr().err
  model_dir = str(tmp_path / "run")
  assert train.main([f"--model_dir={model_dir}", *SYNTHETIC]) == 0
  capsys.readouterr()
  assert evaluate.main([f"--model_dir={model_dir}", "--tasks=next_sentence/en"]) == 2
  assert "synthetic data" in capsys.readouterr().err
  assert evaluate.main([f"--model_dir={model_dir}", "--tasks=sonnets/en"]) == 2
  assert "unknown task 'sonnets/en'" in capsys.readouterr().err


@pytest.mark.slow
def test_handbook_runs_compare_side_by_side(tmp_path, capsys, handbook_data_dir):
  pytest.importorskip("seqio")
  dirs = []
  for mask in ("causal", "prefix"):
    model_dir = str(tmp_path / mask)
    assert train.main([f"--model_dir={model_dir}", "--no_progress", "--gin.TRAIN_STEPS=4",
                       f"--gin.DataConfig.data_dir='{handbook_data_dir}'",
                       "--gin.DataConfig.languages=['en', 'fr', 'ja']",
                       "--gin.DataConfig.vocab_size=4000", "--gin.TrainConfig.eval_batches=2",
                       f"--gin.ModelConfig.mask='{mask}'", "--gin.TrainConfig.checkpoint_every=4"]) == 0
    dirs.append(model_dir)
  capsys.readouterr()
  assert evaluate.main([f"--model_dir={d}" for d in dirs] + [
      "--tasks=next_sentence/fr,translation/ja,cloze/en", "--limit=8", "--split=test",
      f"--out={tmp_path}"]) == 0
  summary = _last_json(capsys.readouterr().out)
  for result in summary["results"]:
    assert {"loss/en", "bpb/ja", "loss"} <= set(result) and result["split"] == "test"
    scores = result["tasks"]["translation/ja"]
    assert scores["items"] == 8 and 0 <= scores["acc"] <= 1 and scores["acc_stderr"] > 0
    cloze = result["tasks"]["cloze/en"]
    assert cloze["ppl"] > 1 and 0 <= cloze["exact_match"] <= 1
  table = open(os.path.join(tmp_path, "comparison.md")).read()
  assert "| next_sentence/fr acc |" in table and "| causal | prefix |" in table
  assert os.path.getsize(os.path.join(tmp_path, "comparison.png")) > 5_000
