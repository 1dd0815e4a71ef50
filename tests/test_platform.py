"""`kernels.platform`: code paths follow the platform a program is compiled for, not the host's default backend."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deepeyes_jax.kernels import platform
from deepeyes_jax.models.qwen2_5_vl import layers
from deepeyes_jax.parallel import sharding as shd


def test_default_is_the_backend_of_this_host():
  assert platform.target_platform() == platform.executing_platform() == "cpu"
  assert platform.target_mesh() is None


def test_compiling_for_a_platform_name_or_a_mesh_and_restored_after():
  with platform.compiling_for("TPU"):
    assert platform.target_platform() == "tpu"
    assert platform.executing_platform() == "cpu"  # no TPU mesh: CPU devices would run it (interpret mode)
    with platform.compiling_for("cuda"):
      assert platform.target_platform() == "gpu"
    assert platform.target_platform() == "tpu"
  mesh = shd.make_mesh(1, 2, 1, devices=jax.devices()[:2])
  with platform.compiling_for(mesh):
    assert platform.target_platform() == "cpu" and platform.target_mesh() is mesh
  with platform.scope(None):
    assert platform.target_mesh() is None
  assert platform.target_platform() == "cpu" and platform.target_mesh() is None
  with pytest.raises(ValueError, match="unknown platform"):
    with platform.compiling_for("ipu"):
      pass


def test_mesh_set_with_jax_is_seen_inside_jit():
  mesh = shd.make_mesh(1, 2, 1, devices=jax.devices()[:2])
  seen = []

  @jax.jit
  def f(x):
    seen.append((platform.target_platform(), platform.target_mesh()))
    return x

  with jax.set_mesh(mesh):
    f(jnp.ones(2))
  ((target, abstract),) = seen
  assert target == "cpu" and dict(abstract.shape) == dict(mesh.shape)


def test_cpu_only_matmul_layout_is_not_compiled_for_another_platform():
  """`layers.matmul_out_in` takes its CPU-only (w @ x.T).T form only when the target is CPU: the form shows in the
  traced program as a dot producing (out, M)."""
  x = jnp.asarray(np.random.default_rng(0).standard_normal((8, 16)), jnp.float32)
  w = jnp.asarray(np.random.default_rng(1).standard_normal((24, 16)), jnp.float32)
  # A fresh function per trace: jax caches traces by argument types, not by the platform context (see platform.py).
  text = lambda: str(jax.make_jaxpr(lambda x, w: layers.matmul_out_in(x, w))(x, w))  # noqa: E731
  assert "optimization_barrier" in text()
  with platform.compiling_for("tpu"):
    assert "optimization_barrier" not in text()


def test_peak_flops_of_every_device_kind():
  """MFU needs the peak of the devices it runs on: TPUs name their generation in their own way ("TPU v5" is a
  v5p, "TPU v6 lite" a v6e)."""
  from deepeyes_jax.rl import metrics

  class Device:
    def __init__(self, kind, platform="tpu"):
      self.device_kind, self.platform = kind, platform

  expect = {"TPU v5": 459e12, "TPU v5 lite": 197e12, "TPU v6 lite": 918e12, "TPU v4": 275e12}
  expect |= {"NVIDIA H100 80GB HBM3": 989e12, "NVIDIA H200": 989e12}
  for kind, peak in expect.items():
    assert metrics.device_peak_flops(Device(kind)) == peak, kind
  assert metrics.device_peak_flops(Device("cpu", "cpu")) == metrics.PEAK_FLOPS["cpu"]
  assert np.isnan(metrics.device_peak_flops(Device("TPU v9", "tpu")))
