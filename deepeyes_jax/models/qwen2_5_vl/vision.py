"""The Qwen2.5-VL vision tower: patch embed, 2D RoPE, window/full attention blocks, patch merger.

Input: `pixel_values` (N, C*T*P*P) = (N, 1176) rows for every image of a batch, concatenated; each image's rows are
in block-major order over 2x2 merge units (see `deepeyes_jax.processing.image`). Output: (N/4, out_hidden) merged
tokens in the same order, ready to replace the `<|image_pad|>` embeddings.

Attention layout. Most blocks attend inside 112 px windows (8x8 patches = 4x4 merged units); the blocks listed in
`fullatt_block_indexes` attend over a whole image (frame). As in the reference, the tokens are first permuted so
that every window is contiguous (`window_index` permutes merge units), run through all blocks and the merger in
that order, and un-permuted AFTER the merger. Windows and images become segment ids for the attention function,
so images never attend to each other and a padded tail (segment 0) is ignored.

Everything that depends on the grid sizes (`VisionPlan`) is computed on the host with numpy, so the jitted tower
sees only arrays of a fixed (bucketed) length.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
from flax import nnx

from deepeyes_jax.kernels.attention import attention, resolve_impl, segment_local_attention
from deepeyes_jax.models.qwen2_5_vl.config import VisionConfig
from deepeyes_jax.models.qwen2_5_vl.layers import INIT_STD, Linear, RMSNorm, SwiGLU, apply_rope, axes
from deepeyes_jax.models.qwen2_5_vl.rope import vision_cos_sin


# --------------------------------------------------------------------------------------------------------------
# Host-side plan
# --------------------------------------------------------------------------------------------------------------
@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class VisionPlan:
  """Grid-dependent index arrays for one call of the tower, in the window-permuted token order.

  Attributes (N = padded patch count, U = N / merge_unit):
    window_index: (U,) int32, merge unit u of the permuted order is unit window_index[u] of the input.
    reverse_index: (U,) int32, argsort(window_index): un-permutes the merger output.
    pos_hw: (N, 2) int32 (row, col) patch coordinates inside their image, permuted.
    window_segments: (N,) int32 window id + 1 (0 = padding), permuted.
    image_segments: (N,) int32 image/frame id + 1 (0 = padding), permuted.
    window_span, image_span: static ints, the longest window / frame in patches rounded up to a power of two
      (>= 64, so that they take few values): the XLA attention path then only computes the blocks a segment
      can reach (`kernels.attention.segment_local_attention`). 0 = unknown (full attention).
  """

  window_index: jax.Array
  reverse_index: jax.Array
  pos_hw: jax.Array
  window_segments: jax.Array
  image_segments: jax.Array
  window_span: int = dataclasses.field(default=0, metadata=dict(static=True))
  image_span: int = dataclasses.field(default=0, metadata=dict(static=True))


def patch_positions(t: int, h: int, w: int, merge: int) -> np.ndarray:
  """(t*h*w, 2) (row, col) of each patch in block-major order over merge x merge units, repeated per frame."""
  hh, ww = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
  block = (h // merge, merge, w // merge, merge)
  hh = hh.reshape(block).transpose(0, 2, 1, 3).reshape(-1)
  ww = ww.reshape(block).transpose(0, 2, 1, 3).reshape(-1)
  return np.tile(np.stack([hh, ww], -1), (t, 1))


def window_partition(t: int, h: int, w: int, merge: int, window_units: int) -> tuple[np.ndarray, np.ndarray]:
  """Tiles each frame's merged (h/m, w/m) grid row-major into window_units^2 windows (edge windows partial).

  Returns (order, window_id): `order` lists the frame's merge units window by window (indices into the frame's
  row-major merged grid, frames offset by their size), `window_id` is the window of each listed unit.
  """
  gh, gw = h // merge, w // merge
  nwh, nww = -(-gh // window_units), -(-gw // window_units)
  rows, cols = np.meshgrid(np.arange(gh), np.arange(gw), indexing="ij")
  win = (rows // window_units) * nww + cols // window_units  # window of each unit, row-major windows
  unit = rows * gw + cols
  # Stable sort by window keeps the row-major order of units inside each window, as the reference does.
  order = np.argsort(win.reshape(-1), kind="stable")
  frame_order = unit.reshape(-1)[order]
  frame_win = win.reshape(-1)[order]
  order = np.concatenate([frame_order + f * gh * gw for f in range(t)])
  window_id = np.concatenate([frame_win + f * nwh * nww for f in range(t)])
  return order, window_id


def make_vision_plan(grid_thw: np.ndarray, config: VisionConfig, pad_to: int | None = None) -> VisionPlan:
  """Builds the index arrays for images with patch grids `grid_thw` (num_images, 3).

  `pad_to` pads the patch count to a fixed bucket (multiple of the merge unit); padded patches are segment 0.
  """
  grid_thw = np.asarray(grid_thw, np.int64).reshape(-1, 3)
  m, mu = config.spatial_merge_size, config.merge_unit
  window_units = config.window_size // config.spatial_merge_size // config.patch_size
  index, wseg, iseg, pos = [], [], [], []
  unit_offset = win_offset = frame_offset = 0
  for t, h, w in grid_thw.tolist():
    if h % m or w % m or t < 1:
      raise ValueError(f"image grid {(t, h, w)}: h and w must be multiples of the merge size {m}")
    order, window_id = window_partition(t, h, w, m, window_units)
    index.append(order + unit_offset)
    wseg.append(np.repeat(window_id + win_offset, mu))
    iseg.append(np.repeat(order // ((h // m) * (w // m)) + frame_offset, mu))
    pos.append(patch_positions(t, h, w, m).reshape(-1, mu, 2)[order].reshape(-1, 2))
    unit_offset += len(order)
    win_offset += int(window_id.max()) + 1
    frame_offset += t
  n = unit_offset * mu
  pad_to = n if pad_to is None else pad_to
  if pad_to < n or pad_to % mu:
    raise ValueError(f"pad_to={pad_to} must be a multiple of {mu} and >= the {n} patches of grids {grid_thw.tolist()}")
  pad_units = (pad_to - n) // mu
  window_index = np.concatenate(index + [np.arange(unit_offset, unit_offset + pad_units)]).astype(np.int32)
  zeros = np.zeros(pad_to - n, np.int64)
  longest_window = max(int(np.bincount(w).max()) for w in wseg)
  longest_frame = max(int(h * w) for _, h, w in grid_thw.tolist())
  return VisionPlan(
    window_index=window_index,
    reverse_index=np.argsort(window_index).astype(np.int32),
    pos_hw=np.concatenate(pos + [np.zeros((pad_to - n, 2), np.int64)]).astype(np.int32),
    window_segments=(np.concatenate(wseg + [zeros - 1]) + 1).astype(np.int32),
    image_segments=(np.concatenate(iseg + [zeros - 1]) + 1).astype(np.int32),
    window_span=_span_bucket(longest_window),
    image_span=_span_bucket(longest_frame),
  )


def _span_bucket(n: int) -> int:
  return 1 << max(6, (n - 1).bit_length())


# --------------------------------------------------------------------------------------------------------------
# Modules
# --------------------------------------------------------------------------------------------------------------
class VisionAttention(nnx.Module):
  attention_impl = "xla"  # see Qwen25VL.set_attention_impl

  def __init__(self, cfg: VisionConfig, *, dtype, rngs: nnx.Rngs):
    d = cfg.hidden_size
    self.num_heads = cfg.num_heads
    # Fused qkv kept fused as (in, 3, out) so the head dimension can be sharded without splitting q/k/v apart.
    self.qkv = nnx.Einsum(
      "nd,dce->nce",
      (d, 3, d),
      (3, d),
      dtype=dtype,
      param_dtype=dtype,
      kernel_init=nnx.initializers.normal(INIT_STD),
      bias_init=nnx.initializers.normal(INIT_STD),
      kernel_metadata=axes("vision_embed", "qkv", "vision_heads"),
      bias_metadata=axes("qkv", "vision_heads"),
      rngs=rngs,
    )
    self.proj = Linear(d, d, ("vision_heads", "vision_embed"), bias=True, dtype=dtype, rngs=rngs)

  def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, segment_ids: jax.Array, span: int = 0) -> jax.Array:
    """x (N, D) -> (N, D); attention only within equal non-zero segment ids (contiguous runs <= `span` long)."""
    n, d = x.shape
    qkv = self.qkv(x).reshape(n, 3, self.num_heads, d // self.num_heads)
    q, k, v = qkv[:, 0], qkv[:, 1], qkv[:, 2]
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    impl = resolve_impl(self.attention_impl)
    if impl == "xla" and span:
      out = segment_local_attention(q, k, v, segment_ids, span)
    else:
      seg = segment_ids[None]
      out = attention(q[None], k[None], v[None], q_segment_ids=seg, kv_segment_ids=seg, impl=impl)[0]
    return self.proj(out.reshape(n, d))


class VisionBlock(nnx.Module):
  def __init__(self, cfg: VisionConfig, *, dtype, rngs: nnx.Rngs):
    self.norm1 = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype=dtype)
    self.norm2 = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype=dtype)
    self.attn = VisionAttention(cfg, dtype=dtype, rngs=rngs)
    self.mlp = SwiGLU(
      cfg.hidden_size,
      cfg.intermediate_size,
      bias=True,
      embed_axis="vision_embed",
      mlp_axis="vision_mlp",
      dtype=dtype,
      rngs=rngs,
    )

  def __call__(self, x, cos, sin, segment_ids, span: int = 0):
    x = x + self.attn(self.norm1(x), cos, sin, segment_ids, span)
    return x + self.mlp(self.norm2(x))


class PatchMerger(nnx.Module):
  """RMSNorm per patch -> 4 consecutive patches as one vector -> Linear -> exact GELU -> Linear."""

  def __init__(self, cfg: VisionConfig, *, dtype, rngs: nnx.Rngs):
    c = cfg.hidden_size
    self.unit = cfg.merge_unit
    self.ln_q = RMSNorm(c, 1e-6, dtype=dtype)
    self.fc1 = Linear(c * self.unit, c * self.unit, ("merger_in", "vision_mlp"), bias=True, dtype=dtype, rngs=rngs)
    self.fc2 = Linear(c * self.unit, cfg.out_hidden_size, ("vision_mlp", "embed"), bias=True, dtype=dtype, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = self.ln_q(x).reshape(-1, x.shape[-1] * self.unit)
    return self.fc2(jax.nn.gelu(self.fc1(x), approximate=False))


class VisionTower(nnx.Module):
  def __init__(self, cfg: VisionConfig, *, dtype, rngs: nnx.Rngs):
    self.config = cfg
    # Conv3d with kernel == stride over (C, T, P, P) is a matmul with the weight flattened in that order.
    self.patch_embed = Linear(
      cfg.patch_dim, cfg.hidden_size, ("patch", "vision_embed"), bias=False, dtype=dtype, rngs=rngs
    )
    self.blocks = nnx.List([VisionBlock(cfg, dtype=dtype, rngs=rngs) for _ in range(cfg.depth)])
    self.merger = PatchMerger(cfg, dtype=dtype, rngs=rngs)

  def __call__(self, pixel_values: jax.Array, plan: VisionPlan) -> jax.Array:
    """pixel_values (N, 1176) -> merged image tokens (N/4, out_hidden), input order restored."""
    cfg = self.config
    n = pixel_values.shape[0]
    dtype = self.patch_embed.weight.dtype
    x = self.patch_embed(pixel_values.astype(dtype))
    x = x.reshape(n // cfg.merge_unit, cfg.merge_unit, -1)[plan.window_index].reshape(n, -1)
    cos, sin = vision_cos_sin(plan.pos_hw, cfg.head_dim, cfg.rope_theta)
    full = set(cfg.fullatt_block_indexes)
    for i, block in enumerate(self.blocks):
      if i in full:
        x = block(x, cos, sin, plan.image_segments, plan.image_span)
      else:
        x = block(x, cos, sin, plan.window_segments, plan.window_span)
    return self.merger(x)[plan.reverse_index]
