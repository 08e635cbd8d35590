"""The real TPU compiler (libtpu, the [tpu] extra) accepts the sharded train step.

Nothing runs on these devices: topology descriptions give TPU devices to build a
mesh from, and `.lower(...).compile()` runs XLA:TPU for them on this CPU machine.
"""

import jax
import jax.numpy as jnp
import pytest

from bigsci_jax import data, sharding
from bigsci_jax import step as steps
from bigsci_jax.config import MeshConfig, ModelConfig, OptimizerConfig
from bigsci_jax.model import Transformer
from bigsci_jax.optim import make_optimizer

topologies = pytest.importorskip("jax.experimental.topologies")
pytestmark = pytest.mark.tpu_compile


def _tpu_devices(name):
  try:
    return topologies.get_topology_desc(platform="tpu", topology_name=name).devices
  except Exception as e:  # no libtpu: the [tpu] extra is not installed
    pytest.skip(f"no TPU compiler here ({type(e).__name__}); pip install -e '.[tpu]'")


def _compile(devices, mesh_cfg, model_cfg, micro=8, accumulation=2, seq=256):
  mesh = sharding.make_mesh(mesh_cfg, devices)
  model = Transformer(model_cfg)
  tx, schedule = make_optimizer(OptimizerConfig(), 100)
  abstract, shardings = steps.abstract_state(model, tx, mesh, seq)
  batch_sharding = sharding.batch_sharding(mesh, 3, batch_axis=1)
  batch = {k: jax.ShapeDtypeStruct((accumulation, micro, seq), jnp.int32, sharding=batch_sharding)
           for k in data.FEATURES}
  train_step = steps.make_train_step(model, tx, schedule, mesh, shardings)
  with sharding.activate(mesh):
    compiled = train_step.jitted.lower(abstract, batch).compile()
  state_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(abstract))
  return compiled, state_bytes


@pytest.mark.parametrize("topology, mesh", [("v5e:2x2", (1, 4, 1)), ("v5p:2x2x1", (1, 2, 2)),
                                            ("v6e:2x2", (2, 1, 2))])
@pytest.mark.parametrize("variant", [dict(position="alibi", mask="prefix"),
                                     dict(position="rotary", activation="swiglu", norm="rmsnorm",
                                          num_kv_heads=2, remat="dots_no_batch")])
def test_train_step_compiles_for_tpu(topology, mesh, variant):
  devices = _tpu_devices(topology)
  cfg = ModelConfig(num_layers=2, d_model=256, num_heads=4, d_ff=1024, vocab_size=1024,
                    max_len=256, dtype="bfloat16", **variant)
  compiled, state_bytes = _compile(devices, MeshConfig(*mesh), cfg)
  memory = compiled.memory_analysis()
  # The state is sharded (no chip holds all of it) and donated: the new state
  # reuses the old one's buffers, so everything but the batch is aliased.
  batch_bytes = len(data.FEATURES) * 2 * 8 * 256 * 4
  assert memory.argument_size_in_bytes < 0.75 * state_bytes
  assert memory.alias_size_in_bytes >= 0.95 * (memory.argument_size_in_bytes - batch_bytes)
  assert "tpu" in devices[0].platform.lower()
