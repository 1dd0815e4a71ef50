"""The CPU decode forms of the dense product and of the attention logits: same numbers as the plain forms.

`matmul_out_in` computes (w @ x.T).T for few rows on CPU and `xla_attention` computes key-major logits for a decode
step (both behind an optimization barrier, both only for speed); here both branches are checked against float64
numpy, with gradients, and the branch choice in the compiled program: the result shape of its dot (the barrier is
what keeps XLA from folding the transpose back into a (M, dout) dot).
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deepeyes_jax.kernels import attention as attn
from deepeyes_jax.kernels import reference
from deepeyes_jax.models.qwen2_5_vl import layers


def _compiled_dots(fn, *args) -> list[str]:
  """Result shapes of the dots XLA compiled, e.g. ['f32[24,8]'] (the barrier itself is gone by then)."""
  hlo = fn.lower(*args).compile().as_text()
  return re.findall(r"= (f32\[[\d,]*\])\{[\d,]*\} dot\(", hlo)


def _rel(a, b) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.mark.parametrize("lead", [(1,), (8,), (2, 3, 5), (layers.SMALL_M_ROWS + 1,)])
def test_matmul_out_in_equals_reference_with_gradients(lead):
  rng = np.random.default_rng(0)
  x = rng.standard_normal((*lead, 48)).astype(np.float32)
  w = rng.standard_normal((40, 48)).astype(np.float32)
  ct = rng.standard_normal((*lead, 40)).astype(np.float32)
  y, vjp = jax.vjp(jax.jit(layers.matmul_out_in), jnp.asarray(x), jnp.asarray(w))
  dx, dw = vjp(jnp.asarray(ct))
  x64, w64, ct64 = (a.astype(np.float64) for a in (x, w, ct))
  assert y.shape == (*lead, 40)
  assert _rel(y, x64 @ w64.T) <= 1e-6
  assert _rel(dx, ct64 @ w64) <= 1e-6
  assert _rel(dw, ct64.reshape(-1, 40).T @ x64.reshape(-1, 48)) <= 1e-6


@pytest.mark.parametrize("rows,transposed", [(8, True), (layers.SMALL_M_ROWS, True), (layers.SMALL_M_ROWS + 1, False)])
def test_matmul_out_in_takes_the_transposed_form_for_few_rows_on_cpu(rows, transposed):
  x = jnp.zeros((rows, 16), jnp.float32)
  w = jnp.zeros((24, 16), jnp.float32)
  dots = _compiled_dots(jax.jit(layers.matmul_out_in), x, w)
  assert dots == [f"f32[24,{rows}]" if transposed else f"f32[{rows},24]"]  # (dout, M) or (M, dout)


def test_linear_uses_the_same_product():
  from flax import nnx

  lin = layers.Linear(6, 5, (None, None), bias=True, dtype=jnp.float32, rngs=nnx.Rngs(0))
  x = jnp.asarray(np.random.default_rng(1).standard_normal((3, 6)), jnp.float32)
  w, b = np.asarray(lin.weight[...], np.float64), np.asarray(lin.bias[...], np.float64)
  assert _rel(lin(x), np.asarray(x, np.float64) @ w.T + b) <= 1e-6


def _attention_reference(q, k, v, visible):
  """float64 GQA: q (B, T, H, D), k/v (B, S, K, D), visible (B, T, S) bool."""
  b, t, h, d = q.shape
  g = h // k.shape[2]
  k, v = np.repeat(k, g, axis=2), np.repeat(v, g, axis=2)
  logits = np.einsum("bthd,bshd->bhts", q, k) / np.sqrt(d)
  logits = np.where(visible[:, None], logits, -np.inf)
  p = np.exp(logits - logits.max(-1, keepdims=True))
  return np.einsum("bhts,bshd->bthd", p / p.sum(-1, keepdims=True), v)


@pytest.mark.parametrize("t,h,kh", [(1, 8, 2), (1, 16, 2), (2, 8, 2), (1, 32, 2)])
def test_xla_attention_decode_form_equals_reference(t, h, kh, monkeypatch):
  """g * t <= 8 takes the key-major logits on CPU (the first three cases); 16 query rows per KV head do not."""
  b, s, d = 3, 40, 16
  rng = np.random.default_rng(2)
  q = rng.standard_normal((b, t, h, d))
  k, v = rng.standard_normal((2, b, s, kh, d))
  lengths = np.array([40, 17, 1])
  kv_pos = np.broadcast_to(np.arange(s), (b, s)).astype(np.int32)
  q_pos = (lengths[:, None] - t + np.arange(t)[None]).clip(0).astype(np.int32)
  kv_seg = (kv_pos < lengths[:, None]).astype(np.int32)
  meta = dict(
    q_segment_ids=jnp.ones((b, t), jnp.int32),
    kv_segment_ids=jnp.asarray(kv_seg),
    q_positions=jnp.asarray(q_pos),
    kv_positions=jnp.asarray(kv_pos),
    causal=True,
  )
  f32 = lambda a: jnp.asarray(a, jnp.float32)
  fn = jax.jit(lambda q, k, v: attn.xla_attention(q, k, v, **meta))
  out = fn(f32(q), f32(k), f32(v))
  visible = (kv_seg[:, None, :] == 1) & (kv_pos[:, None, :] <= q_pos[:, :, None])
  assert _rel(out, _attention_reference(q, k, v, visible)) <= 1e-5
  rows = h // kh * t  # query rows per KV head
  logits_shape = f"f32[{b},{kh},{s},{rows}]" if rows <= reference._FEW_QUERIES else f"f32[{b},{kh},{rows},{s}]"
  assert logits_shape in _compiled_dots(fn, f32(q), f32(k), f32(v))
  # Gradients: the same as the plain form's (forced by lowering the bound to 0).
  loss = lambda q, k, v: (attn.xla_attention(q, k, v, **meta) ** 2).sum()
  args = (f32(q), f32(k), f32(v))
  grads = jax.jit(jax.grad(loss, (0, 1, 2)))(*args)
  monkeypatch.setattr(reference, "_FEW_QUERIES", 0)
  grads_plain = jax.jit(jax.grad(loss, (0, 1, 2)))(*args)
  for g, r in zip(grads, grads_plain):
    assert _rel(g, r) <= 1e-5
