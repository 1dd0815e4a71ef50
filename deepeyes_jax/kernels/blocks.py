"""Block arithmetic shared by the Pallas attention kernels (`pallas_attention` for GPU, `tpu_attention` for TPU):
padding to block multiples and the per-block summaries of segment ids / positions from which a kernel decides which
key blocks a block of rows can see."""

from __future__ import annotations

import jax.numpy as jnp

INT_MAX = 2**31 - 1
INT_MIN = -(2**31)


def round_up(x: int, m: int) -> int:
  return -(-x // m) * m


def pad_axis(x, axis: int, size: int, value=0):
  """x padded with `value` at the end of `axis` to `size` entries."""
  if x.shape[axis] == size:
    return x
  pad = [(0, 0)] * x.ndim
  pad[axis] = (0, size - x.shape[axis])
  return jnp.pad(x, pad, constant_values=value)


def block_summaries(seg, pos, block: int):
  """Per block of (B, N) segment ids / positions (N a multiple of `block`): the min and max non-zero segment and
  the min and max position of the non-padding entries, (B, N // block) int32 each; a block of padding only gets
  (INT_MAX, INT_MIN, INT_MAX, INT_MIN), which no visibility test passes."""
  b, n = seg.shape
  s = seg.reshape(b, n // block, block)
  p = pos.reshape(b, n // block, block)
  live = s != 0
  return tuple(
    x.astype(jnp.int32)
    for x in (
      jnp.min(jnp.where(live, s, INT_MAX), axis=-1),
      jnp.max(jnp.where(live, s, INT_MIN), axis=-1),
      jnp.min(jnp.where(live, p, INT_MAX), axis=-1),
      jnp.max(jnp.where(live, p, INT_MIN), axis=-1),
    )
  )


def dense_ids(q_segment_ids, kv_segment_ids, q_positions, kv_positions, causal: bool, b: int, t: int, s: int):
  """The optional ids of the attention interface as int32 arrays: (qseg (B, T), kseg (B, S), qpos (B, T), kpos
  (B, S)); no segment ids = one segment; positions zeros when not causal (unused)."""
  qseg = jnp.ones((b, t), jnp.int32) if q_segment_ids is None else q_segment_ids.astype(jnp.int32)
  kseg = jnp.ones((b, s), jnp.int32) if kv_segment_ids is None else kv_segment_ids.astype(jnp.int32)
  qpos = q_positions.astype(jnp.int32) if causal else jnp.zeros((b, t), jnp.int32)
  kpos = kv_positions.astype(jnp.int32) if causal else jnp.zeros((b, s), jnp.int32)
  return qseg, kseg, qpos, kpos
