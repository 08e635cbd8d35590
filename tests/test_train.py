"""train.py and the loop: gin files, bad input, the smoke run, metrics and TensorBoard."""

import glob
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import train
from bigsci_jax import flops, loop
from bigsci_jax import step as steps
from bigsci_jax.config import ConfigError, MeshConfig, RunConfig
from bigsci_jax.metrics import read_metrics
from bigsci_jax.model import Transformer
from bigsci_jax.optim import make_optimizer
from bigsci_jax.sharding import make_mesh

GIN = os.path.join(os.path.dirname(train.__file__), "gin")
ALL_GIN = sorted(os.path.relpath(p, GIN) for p in glob.glob(os.path.join(GIN, "**", "*.gin"),
                                                              recursive=True))


@pytest.mark.parametrize("name", ALL_GIN)
def test_every_gin_file_builds_its_config(name):
  files = [name] if name.startswith("runs/") else ["runs/cpu_smoke.gin", name]
  # A recipe names what it needs; alone it refuses to build.
  required = {"recipes/adapt_language.gin": ["NEW_LANGUAGE = {'sw': '/data/swahili'}"]}
  if name in required:
    with pytest.raises(ConfigError, match=r"DataConfig.text_dirs=\{\} is invalid"):
      train.build_config(files, [])
  run, text = train.build_config(files, required.get(name, []))
  assert "TrainConfig.train_steps" in text
  if name == "recipes/adapt_language.gin":
    assert run.data.text_dirs == {"sw": "/data/swahili"} and run.data.replay == 0.25
    assert run.train.eval_at_start and run.batch.micro_batch_size == run.batch.batch_size
  if name.startswith("models/") and name != "models/tiny.gin":
    assert run.model.num_layers > 2  # the size file overrode the smoke model
  if name == "arch/alibi.gin":
    assert run.model.position == "alibi" and len(run.model.alibi_slopes) == run.model.num_heads


def test_gin_includes_survive_a_runs_directory_on_the_path(tmp_path, monkeypatch):
  """After `python train.py` writes runs/default/, the working directory holds runs/,
  which Python sees as a namespace package; gin's include 'runs/cpu_smoke.gin' must
  still find the library's file (a second `python train.py` resumes)."""
  import importlib
  (tmp_path / "runs" / "default").mkdir(parents=True)
  (tmp_path / "models").mkdir()
  monkeypatch.chdir(tmp_path)
  monkeypatch.syspath_prepend(str(tmp_path))
  importlib.invalidate_caches()
  run, _ = train.build_config(["runs/default.gin"], [])
  assert run.train.train_steps == 600 and run.data.mixture == "handbook_multilingual"


def test_macros_override_everywhere():
  for run_file in ("runs/cpu_smoke.gin", "runs/gpu.gin", "runs/tpu_pod.gin"):
    run, _ = train.build_config([run_file], ["TRAIN_STEPS=40", "BATCH_SIZE=256", "SEQ_LEN=64"])
    assert (run.train.train_steps, run.batch.batch_size, run.batch.seq_len) == (40, 256, 64)


def _param_count(model_file):
  run, _ = train.build_config(["runs/cpu_smoke.gin", model_file], [])
  return run, flops.param_counts(run.model).total


def test_bloom_176b_abstract_state_without_memory():
  run, counted = _param_count("models/bloom_176b.gin")
  mesh = make_mesh(MeshConfig(1, 1, 1), jax.devices()[:1])
  tx, _ = make_optimizer(run.optimizer, 10)
  state, _ = steps.abstract_state(Transformer(run.model), tx, mesh, run.batch.seq_len)
  n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state.params))
  assert all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(state))
  assert n == counted
  assert abs(n - 176.2e9) / 176.2e9 < 0.01, n


def test_size_ladder_parameter_counts():
  for name, target, tol in (("1_3b", 1.3e9, 0.02), ("125m", 125e6, 0.03), ("350m", 350e6, 0.05),
                            ("760m", 760e6, 0.05), ("6_7b", 6.7e9, 0.03), ("13b", 13e9, 0.03)):
    _, n = _param_count(f"models/{name}.gin")
    assert abs(n - target) / target < tol, (name, n)


@pytest.mark.parametrize("binding, field, allowed", [
    ("ModelConfig.position='fourier'", "ModelConfig.position", "'alibi'"),
    ("ModelConfig.num_heads=3", "ModelConfig.num_heads", "divide d_model=128"),
    ("MeshConfig.data=16", "MeshConfig", "only 8 are present"),
    ("BatchConfig.micro_batch_size=5", "BatchConfig.micro_batch_size", "divide batch_size=16"),
    ("TrainConfig.profile_steps=-1", "TrainConfig.profile_steps", ">= 0 (0: no trace)"),
    ("TrainConfig.eval_tasks=['riddles/en']", "TrainConfig.eval_tasks", "unknown task 'riddles/en'"),
    ("TrainConfig.eval_tasks=['cloze/zz']", "TrainConfig.eval_tasks", "unknown language 'zz'"),
])
def test_bad_gin_value_stops_with_one_sentence(tmp_path, capsys, binding, field, allowed):
  model_dir = tmp_path / "run"
  rc = train.main([f"--model_dir={model_dir}", f"--gin.{binding}", "--no_progress"])
  err = capsys.readouterr().err.strip().splitlines()
  assert rc == 2
  assert err[-1].startswith("error: ") and field in err[-1] and allowed in err[-1], err
  assert not (model_dir / "checkpoints").exists()  # stopped before building anything


def test_unknown_gin_parameter_is_reported(tmp_path, capsys):
  rc = train.main([f"--model_dir={tmp_path}", "--gin.ModelConfig.positon='alibi'"])
  assert rc == 2 and "positon" in capsys.readouterr().err


def test_missing_gin_file_is_reported(tmp_path, capsys):
  rc = train.main([f"--model_dir={tmp_path}", "--gin_file=runs/nope.gin"])
  assert rc == 2 and "runs/nope.gin" in capsys.readouterr().err


SYNTHETIC_SMOKE = ["--no_progress", "--gin.MIXTURE='synthetic'", "--gin.ModelConfig.vocab_size=256",
                   "--gin.TRAIN_STEPS=100", "--gin.TrainConfig.eval_every=50",
                   "--gin.TrainConfig.eval_batches=2"]


def test_cpu_smoke_run_learns_and_logs(tmp_path):
  """The CPU smoke run on synthetic data: loss falls >= 30% in 100 steps; metrics and
  TensorBoard written, per-layer norms every 50 steps (watch lines; step 100's weight
  norms are those of its checkpoint); running again continues the saved run."""
  model_dir = str(tmp_path / "smoke")
  assert train.main([f"--model_dir={model_dir}", "--gin.TrainConfig.watch_every=50"]
                    + SYNTHETIC_SMOKE) == 0
  rows = read_metrics(model_dir, "train")
  assert [r["step"] for r in rows] == list(range(1, 101))
  first, last = np.mean([r["loss"] for r in rows[:5]]), np.mean([r["loss"] for r in rows[-5:]])
  assert last <= 0.7 * first, (first, last)
  keys = {"loss", "learning_rate", "grad_norm", "batch_tokens", "tokens_seen", "flops_seen",
          "step_time_s", "tokens_per_s", "mfu"}
  assert keys <= set(rows[-1])
  assert rows[-1]["tokens_seen"] == 100 * 16 * 128 and rows[-1]["mfu"] is None  # CPU: no peak
  run = json.load(open(os.path.join(model_dir, "config.json")))
  assert run["train"]["train_steps"] == 100
  evals = read_metrics(model_dir, "eval")
  assert [r["step"] for r in evals] == [50, 100] and evals[-1]["loss"] < evals[0]["loss"]

  from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
  events = EventAccumulator(model_dir)
  events.Reload()
  tb_loss = [e.value for e in events.Scalars("train/loss")]
  np.testing.assert_allclose(tb_loss, [r["loss"] for r in rows], rtol=1e-6)

  watch = read_metrics(model_dir, "watch")
  assert [r["step"] for r in watch] == [50, 100]
  groups = [f"layer_{i:02d}/{m}" for i in range(2)
            for m in ("attention", "attention_norm", "mlp", "mlp_norm")] + [
                "embed", "final_norm", "pos_embed"]
  assert sorted(watch[-1]) == sorted(["step", "split"] + [
      f"{q}_norm/{g}" for q in ("param", "grad", "update") for g in groups])
  params, step = loop.Runtime(loop.read_run(model_dir)).restore_params(model_dir)
  params, norm = jax.device_get(params), lambda t: np.sqrt(sum(  # noqa: E731
      np.sum(np.square(np.asarray(x, np.float64))) for x in jax.tree.leaves(t)))
  assert step == 100
  for i in range(2):
    np.testing.assert_allclose(watch[-1][f"param_norm/layer_{i:02d}/mlp"], norm(
        jax.tree.map(lambda x: x[i], params["layers"]["block"]["mlp"])), rtol=1e-5)
  np.testing.assert_allclose(watch[-1]["param_norm/embed"], norm(params["embed"]), rtol=1e-5)
  tag = "watch/grad_norm/layer_01/mlp"
  assert [e.step for e in events.Scalars(tag)] == [50, 100]
  np.testing.assert_allclose([e.value for e in events.Scalars(tag)],
                             [r["grad_norm/layer_01/mlp"] for r in watch], rtol=1e-6)

  # Running again continues from the saved config and checkpoint: nothing left to do...
  assert train.main([f"--model_dir={model_dir}", "--no_progress"]) == 0
  assert len(read_metrics(model_dir, "train")) == 100
  assert json.load(open(os.path.join(model_dir, "config.json")))["data"]["mixture"] == "synthetic"
  # ...unless a flag on top of the saved config.gin extends the run.
  assert train.main([f"--model_dir={model_dir}", "--no_progress", "--gin.TRAIN_STEPS=105"]) == 0
  assert [r["step"] for r in read_metrics(model_dir, "train")][-6:] == list(range(100, 106))
  assert "TRAIN_STEPS = 105" in open(os.path.join(model_dir, "config.gin")).read()


def test_run_config_round_trips_through_json():
  run, _ = train.build_config(["runs/tpu_pod.gin", "models/bloom_176b.gin"], [])
  assert RunConfig.from_dict(json.loads(json.dumps(run.to_dict()))) == run


def test_non_finite_loss_stops_with_one_sentence(tmp_path, capsys):
  model_dir = tmp_path / "nan"
  rc = train.main([f"--model_dir={model_dir}", *SYNTHETIC_SMOKE, "--gin.TRAIN_STEPS=30",
                   "--gin.OptimizerConfig.optimizer='sgd'", "--gin.OptimizerConfig.clip_norm=None",
                   "--gin.OptimizerConfig.learning_rate=1e12", "--gin.OptimizerConfig.warmup_steps=0",
                   "--gin.TrainConfig.watch_every=1000"])
  lines = capsys.readouterr().err.strip().splitlines()
  err = lines[-1]
  assert rc == 2 and "skipped 5 times in a row" in err and "non-finite" in err, err
  assert "learning_rate" in err and sum("update skipped" in line for line in lines) == 5
  steps_logged = [r["step"] for r in read_metrics(str(model_dir), "train")]
  assert steps_logged == list(range(1, len(steps_logged) + 1))  # no skipped step is a train line
  events = read_metrics(str(model_dir), "event")
  assert [e.get("in_a_row") for e in events] == [1, 2, 3, 4, 5, None]
  assert [e["step"] for e in events[:5]] == list(range(steps_logged[-1] + 1, steps_logged[-1] + 6))
  assert events[-1]["event"] == "abort" and events[-1]["step"] == events[-2]["step"]
  # each skipped step's gradient norms by layer, off the watch_every schedule: the
  # non-finite groups
  watch = read_metrics(str(model_dir), "watch")
  assert [w["step"] for w in watch] == [e["step"] for e in events[:5]]
  for w in watch:
    assert {k.split("/")[0] for k in w if "/" in k} == {"grad_norm"}
    assert any(v is None or not np.isfinite(v) for k, v in w.items() if k.startswith("grad_norm/"))
  assert os.listdir(model_dir / "checkpoints") == []  # the diverged state was never saved


def test_init_from_starts_a_fresh_run_from_another_runs_weights(tmp_path, capsys):
  common = ["--no_progress", "--gin.MIXTURE='synthetic'", "--gin.ModelConfig.vocab_size=64",
            "--gin.BATCH_SIZE=4", "--gin.SEQ_LEN=16", "--gin.ModelConfig.d_model=32",
            "--gin.ModelConfig.d_ff=64", "--gin.TrainConfig.eval_batches=1"]
  source = str(tmp_path / "source")
  assert train.main([f"--model_dir={source}", "--gin.TRAIN_STEPS=25",
                     "--gin.OptimizerConfig.learning_rate=0.01", *common]) == 0
  warm = str(tmp_path / "warm")
  assert train.main([f"--model_dir={warm}", "--gin.TRAIN_STEPS=2", f"--gin.TrainConfig.init_from='{source}'",
                     *common]) == 0
  cold = str(tmp_path / "cold")
  assert train.main([f"--model_dir={cold}", "--gin.TRAIN_STEPS=2", *common]) == 0
  first = lambda d: read_metrics(d, "train")[0]  # noqa: E731
  # the warm run (data from row 0 again, a fresh optimizer) starts at the source's lower loss
  assert first(warm)["loss"] < first(cold)["loss"] - 0.3
  assert first(warm)["step"] == 1 and first(warm)["tokens_seen"] == 4 * 16
  capsys.readouterr()
  assert train.main([f"--model_dir={tmp_path / 'bad'}", "--gin.TRAIN_STEPS=2", *common,
                     f"--gin.TrainConfig.init_from='{source}'", "--gin.ModelConfig.d_ff=128"]) == 2
  assert "ModelConfig d_ff differ" in capsys.readouterr().err

  # What keeps the parameters' shapes may change: the causal model adapted to a prefix LM
  # with dropout, its weights held in bfloat16. A step too small to move them (SGD, lr
  # 1e-30) leaves exactly the source's weights, rounded to bfloat16.
  adapted = str(tmp_path / "adapted")
  assert train.main([f"--model_dir={adapted}", "--gin.TRAIN_STEPS=1", *common,
                     f"--gin.TrainConfig.init_from='{source}'", "--gin.ModelConfig.mask='prefix'",
                     "--gin.ModelConfig.dropout=0.1", "--gin.ModelConfig.param_dtype='bfloat16'",
                     "--gin.OptimizerConfig.optimizer='sgd'",
                     "--gin.OptimizerConfig.learning_rate=1e-30"]) == 0
  assert "ModelConfig mask, dropout, param_dtype set anew" in capsys.readouterr().err
  from bigsci_jax import loop
  params = [loop.Runtime(loop.read_run(d)).restore_params(d)[0] for d in (adapted, source)]
  assert {a.dtype for a in jax.tree.leaves(params[0])} == {jnp.dtype(jnp.bfloat16)}
  jax.tree.map(lambda a, s: np.testing.assert_array_equal(a, s.astype(jnp.bfloat16)), *params)


def _traced_steps(folder):
  """{step number of each StepTraceAnnotation}, and the number of train-step executions,
  in the trace of `folder`."""
  (path,) = glob.glob(os.path.join(folder, "*.xplane.pb"))
  steps_seen, runs = set(), set()
  for plane in jax.profiler.ProfileData.from_file(path).planes:
    for line in plane.lines:
      for event in line.events:
        stats = dict(event.stats)
        if event.name == "train" and "step_num" in stats:
          steps_seen.add(int(stats["step_num"]))
        if stats.get("hlo_module") == "jit_train_step":
          runs.add(stats["run_id"])
  return steps_seen, len(runs)


def test_profile_traces_the_chosen_steps_after_each_start(tmp_path, capsys):
  """profile_steps=2 after profile_skip=2: a trace of steps 3 and 4 holding exactly two
  train-step executions (it starts once step 2 is done and ends once step 4 is); resumed at step 6 with a window past the end, the trace holds
  the steps left (7, 8) and stops with the run."""
  model_dir = str(tmp_path / "profiled")
  common = [f"--model_dir={model_dir}", "--no_progress", "--gin.MIXTURE='synthetic'",
            "--gin.ModelConfig.vocab_size=64", "--gin.BATCH_SIZE=4", "--gin.SEQ_LEN=16",
            "--gin.ModelConfig.d_model=32", "--gin.ModelConfig.d_ff=64",
            "--gin.TrainConfig.eval_batches=1"]
  assert train.main([*common, "--gin.TRAIN_STEPS=6", "--gin.TrainConfig.profile_steps=2"]) == 0
  assert train.main([*common, "--gin.TRAIN_STEPS=8", "--gin.TrainConfig.profile_steps=5",
                     "--gin.TrainConfig.profile_skip=0"]) == 0
  events = [e for e in read_metrics(model_dir, "event") if e["event"] == "profile"]
  assert [(e["step"], e["steps"]) for e in events] == [(4, [3, 4]), (8, [7, 8])]
  for event, steps_wanted in zip(events, ({3, 4}, {7, 8})):
    assert os.path.dirname(event["dir"]) == os.path.join(model_dir, "plugins", "profile")
    assert _traced_steps(event["dir"]) == (steps_wanted, 2)
  assert "steps 3-4 traced in" in capsys.readouterr().err
  assert [r["step"] for r in read_metrics(model_dir, "train")] == list(range(1, 9))


def test_a_cooldown_branch_of_a_wsd_run_equals_the_shorter_run_trained_alone(tmp_path, capsys):
  """A 'wsd' run of 12 steps keeps its step-6 checkpoint; a branch from it with
  train_steps=8 (cooldown from step 6) ends where an 8-step run trained from scratch
  ends: same losses, the same weights bit for bit. Its metrics.jsonl reads like one run."""
  common = ["--no_progress", "--gin.MIXTURE='synthetic'", "--gin.ModelConfig.vocab_size=64",
            "--gin.BATCH_SIZE=4", "--gin.SEQ_LEN=16", "--gin.ModelConfig.d_model=32",
            "--gin.ModelConfig.d_ff=64", "--gin.TrainConfig.eval_batches=1",
            "--gin.OptimizerConfig.decay='wsd'", "--gin.OptimizerConfig.cooldown_fraction=0.25",
            "--gin.OptimizerConfig.warmup_steps=2", "--gin.OptimizerConfig.learning_rate=0.01",
            "--gin.TrainConfig.checkpoint_every=100"]
  trunk, branch, alone = (str(tmp_path / n) for n in ("trunk", "branch", "alone"))
  assert train.main([f"--model_dir={trunk}", *common, "--gin.TRAIN_STEPS=12",
                     "--gin.TrainConfig.keep_steps=[6]"]) == 0
  assert sorted(os.listdir(os.path.join(trunk, "checkpoints"))) == ["12", "6"]
  assert train.main([f"--model_dir={branch}", *common, "--gin.TRAIN_STEPS=8",
                     f"--gin.TrainConfig.branch_from='{trunk}'", "--gin.TrainConfig.branch_step=6"]) == 0
  assert f"continuing {trunk} from its step 6" in capsys.readouterr().err
  assert train.main([f"--model_dir={alone}", *common, "--gin.TRAIN_STEPS=8"]) == 0
  branched, trained = read_metrics(branch, "train"), read_metrics(alone, "train")
  assert [r["step"] for r in branched] == list(range(1, 9))
  np.testing.assert_allclose([r["loss"] for r in branched], [r["loss"] for r in trained], rtol=1e-6)
  np.testing.assert_allclose([r["learning_rate"] for r in branched],
                             [r["learning_rate"] for r in trained], rtol=1e-7)
  assert read_metrics(branch, "eval")[-1]["loss"] == pytest.approx(
      read_metrics(alone, "eval")[-1]["loss"], rel=1e-6)
  from bigsci_jax import loop
  params = [loop.Runtime(loop.read_run(d)).restore_params(d)[0] for d in (branch, alone)]
  jax.tree.map(np.testing.assert_array_equal, *params)  # bit for bit

  # A branch may compute the model otherwise (rematerialised, another attention
  # implementation: other hardware); it trains the same function.
  recomputed = str(tmp_path / "recomputed")
  assert train.main([f"--model_dir={recomputed}", *common, "--gin.TRAIN_STEPS=8",
                     "--gin.ModelConfig.remat='full'", "--gin.ModelConfig.attention_impl='reference'",
                     f"--gin.TrainConfig.branch_from='{trunk}'", "--gin.TrainConfig.branch_step=6"]) == 0
  np.testing.assert_allclose([r["loss"] for r in read_metrics(recomputed, "train")],
                             [r["loss"] for r in trained], rtol=1e-5)

  # A step the trunk did not keep, and a different model, stop with one sentence each.
  capsys.readouterr()
  assert train.main([f"--model_dir={tmp_path / 'b2'}", *common, "--gin.TRAIN_STEPS=8",
                     f"--gin.TrainConfig.branch_from='{trunk}'", "--gin.TrainConfig.branch_step=4"]) == 2
  assert "has checkpoints at steps [6, 12]" in capsys.readouterr().err
  assert train.main([f"--model_dir={tmp_path / 'b3'}", *common, "--gin.TRAIN_STEPS=8",
                     "--gin.ModelConfig.d_ff=128", f"--gin.TrainConfig.branch_from='{trunk}'"]) == 2
  err = capsys.readouterr().err
  assert "model.d_ff differ" in err and not os.path.exists(tmp_path / "b3" / "config.json")
  # (and, here on synthetic data, text tasks have no vocabulary to be read with)
  assert train.main([f"--model_dir={tmp_path / 'b4'}", *common, "--gin.TRAIN_STEPS=8",
                     "--gin.TrainConfig.eval_tasks=['cloze/en']"]) == 2
  assert "synthetic data has no vocabulary" in capsys.readouterr().err
