"""Qwen2.5-VL: vision tower + image-feature merge + M-RoPE text decoder + lm_head.

Two ways in:
- `model(input_ids, attention_mask=..., pixel_values=..., image_grid_thw=...)`: the convenient call. It checks
  the inputs, computes M-RoPE positions and the vision plan on the host, and runs one jitted forward.
- `model.forward(...)` with precomputed positions/segments/plan: the functional core that samplers and trainers
  jit themselves (after `nnx.split`) with fixed, bucketed shapes.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from deepeyes_jax.models.qwen2_5_vl.config import Qwen25VLConfig
from deepeyes_jax.models.qwen2_5_vl.layers import Linear, check_remat, matmul_out_in
from deepeyes_jax.models.qwen2_5_vl.rope import get_rope_index, mrope_cos_sin
from deepeyes_jax.models.qwen2_5_vl.text import HIDDEN, Attention, CacheView, TextDecoder
from deepeyes_jax.models.qwen2_5_vl.vision import VisionAttention, VisionPlan, VisionTower, make_vision_plan
from deepeyes_jax.parallel.sharding import constrain


class Qwen25VL(nnx.Module):
  """Qwen2_5_VLForConditionalGeneration in Flax NNX. Compute in `dtype`; parameters stored in `param_dtype`
  (default `dtype`; fp32 master weights with bf16 compute: see `layers`)."""

  def __init__(self, config: Qwen25VLConfig, *, dtype=jnp.float32, rngs: nnx.Rngs, param_dtype=None):
    self.config = config
    self.dtype = dtype
    self.param_dtype = param_dtype or dtype
    kw = dict(dtype=dtype, param_dtype=param_dtype)
    self.visual = VisionTower(config.vision, rngs=rngs, **kw)
    self.language_model = TextDecoder(config.text, rngs=rngs, **kw)
    if config.tie_word_embeddings:
      self.lm_head = nnx.data(None)
    else:
      t = config.text
      self.lm_head = Linear(t.hidden_size, t.vocab_size, ("embed", "vocab"), bias=False, rngs=rngs, **kw)

  def set_attention_impl(self, impl: str) -> "Qwen25VL":
    """Selects the attention implementation of every vision and decoder attention layer ("xla", "pallas", ...,
    see `deepeyes_jax.kernels.attention`). A static attribute: jitted functions recompile for the new choice."""
    for _, module in nnx.iter_graph(self):
      if isinstance(module, (Attention, VisionAttention)):
        module.attention_impl = impl
    return self

  def set_remat(self, policy: str = "none", scan_layers: bool = False) -> "Qwen25VL":
    """How the cache-free forward (training, log-probs) runs the decoder layers and vision blocks: per-layer
    rematerialisation `policy` ("none" | "full" | "dots", `layers.REMAT_POLICIES`) and whether each stack of layers
    runs as one `lax.scan` (compile time independent of depth). Static attributes, as `set_attention_impl`."""
    check_remat(policy)
    for module in (self.language_model, self.visual):
      module.remat, module.scan_layers = policy, bool(scan_layers)
    return self

  # --- pieces -------------------------------------------------------------------------------------------
  def image_features(self, pixel_values: jax.Array, plan: VisionPlan) -> jax.Array:
    """(N, 1176) patches of all images -> (N/4, hidden) features in placeholder order; in the row layout
    (R, N, 1176) -> (R, N/4, hidden), each row's images' features in its placeholder order."""
    return self.visual(pixel_values, plan)

  def embed(self, input_ids: jax.Array, image_features: jax.Array | None = None) -> jax.Array:
    """Token embeddings (B, S, D); the k-th `<|image_pad|>` (row-major over the batch) gets image_features[k], or
    with row-layout features (B, F, D) the k-th `<|image_pad|>` of row b gets image_features[b, k]."""
    x = constrain(self.language_model.embed_tokens(input_ids), HIDDEN)
    if image_features is None:
      return x
    is_img = input_ids == self.config.image_token_id
    feats = image_features.astype(x.dtype)
    if feats.ndim == 3:
      k = jnp.clip(jnp.cumsum(is_img, axis=1) - 1, 0, feats.shape[1] - 1)
      rows = ("batch", None, None)  # a per-row gather: rows pinned to their chips on both sides
      feats = constrain(jnp.take_along_axis(constrain(feats, rows), k[..., None], axis=1), rows)
    else:
      k = jnp.cumsum(is_img.reshape(-1)) - 1
      feats = feats[jnp.clip(k, 0, feats.shape[0] - 1)].reshape(x.shape)
    return jnp.where(is_img[..., None], feats, x)

  def rope(self, position_ids: jax.Array) -> tuple[jax.Array, jax.Array]:
    t = self.config.text
    return mrope_cos_sin(position_ids, t.head_dim, t.rope_theta, t.mrope_section, self.dtype)

  def inputs(self, input_ids, position_ids, pixel_values=None, plan=None):
    """Decoder inputs: embeddings (B, S, D) with image features merged in, and M-RoPE cos/sin (B, S, head_dim)."""
    feats = None if pixel_values is None else self.image_features(pixel_values, plan)
    return (self.embed(input_ids, feats), *self.rope(position_ids))

  def logits(self, hidden: jax.Array) -> jax.Array:
    """Final hidden states (B, S, D) -> logits (B, S, V) fp32."""
    if self.lm_head is None:
      table = self.language_model.embed_tokens.embedding[...].astype(self.dtype)  # (V, D): tied, as lm_head's
      out = matmul_out_in(hidden.astype(table.dtype), table)
    else:
      out = self.lm_head(hidden)
    return out.astype(jnp.float32)

  def forward(
    self,
    input_ids: jax.Array,
    position_ids: jax.Array,
    segment_ids: jax.Array,
    positions: jax.Array,
    pixel_values: jax.Array | None = None,
    plan: VisionPlan | None = None,
  ) -> jax.Array:
    """The functional core: logits (B, S, V) fp32.

    Args:
      input_ids: (B, S) int32.
      position_ids: (3, B, S) int32 M-RoPE positions.
      segment_ids: (B, S) int32, 0 = padding; distinct ids separate packed sequences.
      positions: (B, S) int32 token slots for the causal mask.
      pixel_values: (N, 1176) patches of all images (N may include bucket padding), with their `plan`.
    """
    x, cos, sin = self.inputs(input_ids, position_ids, pixel_values, plan)
    return self.logits(self.language_model(x, cos, sin, segment_ids, positions))

  def extend(
    self,
    ks: tuple[jax.Array, ...],
    vs: tuple[jax.Array, ...],
    view: CacheView,
    input_ids: jax.Array,
    position_ids: jax.Array,
    segment_ids: jax.Array,
    positions: jax.Array,
    last_index: jax.Array,
    pixel_values: jax.Array | None = None,
    plan: VisionPlan | None = None,
  ) -> tuple[jax.Array, tuple[jax.Array, ...], tuple[jax.Array, ...]]:
    """New tokens (B, N) against a KV cache; see `deepeyes_jax.sampling`.

    Args:
      ks, vs: per-layer caches (B, K, C, head_dim) (heads-major, see `deepeyes_jax.sampling.cache`).
      view: where the new tokens are written and which slots are visible.
      input_ids: (B, N) new tokens (bucket-padded), position_ids (3, B, N), segment_ids (B, N) 1 = real,
        positions (B, N) their cache slots, last_index (B,) index in N of each row's last real token.
      pixel_values, plan: patches of the images whose placeholders are among the new tokens.
    Returns:
      logits (B, V) fp32 at each row's last new token, updated ks, vs.
    """
    x, cos, sin = self.inputs(input_ids, position_ids, pixel_values, plan)
    h, ks, vs = self.language_model.extend(x, cos, sin, segment_ids, positions, ks, vs, view)
    last = h[jnp.arange(h.shape[0]), last_index]
    return self.logits(last), ks, vs

  # --- convenient call -----------------------------------------------------------------------------------
  def __call__(
    self, input_ids, attention_mask=None, pixel_values=None, image_grid_thw=None, position_ids=None
  ) -> jax.Array:
    """Logits (B, S, V) fp32 for a padded batch, like the transformers model's forward.

    Args:
      input_ids: (B, S) int token ids with `<|image_pad|>` already expanded to t*h*w/4 per image.
      attention_mask: (B, S) 1 = real token, 0 = padding (left or right); None = no padding.
      pixel_values: (N, 1176) float, the patches of every image in placeholder order.
      image_grid_thw: (num_images, 3) int patch grids.
      position_ids: optional (3, B, S) M-RoPE positions; computed with `get_rope_index` when omitted.
    """
    inputs = prepare_inputs(self.config, input_ids, attention_mask, pixel_values, image_grid_thw, position_ids)
    graphdef, state = nnx.split(self)
    return _jit_forward(graphdef, state, inputs)


def prepare_inputs(
  config: Qwen25VLConfig, input_ids, attention_mask=None, pixel_values=None, image_grid_thw=None, position_ids=None
) -> dict:
  """Validates a padded batch on the host and derives everything `Qwen25VL.forward` needs."""
  ids = np.asarray(input_ids)
  if ids.ndim != 2:
    raise ValueError(f"input_ids must be (batch, seq), got shape {ids.shape}")
  if ids.size == 0:
    raise ValueError("input_ids is empty")
  mask = np.ones(ids.shape, np.int32) if attention_mask is None else np.asarray(attention_mask).astype(np.int32)
  if mask.shape != ids.shape:
    raise ValueError(f"attention_mask shape {mask.shape} != input_ids shape {ids.shape}")
  if np.any((ids < 0) | (ids >= config.text.vocab_size)):
    bad = ids[(ids < 0) | (ids >= config.text.vocab_size)][0]
    raise ValueError(f"token id {bad} outside the vocabulary [0, {config.text.vocab_size})")
  m = config.vision.spatial_merge_size
  n_placeholders = int(((ids == config.image_token_id) & (mask == 1)).sum())
  out = {}
  if pixel_values is not None or image_grid_thw is not None:
    if pixel_values is None or image_grid_thw is None:
      raise ValueError("pixel_values and image_grid_thw must be given together")
    grid = np.asarray(image_grid_thw).reshape(-1, 3)
    n_patches = int(np.prod(grid, axis=1).sum())
    pv = jnp.asarray(pixel_values)
    if pv.shape != (n_patches, config.vision.patch_dim):
      raise ValueError(
        f"pixel_values shape {pv.shape} != ({n_patches}, {config.vision.patch_dim}) "
        f"implied by image_grid_thw {grid.tolist()}"
      )
    n_feats = n_patches // (m * m)
    if n_feats != n_placeholders:
      raise ValueError(
        f"input_ids hold {n_placeholders} <|image_pad|> tokens but the images give {n_feats} "
        f"features (grids {grid.tolist()})"
      )
    out["pixel_values"] = pv
    out["plan"] = jax.tree.map(jnp.asarray, make_vision_plan(grid, config.vision))
  else:
    grid = None
    if n_placeholders:
      raise ValueError(f"input_ids hold {n_placeholders} <|image_pad|> tokens but no pixel_values were given")
  if position_ids is None:
    position_ids, _ = get_rope_index(ids, grid, mask, image_token_id=config.image_token_id, spatial_merge_size=m)
  position_ids = np.asarray(position_ids)
  if position_ids.shape != (3,) + ids.shape:
    raise ValueError(f"position_ids shape {position_ids.shape} != {(3,) + ids.shape}")
  out.update(
    input_ids=jnp.asarray(ids, jnp.int32),
    position_ids=jnp.asarray(position_ids, jnp.int32),
    segment_ids=jnp.asarray(mask, jnp.int32),
    positions=jnp.broadcast_to(jnp.arange(ids.shape[1], dtype=jnp.int32), ids.shape),
  )
  return out


@functools.partial(jax.jit, static_argnums=0)
def _jit_forward(graphdef, state, inputs):
  return nnx.merge(graphdef, state).forward(**inputs)


def init_random(config: Qwen25VLConfig, *, dtype=jnp.float32, seed: int = 0, param_dtype=None) -> Qwen25VL:
  """A randomly initialised model (normal(0.02) weights, unit norms) for tests and benchmarks."""
  return Qwen25VL(config, dtype=dtype, param_dtype=param_dtype, rngs=nnx.Rngs(seed))


def abstract_model(config: Qwen25VLConfig, *, dtype=jnp.float32, param_dtype=None) -> Qwen25VL:
  """The model with ShapeDtypeStruct leaves: no memory is allocated (`nnx.eval_shape`)."""
  return nnx.eval_shape(lambda: Qwen25VL(config, dtype=dtype, param_dtype=param_dtype, rngs=nnx.Rngs(0)))


def param_count(model: Qwen25VL) -> int:
  return sum(int(np.prod(v.shape)) for v in jax.tree.leaves(nnx.state(model, nnx.Param)))
