"""Faults: SIGKILL at random moments (also mid-save), SIGTERM preemption, and the
rollback policy for a run whose updates keep being skipped. Real train.py processes."""

import os
import random
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

import train
from bigsci_jax import checkpoint, loop
from bigsci_jax.metrics import read_metrics

SMALL = ["--no_progress", "--gin.MIXTURE='synthetic'", "--gin.ModelConfig.vocab_size=256",
         "--gin.TrainConfig.eval_batches=2", "--gin.TrainConfig.eval_every=0",
         "--gin.ModelConfig.d_model=256", "--gin.ModelConfig.num_layers=4"]


def _start(model_dir, *flags):
  """train.py in its own process, with this session's 8 CPU devices."""
  return subprocess.Popen([sys.executable, train.__file__, f"--model_dir={model_dir}", *SMALL, *flags],
                          env=dict(os.environ), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True)


def _train_lines(model_dir):
  return [(r["step"], r["loss"], r["grad_norm"]) for r in read_metrics(str(model_dir), "train")]


def _final_params(model_dir):
  runtime = loop.Runtime(loop.read_run(str(model_dir)))
  state, _, step = runtime.restore_latest(str(model_dir))
  return step, jax.device_get(state.params)


def _kill_when(proc, ckpt_dir, rng, deadline_s=90):
  """SIGKILL as soon as a save is in progress (a temporary step directory exists), or
  at a random moment once training runs; returns what was seen."""
  start, at = time.time(), None
  while proc.poll() is None and time.time() - start < deadline_s:
    names = os.listdir(ckpt_dir) if os.path.isdir(ckpt_dir) else []
    if any(checkpoint.TMP_MARK in n for n in names):
      proc.send_signal(signal.SIGKILL)
      proc.communicate()
      return "mid-save"
    if at is None and any(n.isdigit() for n in names):
      at = time.time() + rng.uniform(0.0, 2.0)
    if at is not None and time.time() > at:
      proc.send_signal(signal.SIGKILL)
      proc.communicate()
      return "random"
    time.sleep(0.001)
  out = proc.communicate()[0]
  assert proc.returncode == 0, out[-2000:]
  return "finished"


def _killed_repeatedly(tmp_path, kills, steps, seed):
  flags = [f"--gin.TRAIN_STEPS={steps}", "--gin.TrainConfig.checkpoint_every=2"]
  straight = tmp_path / "straight"
  out = _start(straight, *flags).communicate()[0]
  assert _train_lines(straight), out[-2000:]
  killed, rng, seen = tmp_path / "killed", random.Random(seed), []
  for _ in range(kills):
    seen.append(_kill_when(_start(killed, *flags), killed / "checkpoints", rng))
  proc = _start(killed, *flags)
  out = proc.communicate()[0]
  assert proc.returncode == 0, out[-2000:]
  assert _train_lines(killed) == _train_lines(straight)  # every logged loss, exactly
  step_a, params_a = _final_params(killed)
  step_b, params_b = _final_params(straight)
  assert step_a == step_b == steps
  jax.tree.map(np.testing.assert_array_equal, params_a, params_b)
  assert not [n for n in os.listdir(killed / "checkpoints") if checkpoint.TMP_MARK in n]
  return seen, out


def test_a_kill_during_an_async_save_loses_nothing(tmp_path):
  seen, out = _killed_repeatedly(tmp_path, kills=1, steps=16, seed=0)
  assert seen == ["mid-save"]
  assert "only partly written" in out and "skipped and removed" in out


@pytest.mark.slow
def test_repeated_kills_at_random_moments_lose_nothing(tmp_path):
  seen, _ = _killed_repeatedly(tmp_path, kills=5, steps=40, seed=1)
  assert "mid-save" in seen and len(seen) == 5


def test_sigterm_saves_the_current_step_and_exits_0(tmp_path):
  model_dir = tmp_path / "run"
  proc = _start(model_dir, "--gin.TRAIN_STEPS=100000", "--gin.TrainConfig.checkpoint_every=100000",
                "--gin.TrainConfig.preemption_grace_s=60")
  start = time.time()
  while len(read_metrics(str(model_dir), "train")) < 3 and proc.poll() is None:
    assert time.time() - start < 120
    time.sleep(0.05)
  proc.send_signal(signal.SIGTERM)
  sent = time.time()
  out = proc.communicate(timeout=60)[0]
  assert proc.returncode == 0, out[-2000:]
  assert time.time() - sent < 60
  event = read_metrics(str(model_dir), "event")[-1]
  stopped = event["step"]
  assert event["event"] == "preempted" and "stopped on SIGTERM" in out
  assert _train_lines(model_dir)[-1][0] == stopped
  assert sorted(os.listdir(model_dir / "checkpoints")) == [str(stopped)]
  # The next start resumes there.
  proc = _start(model_dir, f"--gin.TRAIN_STEPS={stopped + 2}")
  out = proc.communicate()[0]
  assert proc.returncode == 0, out[-2000:]
  assert [s for s, _, _ in _train_lines(model_dir)][-3:] == [stopped, stopped + 1, stopped + 2]


def test_rollback_restores_an_older_checkpoint_then_aborts_on_a_second_streak(tmp_path, capsys):
  model_dir = str(tmp_path / "run")
  sgd = ["--gin.OptimizerConfig.optimizer='sgd'", "--gin.OptimizerConfig.clip_norm=None",
         "--gin.OptimizerConfig.warmup_steps=0", "--gin.OptimizerConfig.decay='constant'",
         "--gin.ModelConfig.d_model=64", "--gin.ModelConfig.num_layers=2"]
  assert train.main([f"--model_dir={model_dir}", *SMALL, *sgd, "--gin.TRAIN_STEPS=4",
                     "--gin.TrainConfig.checkpoint_every=2"]) == 0
  capsys.readouterr()
  rc = train.main([f"--model_dir={model_dir}", "--gin.TRAIN_STEPS=40",
                   "--gin.OptimizerConfig.learning_rate=1e12", "--gin.TrainConfig.max_skips=3",
                   "--gin.TrainConfig.on_max_skips='rollback'",
                   "--gin.TrainConfig.checkpoint_every=100"])
  err = capsys.readouterr().err.strip().splitlines()
  events = read_metrics(model_dir, "event")
  rollbacks = [e for e in events if e["event"] == "rollback"]
  assert rc == 2 and len(rollbacks) == 1 and rollbacks[0]["to_step"] == 4
  skips_before = [e for e in events if e["step"] < rollbacks[0]["step"]]
  assert [e["in_a_row"] for e in skips_before][-3:] == [1, 2, 3]
  assert events[-1]["event"] == "abort"
  assert "after a rollback to step 4" in err[-1] and "skipped 3 times in a row" in err[-1], err[-1]
  assert any("rolled back to step 4" in line for line in err)


def test_restoring_with_other_shapes_names_the_arrays_and_fields(tmp_path, capsys):
  model_dir = str(tmp_path / "run")
  small = [*SMALL, "--gin.ModelConfig.d_model=64", "--gin.ModelConfig.num_layers=2"]
  assert train.main([f"--model_dir={model_dir}", *small, "--gin.TRAIN_STEPS=2"]) == 0
  capsys.readouterr()
  files = {n: open(os.path.join(model_dir, n)).read() for n in ("config.gin", "config.json")}
  rc = train.main([f"--model_dir={model_dir}", "--gin.TRAIN_STEPS=4", "--gin.ModelConfig.d_ff=96",
                   "--gin.OptimizerConfig.optimizer='sgd'"])
  err = capsys.readouterr().err.strip().splitlines()
  assert rc == 2 and len(err) == 1, err
  assert "checkpoint step 2" in err[0] and "does not fit this config" in err[0]
  assert "params/layers/block/mlp/wi/kernel [2, 64, 512] vs [2, 64, 96]" in err[0]
  assert "model.d_ff=512 in the checkpoint, 96 now" in err[0]
  assert "optimizer.optimizer='adamw' in the checkpoint, 'sgd' now" in err[0]
  assert "no_decay" not in err[0]  # tuples and the lists JSON reads back are the same
  assert files == {n: open(os.path.join(model_dir, n)).read() for n in files}  # nothing rewritten
