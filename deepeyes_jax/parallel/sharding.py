"""Meshes and the logical-axis -> mesh-axis rules table: changing parallelism is a config change.

Every parameter carries logical axis names in its `out_sharding` metadata (e.g. `('embed', 'mlp')`). One rules
table maps logical names to mesh axes; changing the parallelism of a run is a change of mesh shape or rules, not
of model code.

Why our own mapping instead of `flax.nnx.logical_to_mesh_sharding`: small or odd dimensions (2 KV heads on a
4-way tensor axis, tiny test models) are common here, and a dimension that the mesh axis does not divide must
fall back to replication instead of failing at `device_put`. `logical_to_sharding` drops such an axis for that
dimension only.
"""

from __future__ import annotations

import contextlib
import threading
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


def put_host(tree, sharding):
  """`jax.device_put(tree, sharding)` of host arrays that every process holds alike, without device_put's check that
  they do: under jax.distributed that check is a collective over every device, which another thread's programs
  (one-step-off-policy rollouts on devices of their own) would pair up with differently on each process."""
  return jax.tree.map(lambda x: jax.make_array_from_callback(np.shape(x), sharding, lambda i: np.asarray(x)[i]), tree)


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


# --------------------------------------------------------------------------------------------------------------
# The mesh the code being traced is compiled for. `kernels.platform` sets it (`compiling_for(mesh)`, `scope(mesh)`,
# `no_mesh()`) together with the target platform; it lives here so that `constrain` reads it without importing the
# kernels (which import this module).
# --------------------------------------------------------------------------------------------------------------
NO_MESH = object()  # `targeting(NO_MESH)`: code traced per shard (inside shard_map) sees no mesh
_target = threading.local()


@contextlib.contextmanager
def targeting(mesh):
  """Within the block `target_mesh()` is `mesh`: a mesh, NO_MESH (none), or None (the mesh in scope, as outside
  any block)."""
  previous = getattr(_target, "mesh", None)
  _target.mesh = mesh
  try:
    yield
  finally:
    _target.mesh = previous


def shard_local() -> bool:
  """Inside `targeting(NO_MESH)` (the per-shard code of a shard_map)."""
  return getattr(_target, "mesh", None) is NO_MESH


def mesh_in_scope():
  """The mesh set with `jax.set_mesh` (the abstract one inside jit) or a legacy `with mesh:` block, else None."""
  try:
    mesh = jax.sharding.get_mesh()
  except ValueError:  # inside jit only the abstract mesh is known (it names its platform)
    mesh = jax.sharding.get_abstract_mesh()
  if not getattr(mesh, "empty", True):
    return mesh
  try:  # a legacy `with mesh:` block
    from jax._src import mesh as mesh_lib

    physical = mesh_lib.thread_resources.env.physical_mesh
    return None if physical.empty else physical
  except (ImportError, AttributeError):
    return None


def target_mesh():
  """The mesh the code being traced is sharded over: the one given to `targeting` (`platform.compiling_for`), else
  the mesh in scope, else None (a single device, or sharding left to the caller)."""
  mesh = getattr(_target, "mesh", None)
  if mesh is NO_MESH:
    return None
  return mesh if mesh is not None else mesh_in_scope()


def constrain(x: jax.Array, names: Sequence[str | None], rules=DEFAULT_RULES) -> jax.Array:
  """Pins an activation inside jit to the sharding its logical axis `names` give on the mesh the program is
  compiled for (`target_mesh()`, set by `kernels.platform.scope(mesh)` around the trainer's and sampler's calls);
  unchanged outside a mesh scope or on one device.

  Why: without constraints XLA propagates the parameters' FSDP sharding (the hidden size over fsdp) into the
  activations and keeps every row on every chip (the 7B learner then needs TiBs per chip); pinning rows to
  data x fsdp keeps each chip's rows on that chip, the weights being all-gathered layer by layer instead.
  """
  mesh = target_mesh()
  if mesh is None or mesh.size == 1:
    return x
  return jax.lax.with_sharding_constraint(x, logical_to_sharding(names, x.shape, mesh, rules))
