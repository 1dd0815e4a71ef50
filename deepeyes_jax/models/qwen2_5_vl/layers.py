"""Building blocks shared by the vision tower and the text decoder.

Dense layers are our `Linear` (weight stored (out, in), torch's layout; see its docstring for why not `nnx.Linear`),
the vision tower's fused qkv an `nnx.Einsum`, all with logical-axis metadata. RMSNorm is our own because the
reference normalises in fp32, casts back to the input dtype and only then multiplies by the weight
(`nnx.RMSNorm` multiplies before the cast, which drifts in bf16).

Precision: every module has a compute `dtype` and a `param_dtype` (default: the compute dtype). Parameters are stored
in `param_dtype` and cast to `dtype` where they are used, so fp32 master weights with bf16 compute give exactly the
bf16 model's activations while an AdamW step of lr 1e-6 still changes the stored weights (bf16 weights of magnitude
~0.02 have a spacing of ~1e-4: such a step rounds back to the same bf16 value).

Layer stacks run through `run_stack`: per-layer rematerialisation (`REMAT_POLICIES`) and, optionally, one `lax.scan`
over the stacked layer parameters, so compile time does not grow with depth.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from deepeyes_jax.kernels import platform
from deepeyes_jax.parallel import sharding as shd

INIT_STD = 0.02


def axes(*names: str | None) -> dict:
  """Variable metadata carrying logical axis names; sharding is applied later through the rules table."""
  return {"out_sharding": tuple(names), "eager_sharding": False}


# Up to this many rows, a CPU matmul against an (out, in) weight is computed with the rows as the minor axis of its
# result (see `matmul_out_in`).
SMALL_M_ROWS = 512


def matmul_out_in(x: jax.Array, w: jax.Array) -> jax.Array:
  """x (..., din) @ w.T for w (dout, din): (..., dout).

  On CPU, for few rows (a decode step: M = batch; M <= SMALL_M_ROWS), the product is computed as (w @ x.T).T: XLA's
  CPU matmul at small M is much faster producing a (dout, M) result than a (M, dout) one (the 8-layer decoder stack of
  the sampling benchmark, fp32 on 2 cores, medians of interleaved runs: M = 8 ~26 against 31-52 ms, M = 32 ~55
  against 136-158 ms, M = 128 184 against 373 ms, M = 512 990 against 1055 ms, but M = 2048 3.5 against 3.0 s, hence
  the bound; docs/benchmarks.md). `optimization_barrier` keeps XLA's algebraic simplifier from folding the transpose
  back into the dot, which restores the slow form. Other platforms (`platform.target_platform()`: the devices the
  program is compiled for), and more rows, take the plain product. Same
  values up to fp32 rounding (a different summation order).
  """
  k = x.ndim - 1
  if platform.target_platform() == "cpu" and math.prod(x.shape[:-1]) <= SMALL_M_ROWS:
    y_t = jax.lax.dot_general(w, x, (((1,), (k,)), ((), ())))  # (dout, ...)
    return jnp.moveaxis(jax.lax.optimization_barrier(y_t), 0, -1)
  return jax.lax.dot_general(x, w, (((k,), (1,)), ((), ())))


class Linear(nnx.Module):
  """y = x @ weight.T + bias: weight (dout, din) and bias (dout,), the layout of torch's `nn.Linear` and of the
  checkpoint's `*.weight` tensors. `names` are the logical axes of (din, dout); the weight carries them reversed,
  the bias names[1].

  Why not `nnx.Linear` (kernel (din, dout)): a decode step multiplies a few rows (M = batch) by every matrix, so it
  streams the weights, and XLA:CPU streams a matrix contracted over its contiguous last axis much faster than over
  its first: at M = 8 the 1024 x 32000 output projection takes 11 ms in (out, in) against 20 ms in (in, out), and the
  eight decoder layers of the sampling benchmark 35 ms against 50 ms (2-core CPU, fp32; docs/model.md). On GPU the
  operand layout is a cuBLAS flag. The checkpoint also loads without a transpose. The parameter is `weight`, not
  `kernel`, so a checkpoint of the old (din, dout) layout fails to restore instead of loading square matrices
  transposed. The product itself is `matmul_out_in` (for few rows on CPU, a (dout, M) result: faster again).
  """

  def __init__(
    self,
    din: int,
    dout: int,
    names: Sequence[str | None],
    *,
    bias: bool,
    dtype,
    rngs: nnx.Rngs,
    param_dtype=None,
  ):
    init = nnx.initializers.normal(INIT_STD)
    pdtype = param_dtype or dtype
    self.dtype = dtype
    self.weight = nnx.Param(init(rngs.params(), (dout, din), pdtype), **axes(names[1], names[0]))
    self.bias = nnx.Param(init(rngs.params(), (dout,), pdtype), **axes(names[1])) if bias else nnx.data(None)

  def __call__(self, x: jax.Array) -> jax.Array:
    """x (..., din) -> (..., dout) in the compute dtype."""
    w = self.weight[...].astype(self.dtype)
    y = matmul_out_in(x.astype(w.dtype), w)
    return y if self.bias is None else y + self.bias[...].astype(self.dtype)


class RMSNorm(nnx.Module):
  """y = weight * cast(x * rsqrt(mean(x^2) + eps), x.dtype), the statistics in fp32."""

  def __init__(self, dim: int, eps: float, *, dtype, rngs: nnx.Rngs | None = None, param_dtype=None):
    del rngs
    self.eps = eps
    self.scale = nnx.Param(jnp.ones((dim,), param_dtype or dtype), **axes("norm"))

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return self.scale[...].astype(x.dtype) * y.astype(x.dtype)


class SwiGLU(nnx.Module):
  """down(silu(gate(x)) * up(x)); the vision tower uses biases, the text decoder does not."""

  def __init__(
    self,
    dim: int,
    hidden: int,
    *,
    bias: bool,
    embed_axis: str,
    mlp_axis: str,
    dtype,
    rngs: nnx.Rngs,
    param_dtype=None,
    act_axes: tuple[str | None, ...] = ("batch", None, "act_mlp"),
  ):
    kw = dict(bias=bias, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.gate_proj = Linear(dim, hidden, (embed_axis, mlp_axis), **kw)
    self.up_proj = Linear(dim, hidden, (embed_axis, mlp_axis), **kw)
    self.down_proj = Linear(hidden, dim, (mlp_axis, embed_axis), **kw)
    self.act_axes = act_axes  # logical axes of the (..., hidden) intermediate: columns over tensor, rows kept

  def __call__(self, x: jax.Array) -> jax.Array:
    h = jax.nn.silu(self.gate_proj(x)) * self.up_proj(x)
    return self.down_proj(shd.constrain(h, self.act_axes[-h.ndim :]))


# Per-layer rematerialisation: what a layer keeps for its backward pass. "none" keeps everything (fastest, most
# memory), "full" only the layer's input (the layer is recomputed in the backward pass), "dots" the outputs of its
# matmuls without a batch dimension (the projections; attention and elementwise ops are recomputed).
REMAT_POLICIES: dict[str, Callable | None] = {
  "none": None,
  "full": jax.checkpoint_policies.nothing_saveable,
  "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def check_remat(policy: str) -> str:
  if policy not in REMAT_POLICIES:
    raise ValueError(f"remat policy {policy!r}: must be one of {', '.join(REMAT_POLICIES)}")
  return policy


def run_stack(modules: Sequence[nnx.Module], fn: Callable, x, *, remat: str = "none", scan: bool = False):
  """x -> fn(modules[n-1], ... fn(modules[0], x)): a stack of identically structured layers.

  `remat` (see `REMAT_POLICIES`) wraps each layer in `jax.checkpoint`. `scan` stacks the layers' parameters (a
  copy of them, (n, ...) per parameter) and runs one `lax.scan`: the layer is traced and compiled once whatever
  the depth (a 64-layer model compiles as fast as a 2-layer one); gradients flow back through the stacking to
  each layer's own parameters, so the parameter layout (and the checkpoint) is the same either way.
  """
  if not modules:
    return x
  policy = REMAT_POLICIES[check_remat(remat)]
  graphdef = nnx.graphdef(modules[0])

  def body(state, carry):
    return fn(nnx.merge(graphdef, state), carry)

  if policy is not None:
    body = jax.checkpoint(body, policy=policy, prevent_cse=not scan)
  states = [nnx.state(m) for m in modules]
  if not scan or len(modules) == 1:
    for state in states:
      x = body(state, x)
    return x
  stacked = jax.tree.map(lambda *a: jnp.stack(a), *states)
  x, _ = jax.lax.scan(lambda carry, state: (body(state, carry), None), x, stacked)
  return x


def rotate_half(x: jax.Array) -> jax.Array:
  x1, x2 = jnp.split(x, 2, axis=-1)
  return jnp.concatenate([-x2, x1], axis=-1)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """x (..., S, H, D) rotated by cos/sin (..., S, D), computed in the dtype of cos/sin."""
  xc = x.astype(cos.dtype)
  return (xc * cos[..., None, :] + rotate_half(xc) * sin[..., None, :]).astype(x.dtype)
