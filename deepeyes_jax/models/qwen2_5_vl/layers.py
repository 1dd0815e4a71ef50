"""Building blocks shared by the vision tower and the text decoder.

Linear layers are `nnx.Linear` / `nnx.Einsum` with logical-axis metadata. RMSNorm is our own because the
reference normalises in fp32, casts back to the input dtype and only then multiplies by the weight
(`nnx.RMSNorm` multiplies before the cast, which drifts in bf16).
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

INIT_STD = 0.02


def axes(*names: str | None) -> dict:
  """Variable metadata carrying logical axis names; sharding is applied later through the rules table."""
  return {"out_sharding": tuple(names), "eager_sharding": False}


def linear(din: int, dout: int, names: Sequence[str | None], *, bias: bool, dtype, rngs: nnx.Rngs) -> nnx.Linear:
  """(din -> dout) dense layer; kernel (din, dout) with logical axes `names`, bias with axes names[1:]."""
  return nnx.Linear(
    din,
    dout,
    use_bias=bias,
    dtype=dtype,
    param_dtype=dtype,
    kernel_init=nnx.initializers.normal(INIT_STD),
    bias_init=nnx.initializers.normal(INIT_STD),
    kernel_metadata=axes(*names),
    bias_metadata=axes(names[1]),
    rngs=rngs,
  )


class RMSNorm(nnx.Module):
  """y = weight * cast(x * rsqrt(mean(x^2) + eps), x.dtype), the statistics in fp32."""

  def __init__(self, dim: int, eps: float, *, dtype, rngs: nnx.Rngs | None = None):
    del rngs
    self.eps = eps
    self.scale = nnx.Param(jnp.ones((dim,), dtype), **axes("norm"))

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return self.scale[...] * y.astype(x.dtype)


class SwiGLU(nnx.Module):
  """down(silu(gate(x)) * up(x)); the vision tower uses biases, the text decoder does not."""

  def __init__(self, dim: int, hidden: int, *, bias: bool, embed_axis: str, mlp_axis: str, dtype, rngs: nnx.Rngs):
    self.gate_proj = linear(dim, hidden, (embed_axis, mlp_axis), bias=bias, dtype=dtype, rngs=rngs)
    self.up_proj = linear(dim, hidden, (embed_axis, mlp_axis), bias=bias, dtype=dtype, rngs=rngs)
    self.down_proj = linear(hidden, dim, (mlp_axis, embed_axis), bias=bias, dtype=dtype, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


def rotate_half(x: jax.Array) -> jax.Array:
  x1, x2 = jnp.split(x, 2, axis=-1)
  return jnp.concatenate([-x2, x1], axis=-1)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """x (..., S, H, D) rotated by cos/sin (..., S, D), computed in the dtype of cos/sin."""
  xc = x.astype(cos.dtype)
  return (xc * cos[..., None, :] + rotate_half(xc) * sin[..., None, :]).astype(x.dtype)
