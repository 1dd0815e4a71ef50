"""Which platform ("cpu", "gpu" or "tpu") the code being traced will run on.

Code paths that depend on the hardware (the Pallas lowering, the CPU-only matmul and attention layouts, what
`attention_impl="auto"` picks) must follow the devices the program is compiled for, not `jax.default_backend()`:
a CPU host that compiles a program for a TPU slice (`python -m deepeyes_jax.aot`) has "cpu" as its default backend.

The answer, first match wins:
1. an explicit `compiling_for(...)` context (the AOT tool wraps its lowering in one);
2. the devices of the mesh set with `jax.set_mesh` (or a legacy `with mesh:` block);
3. the default backend: with no mesh in scope, a jitted function runs on the default devices.

Enter a context before the first trace of the functions it is meant for: jax caches a jitted function's trace by
its arguments' types and shardings, not by this context. A TPU mesh's shardings differ from any CPU trace's, and the
trainer's and sampler's calls always trace under `scope(their mesh)`, so the two never meet in practice.
"""

from __future__ import annotations

import contextlib
import threading

import jax

from deepeyes_jax.parallel import sharding as shd

PLATFORMS = ("cpu", "gpu", "tpu")
_local = threading.local()


def _normalise(platform: str) -> str:
  p = platform.lower()
  if p in ("cuda", "rocm"):
    return "gpu"
  if p not in PLATFORMS:
    raise ValueError(f"unknown platform {platform!r}; expected one of {PLATFORMS}")
  return p


def platform_of(devices_or_mesh) -> str:
  """Platform of a mesh (concrete or abstract), a sequence of devices, or a device."""
  if isinstance(devices_or_mesh, jax.sharding.AbstractMesh):
    device = devices_or_mesh.abstract_device
    if device is None or device.platform is None:
      raise ValueError(f"abstract mesh {devices_or_mesh} names no platform")
    return _normalise(device.platform)
  devices = getattr(devices_or_mesh, "devices", devices_or_mesh)  # Mesh.devices is an ndarray of devices
  if hasattr(devices, "flat"):
    devices = list(devices.flat)
  elif not isinstance(devices, (list, tuple)):
    devices = [devices]
  if not devices:
    raise ValueError("no devices to read a platform from")
  platforms = {_normalise(d.platform) for d in devices}
  if len(platforms) != 1:
    raise ValueError(f"devices of mixed platforms: {sorted(platforms)}")
  return platforms.pop()


@contextlib.contextmanager
def compiling_for(target):
  """Within the block, `target_platform()` is `target`'s: a platform name, a mesh, or devices. With a mesh,
  `target_mesh()` is that mesh too (the TPU attention kernels run per shard over it, see `tpu_attention`)."""
  platform = _normalise(target) if isinstance(target, str) else platform_of(target)
  mesh = target if hasattr(target, "axis_names") else None
  previous = getattr(_local, "platform", None)
  _local.platform = platform
  try:
    with shd.targeting(mesh):
      yield platform
  finally:
    _local.platform = previous


def scope(mesh):
  """`compiling_for(mesh)`, or nothing when `mesh` is None: what the trainer's and sampler's calls trace under, so
  that the kernels see the mesh they run on (the TPU kernels run per shard of it) exactly as the AOT tool does."""
  return contextlib.nullcontext() if mesh is None else compiling_for(mesh)


@contextlib.contextmanager
def no_mesh(executing: str | None = None):
  """Within the block, `target_mesh()` is None: code traced per shard (inside `shard_map`) sees no mesh, so that
  nothing in it shards again. `executing`: the platform of the mesh's devices, which still run the code
  (`executing_platform`)."""
  previous = getattr(_local, "executing", None)
  _local.executing = executing
  try:
    with shd.targeting(shd.NO_MESH):
      yield
  finally:
    _local.executing = previous


def executing_platform() -> str:
  """The platform of the devices that will run the program: the target mesh's, else the default backend's. It
  differs from `target_platform()` only inside `compiling_for("tpu")` on a CPU host: TPU kernels are asked for,
  and CPU devices run them (Pallas' TPU interpret mode; what the kernel tests do)."""
  mesh = target_mesh()
  if mesh is not None:
    return platform_of(mesh)
  if shd.shard_local() and getattr(_local, "executing", None):
    return _local.executing
  return _normalise(jax.default_backend())


def target_platform() -> str:
  """'cpu', 'gpu' or 'tpu': the platform the code being traced now is compiled for (see the module docstring)."""
  platform = getattr(_local, "platform", None)
  if platform is not None:
    return platform
  mesh = shd.mesh_in_scope()
  if mesh is not None:
    return platform_of(mesh)
  return _normalise(jax.default_backend())


def target_mesh():
  """The mesh the code being traced is sharded over: the one given to `compiling_for`, else the mesh in scope,
  else None (a single device, or sharding left to the caller). Kept in `parallel.sharding` (`constrain` reads it)."""
  return shd.target_mesh()
