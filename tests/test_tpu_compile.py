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


@pytest.mark.parametrize("topology", ["v5e:2x2", "v5p:2x2x1", "v6e:2x2"])
@pytest.mark.parametrize("d", [64, 128])
def test_pallas_attention_lowers_through_mosaic(topology, d):
  """The Pallas TPU kernel (ALiBi + packed prefix-LM masks + grouped-query heads, bf16,
  default block sizes for the generation) is compiled by Mosaic, not interpreted, and
  its gradient (for now the XLA recomputation, which needs no forward kernel) compiles."""
  import numpy as np
  from bigsci_jax.kernels import pallas_tpu
  devices = _tpu_devices(topology)
  one = jax.sharding.SingleDeviceSharding(devices[0])
  b, t, h, g = 1, 2000, 8, 2
  block_q, block_k = pallas_tpu.default_blocks(devices[0].device_kind)

  def spec(shape, dtype=jnp.bfloat16):
    return jax.ShapeDtypeStruct(shape, dtype, sharding=one)

  def loss(q, k, v, segment_ids, prefix, slopes):
    out = pallas_tpu.attention(q, k, v, segment_ids=segment_ids, prefix_mask=prefix,
                               alibi_slopes=slopes, block_q=block_q, block_k=block_k,
                               interpret=False)
    return jnp.sum(out.astype(jnp.float32))

  args = (spec((b, t, h, d)), spec((b, t, g, d)), spec((b, t, g, d)),
          spec((b, t), jnp.int32), spec((b, t), jnp.int32), spec((h,), jnp.float32))
  # Mosaic reads the target chip from the mesh's devices.
  with jax.set_mesh(jax.sharding.Mesh(np.array(devices[:1]), ("x",))):
    forward = jax.jit(loss).lower(*args).compile()
    backward = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(*args).compile()
  assert "tpu_custom_call" in forward.as_text() and backward.as_text()
  assert forward.memory_analysis().temp_size_in_bytes < 64 * 2**20
