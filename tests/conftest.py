"""Test session setup: 8 fake CPU devices, no accelerator grabbing, repo root importable."""

import os
import sys

# Must happen before jax is imported anywhere.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
  sys.path.insert(0, REPO)


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def handbook_data_dir(tmp_path_factory):
  """One TFDS data dir for the session: tests that prepare handbook data share its cache."""
  return str(tmp_path_factory.mktemp("handbook_data"))
