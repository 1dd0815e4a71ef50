"""Sharded forward on a (data=2, fsdp=2, tensor=2) mesh of 8 simulated CPU devices equals one device."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import image_block, random_pixels
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from deepeyes_jax.models import qwen2_5_vl as qvl
from deepeyes_jax.models.qwen2_5_vl import model as model_lib
from deepeyes_jax.parallel import sharding as shd


def test_eight_devices_are_simulated():
  assert jax.device_count() == 8, "tests/conftest.py must set XLA_FLAGS before jax is imported"


def _batch():
  rows = [
    [4, 5] + image_block((1, 8, 8)) + [6],
    [7] + image_block((1, 4, 6)) + [8, 9, 10, 11],
    [14, 15, 16] + image_block((1, 2, 10)),
    [20, 21, 22, 23, 24],
  ]
  grids = [(1, 8, 8), (1, 4, 6), (1, 2, 10)]
  s = max(map(len, rows))
  ids = np.zeros((4, s), np.int64)
  mask = np.zeros((4, s), np.int64)
  for i, r in enumerate(rows):
    ids[i, s - len(r) :], mask[i, s - len(r) :] = r, 1
  return ids, mask, grids


def test_sharded_forward_equals_single_device(hf_checkpoint, jax_model):
  ids, mask, grids = _batch()
  pv = random_pixels(grids, seed=5)
  single = np.asarray(jax_model(ids, attention_mask=mask, pixel_values=pv, image_grid_thw=np.array(grids)))

  mesh = shd.make_mesh(data=2, fsdp=2, tensor=2)
  sharded = qvl.from_pretrained(hf_checkpoint[0], dtype=jnp.float32, mesh=mesh)
  specs = {
    v.get_value().sharding.spec
    for v in jax.tree.leaves(nnx.state(sharded, nnx.Param), is_leaf=lambda x: isinstance(x, nnx.Variable))
  }
  assert P("fsdp", "tensor") in specs and P("tensor", "fsdp") in specs

  inputs = qvl.prepare_inputs(sharded.config, ids, mask, pv, np.array(grids))
  batch = NamedSharding(mesh, P(("data", "fsdp")))
  for k in ("input_ids", "segment_ids", "positions"):
    inputs[k] = jax.device_put(inputs[k], batch)
  inputs["position_ids"] = jax.device_put(inputs["position_ids"], NamedSharding(mesh, P(None, ("data", "fsdp"))))
  graphdef, state = nnx.split(sharded)
  out = model_lib._jit_forward(graphdef, state, inputs)
  assert len(out.sharding.device_set) == 8
  np.testing.assert_allclose(np.asarray(out)[mask == 1], single[mask == 1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
  "names,shape,expected",
  [
    (("embed", "mlp"), (64, 96), P("fsdp", "tensor")),
    (("embed", "kv_heads"), (64, 3), P("fsdp", None)),  # 3 is not divisible by tensor=2: replicate that dim
    (("batch", "length"), (4, 7), P(("data", "fsdp"), None)),
    (("batch", "length"), (2, 7), P("data", None)),  # 2 rows: only the data axis divides
    (("norm",), (64,), P(None)),
  ],
)
def test_logical_rules(names, shape, expected):
  mesh = shd.make_mesh(2, 2, 2)
  assert shd.logical_to_spec(names, shape, mesh) == expected


def test_make_mesh_errors():
  with pytest.raises(ValueError, match="8 are available"):
    shd.make_mesh(2, 2, 3)
  assert shd.make_mesh(-1, 1, 2).shape == {"data": 4, "fsdp": 1, "tensor": 2}
