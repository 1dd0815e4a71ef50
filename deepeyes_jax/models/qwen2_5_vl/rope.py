"""Rotary position embeddings: multimodal 3D RoPE for the decoder, 2D RoPE for the vision tower.

M-RoPE (decoder). Each token has three position ids (t, h, w). Text tokens advance all three by one. The
frequency slots of a head are split into CONTIGUOUS sections `mrope_section` = [16, 24, 24] for the real
models: slots [0, 16) rotate with t, [16, 40) with h, [40, 64) with w (Qwen3-VL interleaves them; Qwen2.5-VL
does not). An image block starting at position `cur` gets t = cur, h = cur + row, w = cur + col over its merged
grid; the next token starts at cur + max(h/2, w/2), not cur + token count. Positions count real tokens only
(padding is skipped), so `rope_delta = max_position + 1 - real_length` and a decode step at cache length L has
position L + delta on all three axes.

The position ids are computed on the host with numpy: they depend on token values and image grids, which are
data-dependent control flow that has no place inside a jitted function.
"""

from __future__ import annotations

from typing import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np


# --------------------------------------------------------------------------------------------------------------
# Decoder M-RoPE
# --------------------------------------------------------------------------------------------------------------
def mrope_cos_sin(
  position_ids: jax.Array, head_dim: int, theta: float, sections: Sequence[int], dtype
) -> tuple[jax.Array, jax.Array]:
  """cos/sin for position_ids (3, B, S) -> two (B, S, head_dim) arrays, computed in fp32 then cast to dtype."""
  inv_freq = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim))  # (head_dim/2,)
  if sum(sections) != head_dim // 2:
    raise ValueError(f"mrope_section {list(sections)} must sum to head_dim/2 = {head_dim // 2}")
  freqs_all = position_ids.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)  # (3, B, S, head_dim/2)
  # Contiguous sections: slots [0, s0) rotate with t, [s0, s0+s1) with h, the rest with w.
  bounds = np.cumsum([0, *sections])
  freqs = jnp.concatenate([freqs_all[a, ..., bounds[a] : bounds[a + 1]] for a in range(3)], axis=-1)
  emb = jnp.concatenate([freqs, freqs], axis=-1)
  return jnp.cos(emb).astype(dtype), jnp.sin(emb).astype(dtype)


def positions_for_tokens(
  ids: np.ndarray,
  grids: Iterator[Sequence[int]],
  image_token_id: int,
  spatial_merge_size: int,
  start: int = 0,
  source: str = "",
) -> tuple[np.ndarray, int]:
  """M-RoPE positions (3, n) for one row's real tokens `ids` (n,), continuing from position `start`.

  `grids` yields the (t, h, w) patch grid of each image in the order its placeholder tokens appear. Returns
  the positions and the next free position. Used for whole prompts and for chunks appended to a cache.
  """
  n = len(ids)
  out = np.empty((3, n), np.int64)
  cur = start
  i = 0
  m = spatial_merge_size
  while i < n:
    if ids[i] != image_token_id:
      j = i
      while j < n and ids[j] != image_token_id:
        j += 1
      out[:, i:j] = cur + np.arange(j - i)
      cur += j - i
      i = j
      continue
    try:
      t, h, w = (int(x) for x in next(grids))
    except StopIteration:
      raise ValueError(f"{source}more <|image_pad|> tokens than images (grid_thw rows)") from None
    gh, gw = h // m, w // m
    count = t * gh * gw
    if i + count > n or np.any(ids[i : i + count] != image_token_id):
      run = int(np.argmax(np.append(ids[i:] != image_token_id, True)))
      raise ValueError(
        f"{source}image with grid {(t, h, w)} needs {count} consecutive <|image_pad|> tokens, found a run of {run}"
      )
    tt, hh, ww = np.meshgrid(np.arange(t), np.arange(gh), np.arange(gw), indexing="ij")
    out[0, i : i + count] = cur + tt.reshape(-1)  # still images: t == 1, so t position == cur
    out[1, i : i + count] = cur + hh.reshape(-1)
    out[2, i : i + count] = cur + ww.reshape(-1)
    cur += max(gh, gw)
    i += count
  return out, cur


def get_rope_index(
  input_ids: np.ndarray,
  image_grid_thw: np.ndarray | None = None,
  attention_mask: np.ndarray | None = None,
  *,
  image_token_id: int,
  spatial_merge_size: int = 2,
) -> tuple[np.ndarray, np.ndarray]:
  """M-RoPE position ids for a padded batch, as transformers' `get_rope_index` assigns them.

  Args:
    input_ids: (B, S) int token ids (left or right padded).
    image_grid_thw: (num_images, 3) grids of all images, in row-major order of their placeholders.
    attention_mask: (B, S) 1 for real tokens, 0 for padding; None = no padding.
  Returns:
    position_ids (3, B, S) int32 (0 at padding), rope_deltas (B,) int32 = max_position + 1 - real_length.
  """
  input_ids = np.asarray(input_ids)
  b, s = input_ids.shape
  mask = np.ones((b, s), bool) if attention_mask is None else np.asarray(attention_mask).astype(bool)
  grids = iter(np.zeros((0, 3), np.int64) if image_grid_thw is None else np.asarray(image_grid_thw))
  pos = np.zeros((3, b, s), np.int64)
  deltas = np.zeros((b,), np.int64)
  for r in range(b):
    ids = input_ids[r][mask[r]]
    p, _ = positions_for_tokens(ids, grids, image_token_id, spatial_merge_size, source=f"row {r}: ")
    pos[:, r, mask[r]] = p
    deltas[r] = (p.max() + 1 - len(ids)) if len(ids) else 0
  if next(grids, None) is not None:
    raise ValueError("more images (grid_thw rows) than <|image_pad|> blocks in input_ids")
  return pos.astype(np.int32), deltas.astype(np.int32)


# --------------------------------------------------------------------------------------------------------------
# Vision 2D RoPE
# --------------------------------------------------------------------------------------------------------------
def vision_cos_sin(pos_hw: jax.Array, head_dim: int, theta: float) -> tuple[jax.Array, jax.Array]:
  """cos/sin (..., N, head_dim) fp32 for patch positions pos_hw (..., N, 2) = (row, col).

  head_dim/4 frequencies per axis; the angle vector is [h*f | w*f], duplicated to head_dim (rotate_half
  convention). Always fp32: the reference applies vision RoPE in fp32 whatever the model dtype.
  """
  dim = head_dim // 2
  inv_freq = 1.0 / (theta ** (np.arange(0, dim, 2, dtype=np.float32) / dim))  # (head_dim/4,)
  pos = pos_hw.astype(jnp.float32)
  fh = pos[..., 0:1] * inv_freq
  fw = pos[..., 1:2] * inv_freq
  emb = jnp.concatenate([fh, fw, fh, fw], axis=-1)
  return jnp.cos(emb), jnp.sin(emb)
