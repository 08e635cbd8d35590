"""Test session setup: 8 fake CPU devices, no accelerator grabbing, repo root importable."""

import atexit
import os
import shutil
import sys
import tempfile

# Must happen before jax is imported anywhere.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             " --xla_force_host_platform_device_count=8").strip()
# The tests' models are tiny: most of a test's time is XLA compiling its steps, much of it
# in LLVM optimising the generated CPU code. At LLVM level 1 (the HLO passes, fusion and
# buffer assignment are unchanged) the suite took 15:23 on 2 cores, against 19:06 at the
# default 3 and 16:10 at 0 (whose unoptimised elementwise loops run 3x slower). Results differ
# from an optimised build by float rounding at most; a test's subprocesses compile with the
# session's flags (xla_flags below).
if "xla_backend_optimization_level" not in os.environ["XLA_FLAGS"]:
  os.environ["XLA_FLAGS"] += " --xla_backend_optimization_level=1"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# One persistent XLA compilation cache for the session, shared with the subprocesses tests
# start: the many tiny runs of the same shapes (sweeps, resumes, language plans) compile once.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="bigsci_jax_xla_cache_")
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
  atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)


def has_libtpu():
  """Whether the TPU compiler (libtpu, the [tpu] extra) is installed. Where it is, a
  failure to load it fails a test: xdist workers each load libtpu, and a worker refused
  by libtpu's lock file once skipped its TPU tests silently (aot.topology_devices now
  allows several loads)."""
  import importlib.util
  return importlib.util.find_spec("libtpu") is not None


def needs_libtpu():
  """Skips the calling test where the TPU compiler is not installed (has_libtpu)."""
  if not has_libtpu():
    pytest.skip("no TPU compiler here: pip install -e '.[tpu]' (libtpu)")


def xla_flags(devices):
  """This session's XLA_FLAGS with `devices` fake CPU devices: for a subprocess that must
  compile as the session does (the same flags, so the same rounding)."""
  flags = [f for f in os.environ["XLA_FLAGS"].split()
           if not f.startswith("--xla_force_host_platform_device_count")]
  return " ".join(flags + [f"--xla_force_host_platform_device_count={devices}"])


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
  sys.path.insert(0, REPO)


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def handbook_data_dir(tmp_path_factory):
  """One TFDS data dir for the session: tests that prepare handbook data share its cache."""
  return str(tmp_path_factory.mktemp("handbook_data"))


# The README's test command runs `-n auto --dist loadfile` (pytest-xdist): one worker per
# core, each test file on one worker so its module fixtures are built once. A worker
# holds jax, TensorFlow and torch and a test's own subprocesses: two used at most 7.5 GiB
# together on the 2-core CI VM.
WORKER_GIB = 4


def pytest_xdist_auto_num_workers(config):
  """-n auto: one worker per core, fewer where memory would not hold them."""
  memory_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
  return max(1, min(os.cpu_count() or 1, int(memory_gib // WORKER_GIB)))
