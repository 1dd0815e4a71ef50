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

Two layouts: all images of a call concatenated, `pixel_values` (N, 1176) with one plan (`make_vision_plan`), or
images kept with the row they belong to, (R, N, 1176) with a plan of (R, ...) arrays (`make_row_plans`). The row
layout is what the trainer and the sampler use on a mesh: rows are sharded over data x fsdp, so each chip runs the
tower on its own rows' images only (in the concatenated layout every chip would run it on every image).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from deepeyes_jax.kernels.attention import attention, resolve_impl, segment_local_attention
from deepeyes_jax.models.qwen2_5_vl.config import VisionConfig
from deepeyes_jax.models.qwen2_5_vl.layers import INIT_STD, Linear, RMSNorm, SwiGLU, apply_rope, axes, run_stack
from deepeyes_jax.models.qwen2_5_vl.rope import vision_cos_sin
from deepeyes_jax.parallel.sharding import constrain

HIDDEN = ("batch", "act_length", "act_embed")  # (R, N, D) patches: rows over data x fsdp, patches over tensor
HEADS = ("batch", None, "act_heads", None)  # (R, N, H, head_dim)


# --------------------------------------------------------------------------------------------------------------
# Host-side plan
# --------------------------------------------------------------------------------------------------------------
@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class VisionPlan:
  """Grid-dependent index arrays for one call of the tower, in the window-permuted token order.

  Attributes (N = padded patch count, U = N / merge_unit; in the row layout every array has a leading R):
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
  if not len(grid_thw):  # no image (a row of the row layout without one): all padding
    n = pad_to or 0
    if n % mu:
      raise ValueError(f"pad_to={n} must be a multiple of {mu}")
    zeros = np.zeros(n, np.int32)
    units = np.arange(n // mu, dtype=np.int32)
    return VisionPlan(units, units, np.zeros((n, 2), np.int32), zeros, zeros)
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


def make_row_plans(row_grids, config: VisionConfig, pad_to: int) -> VisionPlan:
  """The row layout's plan: `make_vision_plan` of each row's images (`row_grids[r]`: a list of (t, h, w), possibly
  empty), each padded to `pad_to` patches, stacked to (R, ...) arrays; the static spans are the rows' maxima."""
  plans = [make_vision_plan(np.asarray(g, np.int64).reshape(-1, 3), config, pad_to=pad_to) for g in row_grids]
  if not plans:
    raise ValueError("make_row_plans: no rows")
  arrays = {
    f.name: np.stack([getattr(p, f.name) for p in plans])
    for f in dataclasses.fields(VisionPlan)
    if not f.metadata.get("static")
  }
  return VisionPlan(
    **arrays,
    window_span=max(p.window_span for p in plans),
    image_span=max(p.image_span for p in plans),
  )


def row_patches(pixel_values_per_row, n_patches: int, patch_dim: int) -> np.ndarray:
  """(R, n_patches, patch_dim) float32: each row's images' patches (a list of (n_k, patch_dim) arrays) concatenated
  and zero-padded, the pixel values of the row layout."""
  out = np.zeros((len(pixel_values_per_row), n_patches, patch_dim), np.float32)
  for r, pvs in enumerate(pixel_values_per_row):
    if pvs:
      flat = np.concatenate([np.asarray(p, np.float32) for p in pvs])
      out[r, : len(flat)] = flat
  return out


def _span_bucket(n: int) -> int:
  return 1 << max(6, (n - 1).bit_length())


# --------------------------------------------------------------------------------------------------------------
# Modules
# --------------------------------------------------------------------------------------------------------------
class VisionAttention(nnx.Module):
  attention_impl = "xla"  # see Qwen25VL.set_attention_impl

  def __init__(self, cfg: VisionConfig, *, dtype, rngs: nnx.Rngs, param_dtype=None):
    d = cfg.hidden_size
    self.num_heads = cfg.num_heads
    # Fused qkv kept fused as (in, 3, out) so the head dimension can be sharded without splitting q/k/v apart.
    self.qkv = nnx.Einsum(
      "nd,dce->nce",
      (d, 3, d),
      (3, d),
      dtype=dtype,
      param_dtype=param_dtype or dtype,
      kernel_init=nnx.initializers.normal(INIT_STD),
      bias_init=nnx.initializers.normal(INIT_STD),
      kernel_metadata=axes("vision_embed", "qkv", "vision_heads"),
      bias_metadata=axes("qkv", "vision_heads"),
      rngs=rngs,
    )
    self.proj = Linear(
      d, d, ("vision_heads", "vision_embed"), bias=True, dtype=dtype, param_dtype=param_dtype, rngs=rngs
    )

  def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, segment_ids: jax.Array, span: int = 0) -> jax.Array:
    """x (R, N, D) -> (R, N, D); attention only within equal non-zero segment ids (contiguous runs <= `span` long)
    of the same row."""
    r, n, d = x.shape
    # The fused projection with the rows kept as a batch axis (flattening them into the einsum's "n" lost their
    # sharding: XLA gathered every row's patches to each chip). Parameters as the `nnx.Einsum` stores them.
    dtype = self.qkv.dtype
    w, b = self.qkv.kernel[...].astype(dtype), self.qkv.bias[...].astype(dtype)
    qkv = (jnp.einsum("rnd,dce->rnce", x.astype(dtype), w) + b).reshape(r, n, 3, self.num_heads, d // self.num_heads)
    q, k, v = (constrain(qkv[:, :, i], HEADS) for i in range(3))
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    impl = resolve_impl(self.attention_impl)
    if impl == "xla" and span:
      out = jax.vmap(lambda *a: segment_local_attention(*a, span))(q, k, v, segment_ids)
    else:
      out = attention(q, k, v, q_segment_ids=segment_ids, kv_segment_ids=segment_ids, impl=impl)
    return self.proj(constrain(out, HEADS).reshape(r, n, d))


class VisionBlock(nnx.Module):
  def __init__(self, cfg: VisionConfig, *, dtype, rngs: nnx.Rngs, param_dtype=None):
    kw = dict(dtype=dtype, param_dtype=param_dtype)
    self.norm1 = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, **kw)
    self.norm2 = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, **kw)
    self.attn = VisionAttention(cfg, rngs=rngs, **kw)
    self.mlp = SwiGLU(
      cfg.hidden_size,
      cfg.intermediate_size,
      bias=True,
      embed_axis="vision_embed",
      mlp_axis="vision_mlp",
      rngs=rngs,
      **kw,
    )

  def __call__(self, x, cos, sin, segment_ids, span: int = 0):
    x = constrain(x, HIDDEN)
    x = x + self.attn(self.norm1(x), cos, sin, segment_ids, span)
    return constrain(x + self.mlp(self.norm2(x)), HIDDEN)


class PatchMerger(nnx.Module):
  """RMSNorm per patch -> 4 consecutive patches as one vector -> Linear -> exact GELU -> Linear."""

  def __init__(self, cfg: VisionConfig, *, dtype, rngs: nnx.Rngs, param_dtype=None):
    c = cfg.hidden_size
    self.unit = cfg.merge_unit
    kw = dict(bias=True, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.ln_q = RMSNorm(c, 1e-6, dtype=dtype, param_dtype=param_dtype)
    self.fc1 = Linear(c * self.unit, c * self.unit, ("merger_in", "vision_mlp"), **kw)
    self.fc2 = Linear(c * self.unit, cfg.out_hidden_size, ("vision_mlp", "embed"), **kw)

  def __call__(self, x: jax.Array) -> jax.Array:
    """(R, N, C) -> (R, N / unit, out_hidden)."""
    r, n, c = x.shape
    x = self.ln_q(x).reshape(r, n // self.unit, c * self.unit)
    h = constrain(jax.nn.gelu(self.fc1(x), approximate=False), ("batch", None, "act_mlp"))
    return constrain(self.fc2(h), HIDDEN)


class VisionTower(nnx.Module):
  # How the blocks run in the forward pass; see Qwen25VL.set_remat / `run_stack`.
  remat = "none"
  scan_layers = False

  def __init__(self, cfg: VisionConfig, *, dtype, rngs: nnx.Rngs, param_dtype=None):
    self.config = cfg
    self.dtype = dtype
    kw = dict(dtype=dtype, param_dtype=param_dtype)
    # Conv3d with kernel == stride over (C, T, P, P) is a matmul with the weight flattened in that order.
    self.patch_embed = Linear(cfg.patch_dim, cfg.hidden_size, ("patch", "vision_embed"), bias=False, rngs=rngs, **kw)
    self.blocks = nnx.List([VisionBlock(cfg, rngs=rngs, **kw) for _ in range(cfg.depth)])
    self.merger = PatchMerger(cfg, rngs=rngs, **kw)

  def __call__(self, pixel_values: jax.Array, plan: VisionPlan) -> jax.Array:
    """pixel_values (N, 1176) -> merged image tokens (N/4, out_hidden), input order restored; or in the row
    layout (R, N, 1176) with a plan of (R, ...) arrays -> (R, N/4, out_hidden)."""
    if pixel_values.ndim == 2:
      return self(pixel_values[None], jax.tree.map(lambda a: a[None], plan))[0]
    cfg = self.config
    r, n, _ = pixel_values.shape
    x = self.patch_embed(pixel_values.astype(self.dtype))
    # Per-row gathers with the rows pinned to their chips on both sides (else XLA may replicate the operand).
    rows = ("batch", None, None)
    units = constrain(x.reshape(r, n // cfg.merge_unit, cfg.merge_unit * x.shape[-1]), rows)
    x = constrain(jnp.take_along_axis(units, plan.window_index[..., None], axis=1), rows).reshape(r, n, -1)
    cos, sin = vision_cos_sin(plan.pos_hw, cfg.head_dim, cfg.rope_theta)
    full = set(cfg.fullatt_block_indexes)
    # Consecutive blocks of one kind (window or full attention) run as one stack (`run_stack`).
    runs: list[list[int]] = []
    for i in range(len(self.blocks)):
      if runs and (runs[-1][-1] in full) == (i in full):
        runs[-1].append(i)
      else:
        runs.append([i])
    for run in runs:
      if run[0] in full:
        segments, span = plan.image_segments, plan.image_span
      else:
        segments, span = plan.window_segments, plan.window_span
      block_fn = lambda block, h, seg=segments, sp=span: block(h, cos, sin, seg, sp)  # noqa: E731
      x = run_stack([self.blocks[i] for i in run], block_fn, x, remat=self.remat, scan=self.scan_layers)
    merged = constrain(self.merger(x), rows)
    return constrain(jnp.take_along_axis(merged, plan.reverse_index[..., None], axis=1), rows)
