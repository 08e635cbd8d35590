"""python -m bigsci_jax.aot: the train step compiled ahead of time for a TPU slice
(the real TPU compiler from libtpu) or for N fake CPU devices; nothing runs."""

import contextlib
import io
import json

import pytest

from bigsci_jax import aot, flops
from bigsci_jax.config import ModelConfig
from conftest import needs_libtpu

pytestmark = pytest.mark.tpu_compile

SMALL = ["--gin_file=runs/cpu_smoke.gin", "--gin.MIXTURE='synthetic'", "--gin.TrainConfig.eval_batches=2",
         "--gin.ModelConfig.vocab_size=1024", "--gin.ModelConfig.position='alibi'"]


def _needs_libtpu():
  needs_libtpu()
  aot.topology_devices("v5e:2x2")


def _run(capsys, argv):
  code = aot.main(argv)
  out, err = capsys.readouterr()
  lines = out.strip().splitlines()
  return code, (json.loads(lines[-1]) if lines and code == 0 else None), err


@pytest.fixture(scope="module")
def one_slice():
  """The small config's report on v5e:2x2 with fsdp over its 4 chips (compiled once)."""
  _needs_libtpu()
  out = io.StringIO()
  with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
    assert aot.main([*SMALL, "--topology=v5e:2x2", "--mesh=1x4x1"]) == 0
  return json.loads(out.getvalue().strip().splitlines()[-1])


def test_small_config_compiles_for_a_v5e_slice(one_slice):
  report = one_slice
  cfg = ModelConfig(num_layers=2, d_model=128, num_heads=4, vocab_size=1024, position="alibi")
  assert report["params"] == flops.param_counts(cfg).total
  assert report["mesh"] == {"data": 1, "fsdp": 4, "tensor": 1}
  assert (report["devices"], report["chips"], report["topology"]) == (4, 4, "v5e:2x2")
  assert report["attention_impl"] == "pallas_tpu"
  assert report["hbm_bytes"] == int(15.75 * 2**30) and report["fits"]
  m = report["memory"]
  assert report["bytes_per_chip"] == m["total"] == (m["argument"] + m["output"] - m["alias"]
                                                    + m["temp"] + m["code"])
  # fsdp over 4 chips: each holds about a quarter of the f32 params + 2 Adam moments.
  state = 3 * 4 * report["params"]
  assert 0.2 * state < m["argument"] < 0.5 * state
  batch = report["batch"]
  assert report["flops_per_step"] == pytest.approx(
      flops.flops_per_token(cfg, batch["seq_len"]) * batch["global"] * batch["seq_len"])


def test_a_decoding_step_with_host_weights_keeps_one_layer_on_the_device(capsys):
  """--step=decode --offload=host: the layers' weight matrices become host arguments and
  the device holds about one layer's worth of them at a time."""
  _needs_libtpu()
  argv = [*SMALL, "--topology=v5e:2x2", "--mesh=1x1x4", "--step=decode", "--decode_rows=4",
          "--gin.ModelConfig.num_layers=8", "--gin.ModelConfig.d_model=512",
          "--gin.ModelConfig.d_ff=4096", "--gin.ModelConfig.param_dtype='bfloat16'"]
  code, on_device, err = _run(capsys, argv)
  assert code == 0, err
  code, offloaded, err = _run(capsys, [*argv, "--offload=host"])
  assert code == 0, err
  assert (offloaded["step"], offloaded["offload"], on_device["offload"]) == ("decode", "host", "none")
  assert offloaded["batch"] == {"rows": 4, "cache_rows": 4, "cache_len": 512}
  cfg = ModelConfig(num_layers=8, d_model=512, d_ff=4096, num_heads=4, vocab_size=1024,
                    position="alibi")
  assert offloaded["flops_per_step"] == pytest.approx(flops.flops_per_token(cfg, 512) / 3 * 4)
  layer_kernels = 2 * (4 * 512 * 512 + 2 * 512 * 4096) // 4  # bf16 bytes per device (tensor 4)
  host, device = offloaded["memory"], on_device["memory"]
  assert device["host_argument"] == 0
  assert 0.95 * 8 * layer_kernels < host["host_argument"] < 1.05 * 8 * layer_kernels
  assert device["argument"] - host["argument"] > 0.9 * 8 * layer_kernels
  assert host["temp"] - device["temp"] < 3 * layer_kernels  # a layer (double-buffered), not 8


@pytest.mark.parametrize("topology,heads,d_model,dtype", [("cpu:4", 4, 128, "float32"),
                                                          ("v5e:2x2", 28, 3584, "bfloat16")])
def test_a_decoding_step_updates_the_kv_cache_in_place(capsys, topology, heads, d_model, dtype):
  """The layer scan carries the layers' stacked cache and each layer writes its rows
  with one scatter, so a step's temporaries stay far below the cache's size: for one
  row and for four, and for a server's step of 2 rows in a cache of 8, with the rows
  in one block (data 1) and in two (data 2). (Scanned as an input and an output, the
  cache was copied whole every step; with 7 heads per chip, or one row, XLA:TPU also
  copied it to another layout.)"""
  if topology != "cpu:4":
    _needs_libtpu()
  argv = [*SMALL, f"--topology={topology}", "--step=decode",
          "--gin.ModelConfig.num_layers=8", "--gin.ModelConfig.max_len=2048",
          f"--gin.ModelConfig.num_heads={heads}", f"--gin.ModelConfig.d_model={d_model}",
          "--gin.ModelConfig.d_ff=512", f"--gin.ModelConfig.param_dtype='{dtype}'",
          f"--gin.ModelConfig.dtype='{dtype}'"]
  for rows, cache_rows, data, tensor in ((1, 1, 1, 4), (4, 4, 1, 4), (2, 8, 1, 4), (2, 8, 2, 2)):
    code, report, err = _run(capsys, [*argv, f"--mesh={data}x1x{tensor}", f"--decode_rows={rows}",
                                      f"--cache_rows={cache_rows}"])
    assert code == 0, err
    m = report["memory"]
    # keys and values, their heads over the tensor axis; positions (int32) and prefix flags
    width = 2 if dtype == "bfloat16" else 4
    cache = 8 * cache_rows // data * 2048 * (2 * width * d_model // tensor + 4 + 1)
    assert m["alias"] == pytest.approx(cache, rel=0.02)  # the donated cache is the output
    assert m["temp"] < 0.3 * cache, (rows, cache_rows, data, m)


def test_two_slices_run_the_data_axis_across_them(capsys, one_slice):
  """--slices=2 (multislice): 8 chips of two v5e:2x2 slices, data 2 x fsdp 4. The second
  slice is a data-parallel replica, so each chip holds the same share of the state as
  with one slice (fsdp 4): per-chip arguments within 1% of the one-slice compile."""
  _needs_libtpu()
  code, two, err = _run(capsys, [*SMALL, "--topology=v5e:2x2", "--slices=2", "--mesh=2x4x1"])
  assert code == 0, err
  assert (two["devices"], two["chips"], two["slices"]) == (8, 8, 2) and two["fits"]
  assert two["mesh"] == {"data": 2, "fsdp": 4, "tensor": 1}
  assert one_slice["slices"] == 1
  assert two["memory"]["argument"] == pytest.approx(one_slice["memory"]["argument"], rel=0.01)


def test_fake_cpu_devices_check_the_mesh_without_libtpu(capsys):
  code, report, err = _run(capsys, [*SMALL, "--topology=cpu:8", "--mesh=2x2x2"])
  assert code == 0, err
  assert report["mesh"] == {"data": 2, "fsdp": 2, "tensor": 2}
  assert report["device_kind"] == "cpu" and report["hbm_bytes"] is None
  assert report["attention_impl"] == "xla"


def test_a_config_over_the_chips_memory_exits_1_with_the_amounts(capsys):
  _needs_libtpu()
  code, _, err = _run(capsys, [*SMALL, "--topology=v5e:2x2", "--mesh=1x1x1",
                               "--gin.ModelConfig.vocab_size=4194304", "--gin.ModelConfig.num_layers=1"])
  assert code == 1
  lines = err.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: the train step on v5e:2x2"), err
  assert "but the TPU v5 lite device has 15.75G" in lines[0] and "bigger slice" in lines[0]
  assert "sequence_parallel" not in lines[0]  # nothing to split over at tensor = 1
  assert "ModelConfig.logits_chunk=512" in lines[0]  # its logits are most of the step's memory


@pytest.mark.parametrize("split", [False, True])
def test_a_step_over_memory_on_a_tensor_mesh_offers_sequence_parallelism_where_it_is_off(
    capsys, split):
  """Activations of 64 x 2048 tokens over tensor 4: with the residual stream copied on every
  tensor device the fixes include sequence_parallel; with it split already, not."""
  _needs_libtpu()
  code, _, err = _run(capsys, [*SMALL, "--topology=v5e:2x2", "--mesh=1x1x4",
                               "--gin.BATCH_SIZE=64", "--gin.SEQ_LEN=2048",
                               "--gin.ModelConfig.max_len=2048", "--gin.ModelConfig.d_model=1024",
                               "--gin.ModelConfig.num_heads=8", "--gin.ModelConfig.num_layers=8",
                               f"--gin.ModelConfig.sequence_parallel={split}"])
  assert code == 1, err
  lines = err.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: the train step on v5e:2x2"), err
  assert ("ModelConfig.sequence_parallel=True" in lines[0]) != split, lines[0]
  assert "logits_chunk" not in lines[0]  # a 1024-token vocabulary's logits are not the problem


@pytest.mark.parametrize("flag, words", [
    ("--mesh=2x2", "write DATAxFSDPxTENSOR"),
    ("--topology=v9z:2x2", "is not a TPU slice"),
    ("--topology=cpu:64", "needs 64 CPU devices"),
    ("--gin.BatchConfig.micro_batch_size=6", "must divide batch_size"),
    ("--slices=2", "must be a multiple of MeshConfig.slices"),
])
def test_bad_flags_stop_with_one_sentence(capsys, flag, words):
  argv = [*SMALL, "--topology=cpu:8", "--mesh=1x1x1"]
  argv = [a for a in argv if not a.startswith(flag.split("=")[0] + "=")] + [flag]
  code, _, err = _run(capsys, argv)
  assert code == 1
  lines = err.strip().splitlines()
  assert len(lines) == 1 and words in lines[0], err
