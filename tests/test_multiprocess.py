"""Two real processes (4 fake CPU devices each) form one 8-device mesh through
jax.distributed, each reading only its own rows, and train like one process; their
checkpoint restores in one process on 8 devices and on 1; a profile of a step is one
folder for both; a pair of processes scores log-likelihoods (likelihood.Scorer, what
TrainConfig.eval_tasks runs) as one process does. The pair runs as two slices
(MeshConfig.slices=2, one per process)."""

import os
import socket
import subprocess
import sys

import jax
import numpy as np

from conftest import xla_flags
import train
from bigsci_jax import loop, vocab
from bigsci_jax.likelihood import Scorer
from bigsci_jax.metrics import read_metrics
from bigsci_jax.tokenizer import SentencePieceTokenizer

FLAGS = ["--no_progress", "--gin.MIXTURE='synthetic'", "--gin.ModelConfig.vocab_size=256",
         "--gin.TrainConfig.eval_batches=2", "--gin.TRAIN_STEPS=4", "--gin.TrainConfig.checkpoint_every=2",
         "--gin.TrainConfig.eval_every=0", "--gin.MeshConfig.data=2", "--gin.MeshConfig.fsdp=4"]


# (context ids, continuation ids) within the runs' 256-id vocabulary, of several lengths.
_rng = np.random.default_rng(0)
REQUESTS = [(_rng.integers(3, 256, c).tolist(), _rng.integers(3, 256, n).tolist())
            for c, n in [(5, 3), (0, 12), (20, 1), (9, 30), (2, 2), (40, 7)] * 2]

# Both processes score REQUESTS with the run's latest weights, rows over all 8 devices.
SCORE = """
import sys, numpy as np
from bigsci_jax import loop, sharding
from bigsci_jax.likelihood import Scorer
from bigsci_jax.tokenizer import SentencePieceTokenizer
model_dir, spm, address, process, out = sys.argv[1:]
sharding.maybe_initialize_distributed(address, 2, int(process))
runtime = loop.Runtime(loop.read_run(model_dir))
state = runtime.restore_latest(model_dir)[0]
scorer = Scorer(runtime.model, state.params, SentencePieceTokenizer(open(spm, 'rb').read()),
                runtime.run.batch.seq_len, 8, runtime.mesh)
logliks, greedy = scorer.score_requests(REQUESTS)
if process == '0':
  np.savez(out, logliks=logliks, greedy=greedy)
"""


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_two_processes_train_like_one(tmp_path):
  multi_dir, single_dir = tmp_path / "multi", tmp_path / "single"
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=xla_flags(4))
  address = f"127.0.0.1:{_free_port()}"
  procs = [subprocess.Popen(
      [sys.executable, train.__file__, f"--model_dir={multi_dir}", *FLAGS,
       f"--coordinator_address={address}", "--num_processes=2", f"--process_id={i}",
       "--gin.TrainConfig.profile_steps=1", "--gin.MeshConfig.slices=2"],
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
  # Both processes traced step 3 into one folder, named by process 0's clock.
  (event,) = [e for e in read_metrics(str(multi_dir), "event") if e["event"] == "profile"]
  assert event["steps"] == [3, 3]
  assert os.listdir(multi_dir / "plugins" / "profile") == [os.path.basename(event["dir"])]

  # The pair's checkpoint is restored by one process on 8 devices and by one on 1 device.
  run = loop.read_run(str(multi_dir))
  state, _, step = loop.Runtime(run).restore_latest(str(multi_dir))
  assert step == 4
  params_8 = {"/".join(str(k.key) for k in path): np.asarray(x) for path, x
              in jax.tree_util.tree_flatten_with_path(jax.device_get(state.params))[0]}
  one_device = dict(env, XLA_FLAGS=xla_flags(1))
  out_file = tmp_path / "params_1.npz"
  script = ("import dataclasses, sys, jax, numpy as np; from bigsci_jax import loop; "
            "from bigsci_jax.config import MeshConfig; "
            f"run = loop.read_run({str(multi_dir)!r}); "
            "run = dataclasses.replace(run, mesh=MeshConfig(1, 1, 1)); "
            f"state, _, step = loop.Runtime(run).restore_latest({str(multi_dir)!r}); "
            "assert jax.device_count() == 1 and step == 4; "
            "flat = jax.tree_util.tree_flatten_with_path(jax.device_get(state.params))[0]; "
            f"np.savez({str(out_file)!r}, **{{'/'.join(str(k.key) for k in p): x for p, x in flat}})")
  done = subprocess.run([sys.executable, "-c", script], env=one_device, capture_output=True,
                        text=True, timeout=300, cwd=os.path.dirname(train.__file__))
  assert done.returncode == 0, done.stderr[-3000:]
  params_1 = dict(np.load(out_file))
  assert params_1.keys() == params_8.keys()
  for name in params_8:
    np.testing.assert_array_equal(params_1[name], params_8[name])
  _scores_two_processes_like_one(tmp_path, multi_dir, env, loop.Runtime(run), state.params)
  single_state = loop.Runtime(run).restore_latest(str(single_dir))[0]
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
               jax.device_get(state.params), jax.device_get(single_state.params))


def _scores_two_processes_like_one(tmp_path, model_dir, env, runtime, params):
  """Rows placed over a mesh that spans two processes come back whole on both
  (sharding.to_host): the log-likelihoods equal one process's on 8 devices."""
  spm = tmp_path / "vocab.model"  # the scorer's start token; the requests are ids already
  spm.write_bytes(vocab.train_model(["the runs' vocabulary is not this one"] * 50, 300,
                                    hard_limit=False))
  out, address = tmp_path / "scores.npz", f"127.0.0.1:{_free_port()}"
  script = f"REQUESTS = {REQUESTS!r}\n" + SCORE
  procs = [subprocess.Popen([sys.executable, "-c", script, str(model_dir), str(spm), address,
                             str(i), str(out)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True,
                            cwd=os.path.dirname(train.__file__)) for i in range(2)]
  outputs = [p.communicate(timeout=300)[0] for p in procs]
  for p, output in zip(procs, outputs):
    assert p.returncode == 0, output[-3000:]
  tok = SentencePieceTokenizer(spm.read_bytes())
  logliks, greedy = Scorer(runtime.model, params, tok, runtime.run.batch.seq_len, 8,
                           runtime.mesh).score_requests(REQUESTS)
  pair = np.load(out)
  np.testing.assert_allclose(pair["logliks"], logliks, rtol=1e-5)
  np.testing.assert_array_equal(pair["greedy"], greedy)
  assert np.all(logliks < 0) and len(set(np.round(logliks, 3))) == len(REQUESTS)
