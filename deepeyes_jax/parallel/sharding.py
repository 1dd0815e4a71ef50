"""Meshes and the logical-axis -> mesh-axis rules table (DESIGN.md principle 6).

Every parameter carries logical axis names in its `out_sharding` metadata (e.g. `('embed', 'mlp')`). One rules
table maps logical names to mesh axes; changing the parallelism of a run is a change of mesh shape or rules, not
of model code.

Why our own mapping instead of `flax.nnx.logical_to_mesh_sharding`: small or odd dimensions (2 KV heads on a
4-way tensor axis, tiny test models) are common here, and a dimension that the mesh axis does not divide must
fall back to replication instead of failing at `device_put`. `logical_to_sharding` drops such an axis for that
dimension only.
"""

from __future__ import annotations

from typing import Iterable, Mapping, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")

# Logical axis -> mesh axis (or tuple of mesh axes, or None = replicated).
DEFAULT_RULES: dict[str, str | tuple[str, ...] | None] = {
  # activations (`constrain`): rows over data x fsdp, the feature axis whole (FSDP gathers weights, not
  # activations), heads / MLP columns / vocabulary over tensor as their weights are; between layers the residual
  # stream's tokens are split over tensor too (sequence parallelism: what a remat'ed layer keeps is 1/tensor of
  # it; XLA gathers the tokens before the projections and scatters them after)
  "batch": ("data", "fsdp"),
  "length": None,
  "act_length": "tensor",
  "act_embed": None,
  "act_heads": "tensor",
  "act_mlp": "tensor",
  "act_vocab": "tensor",
  # text decoder parameters
  "vocab": "tensor",
  "embed": "fsdp",
  "heads": "tensor",
  "kv_heads": "tensor",
  "mlp": "tensor",
  "norm": None,
  # vision tower parameters
  "patch": None,
  "vision_embed": "fsdp",
  "vision_heads": "tensor",
  "vision_mlp": "tensor",
  "merger_in": "fsdp",
  "qkv": None,
}


def make_mesh(data: int = 1, fsdp: int = 1, tensor: int = 1, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A (data, fsdp, tensor) mesh. `-1` in one slot takes the remaining devices."""
  devices = list(devices if devices is not None else jax.devices())
  shape = [data, fsdp, tensor]
  if shape.count(-1) > 1:
    raise ValueError(f"at most one mesh axis may be -1, got data={data} fsdp={fsdp} tensor={tensor}")
  if -1 in shape:
    rest = int(np.prod([s for s in shape if s != -1]))
    shape[shape.index(-1)] = len(devices) // rest
  n = int(np.prod(shape))
  if n != len(devices):
    raise ValueError(
      f"mesh data={shape[0]} x fsdp={shape[1]} x tensor={shape[2]} = {n} devices, but {len(devices)} are available"
    )
  return Mesh(np.asarray(devices).reshape(shape), MESH_AXES)


def logical_to_spec(
  names: Iterable[str | None] | None,
  shape: Sequence[int],
  mesh: Mesh,
  rules: Mapping[str, str | tuple[str, ...] | None] = DEFAULT_RULES,
) -> P:
  """PartitionSpec for an array of `shape` whose dims carry logical `names`.

  A mesh axis is used at most once per array, and only where it divides the dimension.
  """
  if names is None:
    return P()
  names = tuple(names)
  if len(names) != len(shape):
    raise ValueError(f"logical axes {names} do not match shape {tuple(shape)}")
  used: set[str] = set()
  out = []
  for name, dim in zip(names, shape):
    target = rules.get(name) if name is not None else None
    axes = (target,) if isinstance(target, str) else tuple(target or ())
    axes = tuple(a for a in axes if a in mesh.shape and a not in used and mesh.shape[a] > 1)
    # Not divisible: keep the longest prefix of the mesh axes that divides the dimension.
    while axes and dim % int(np.prod([mesh.shape[a] for a in axes])):
      axes = axes[:-1]
    used.update(axes)
    out.append(None if not axes else (axes[0] if len(axes) == 1 else axes))
  return P(*out)


def logical_to_sharding(names, shape, mesh: Mesh, rules=DEFAULT_RULES) -> NamedSharding:
  return NamedSharding(mesh, logical_to_spec(names, shape, mesh, rules))


def variable_sharding(variable, mesh: Mesh, rules=DEFAULT_RULES) -> NamedSharding:
  """NamedSharding for an `nnx.Variable` (or abstract one) from its `out_sharding` logical names."""
  names = getattr(variable, "out_sharding", None)
  return logical_to_sharding(names, variable.shape, mesh, rules)


def constrain(x: jax.Array, names: Sequence[str | None], rules=DEFAULT_RULES) -> jax.Array:
  """Pins an activation inside jit to the sharding its logical axis `names` give on the mesh the program is
  compiled for (`kernels.platform.target_mesh()`, set by `platform.scope(mesh)` around the trainer's and sampler's
  calls); unchanged outside a mesh scope or on one device.

  Why: without constraints XLA propagates the parameters' FSDP sharding (the hidden size over fsdp) into the
  activations and keeps every row on every chip (the 7B learner then needs TiBs per chip); pinning rows to
  data x fsdp keeps each chip's rows on that chip, the weights being all-gathered layer by layer instead.
  """
  from deepeyes_jax.kernels import platform  # the compile target; kernels import nothing from here

  mesh = platform.target_mesh()
  if mesh is None or mesh.size == 1:
    return x
  return jax.lax.with_sharding_constraint(x, logical_to_sharding(names, x.shape, mesh, rules))


def state_shardings(state, mesh: Mesh, rules=DEFAULT_RULES):
  """Maps an `nnx.State` of Variables to a matching tree of NamedShardings."""
  from flax import nnx

  return jax.tree.map(lambda v: variable_sharding(v, mesh, rules), state, is_leaf=lambda x: isinstance(x, nnx.Variable))
