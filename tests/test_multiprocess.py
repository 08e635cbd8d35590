"""Two real processes (4 fake CPU devices each) form one 8-device mesh through
jax.distributed, each reading only its own rows, and train like one process."""

import os
import socket
import subprocess
import sys

import numpy as np

import train
from bigsci_jax.metrics import read_metrics

FLAGS = ["--no_progress", "--gin.MIXTURE='synthetic'", "--gin.ModelConfig.vocab_size=256",
         "--gin.TrainConfig.eval_batches=2", "--gin.TRAIN_STEPS=4", "--gin.TrainConfig.checkpoint_every=2",
         "--gin.TrainConfig.eval_every=0", "--gin.MeshConfig.data=2", "--gin.MeshConfig.fsdp=4"]


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_two_processes_train_like_one(tmp_path):
  multi_dir, single_dir = tmp_path / "multi", tmp_path / "single"
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=4")
  address = f"127.0.0.1:{_free_port()}"
  procs = [subprocess.Popen(
      [sys.executable, train.__file__, f"--model_dir={multi_dir}", *FLAGS,
       f"--coordinator_address={address}", "--num_processes=2", f"--process_id={i}"],
      env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
  outputs = [p.communicate(timeout=400)[0] for p in procs]
  for p, out in zip(procs, outputs):
    assert p.returncode == 0, out[-3000:]

  assert train.main([f"--model_dir={single_dir}", *FLAGS]) == 0  # 8 devices, one process
  multi = [r["loss"] for r in read_metrics(str(multi_dir), "train")]
  single = [r["loss"] for r in read_metrics(str(single_dir), "train")]
  assert len(multi) == len(single) == 4
  np.testing.assert_allclose(multi, single, rtol=1e-5)
  assert sorted(os.listdir(multi_dir / "checkpoints")) == ["2", "4"]
