"""The plain `jax.numpy` attention: the specification every kernel is checked against (see `attention`)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from deepeyes_jax.kernels import platform

_FEW_QUERIES = 8  # query rows per KV head (G x T) up to which the CPU logits take the key-major form


def make_mask(q_segment_ids, kv_segment_ids, q_positions, kv_positions, causal: bool, shape) -> jax.Array | None:
  """(B, T, S) bool mask, or None when everything is visible."""
  b, t, s = shape
  mask = None
  if q_segment_ids is not None or kv_segment_ids is not None:
    qs = q_segment_ids if q_segment_ids is not None else jnp.ones((b, t), jnp.int32)
    ks = kv_segment_ids if kv_segment_ids is not None else jnp.ones((b, s), jnp.int32)
    mask = (qs[:, :, None] == ks[:, None, :]) & (ks[:, None, :] != 0)
  if causal:
    if q_positions is None or kv_positions is None:
      raise ValueError("causal attention needs q_positions and kv_positions")
    c = kv_positions[:, None, :] <= q_positions[:, :, None]
    mask = c if mask is None else mask & c
  return mask


def xla_attention(
  q,
  k,
  v,
  *,
  q_segment_ids=None,
  kv_segment_ids=None,
  q_positions=None,
  kv_positions=None,
  causal=False,
  scale=None,
  kv_heads_major=False,
):
  b, t, h, d = q.shape
  kh, s = (k.shape[1], k.shape[2]) if kv_heads_major else (k.shape[2], k.shape[1])
  if h % kh:
    layout = "(B, K, S, D)" if kv_heads_major else "(B, S, K, D)"
    raise ValueError(f"{h} query heads are not a multiple of {kh} KV heads (k {k.shape} read as {layout})")
  g = h // kh
  scale = d**-0.5 if scale is None else scale
  # Heads-major operands, the G query heads of a KV head stacked along the query axis: both products are plain
  # (B * KH) batched matmuls, which XLA's CPU backend runs ~3x faster (forward, packed 1k-token training rows) than
  # the equivalent 5-D einsum; no K/V copies per query head. A heads-major KV cache is used as stored.
  qg = q.reshape(b, t, kh, g, d).transpose(0, 2, 3, 1, 4).reshape(b, kh, g * t, d)
  kt, vt = (k, v) if kv_heads_major else (k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3))  # (B, KH, S, D)
  # Logits and softmax in fp32 whatever the activation dtype (the reference computes softmax in fp32).
  if g * t <= _FEW_QUERIES and platform.target_platform() == "cpu":
    # A decode step (one query per row, G per KV head): XLA:CPU multiplies the cache ~2x faster into a key-major
    # (.., S, G) result; the barrier stops it folding the transpose back (0.37 against 0.66 ms a layer at batch 8,
    # a 320-slot cache; slower from 4 queries per row on). Same values up to rounding.
    logits_t = jnp.einsum("bksd,bkqd->bksq", kt, qg, preferred_element_type=jnp.float32)
    logits = jax.lax.optimization_barrier(logits_t).swapaxes(-1, -2) * scale
  else:
    logits = jnp.einsum("bkqd,bksd->bkqs", qg, kt, preferred_element_type=jnp.float32) * scale
  mask = make_mask(q_segment_ids, kv_segment_ids, q_positions, kv_positions, causal, (b, t, s))
  if mask is not None:
    logits = logits.reshape(b, kh, g, t, s)
    logits = jnp.where(mask[:, None, None], logits, jnp.float32(-1e30)).reshape(b, kh, g * t, s)
  probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
  out = jnp.einsum("bkqs,bksd->bkqd", probs, vt)  # (B, KH, G * T, D)
  return out.reshape(b, kh, g, t, d).transpose(0, 3, 1, 2, 4).reshape(b, t, h, d)
