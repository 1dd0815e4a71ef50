"""The Qwen2 text decoder of Qwen2.5-VL: pre-norm GQA attention with M-RoPE, SwiGLU MLP, final norm."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from deepeyes_jax.kernels.attention import attention
from deepeyes_jax.kernels.paged_attention import paged_attention
from deepeyes_jax.models.qwen2_5_vl.config import TextConfig
from deepeyes_jax.models.qwen2_5_vl.layers import INIT_STD, Linear, RMSNorm, SwiGLU, apply_rope, axes, run_stack
from deepeyes_jax.parallel.sharding import constrain

# (B, S, D) residual stream: rows over data x fsdp, tokens over tensor (sequence parallel), whole vectors
HIDDEN = ("batch", "act_length", "act_embed")
HEADS = ("batch", None, "act_heads", None)  # (B, S, H, head_dim): heads over tensor


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class CacheView:
  """Where new tokens go in a KV cache of C slots per row, and which slots are visible afterwards.

  write_index: (B, N) int32 slot of each new token; C (out of range) means "do not write".
  kv_segment_ids: (B, C) int32, 1 for slots holding a real token after the write, 0 otherwise.
  kv_positions: (B, C) int32 slot numbers (for the causal mask against the queries' slots).
  """

  write_index: jax.Array
  kv_segment_ids: jax.Array
  kv_positions: jax.Array


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PagedView:
  """Where new tokens go in a paged KV pool, and which tokens each row reads (`deepeyes_jax.sampling.paged`,
  `deepeyes_jax.kernels.paged_attention`).

  page_table: (B, n) int32 pages each row reads, in order (entries past the row's length: any valid page).
  write_page, write_offset: (B, N) int32 page and offset of each new token; write_page = P means "do not write".
  kv_lengths: (B,) int32 tokens of each row visible after the write.
  """

  page_table: jax.Array
  write_page: jax.Array
  write_offset: jax.Array
  kv_lengths: jax.Array


class Attention(nnx.Module):
  attention_impl = "xla"  # see Qwen25VL.set_attention_impl

  def __init__(self, cfg: TextConfig, *, dtype, rngs: nnx.Rngs, param_dtype=None):
    d, hd = cfg.hidden_size, cfg.head_dim
    self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, hd
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.q_proj = Linear(d, self.num_heads * hd, ("embed", "heads"), bias=True, **kw)
    self.k_proj = Linear(d, self.num_kv_heads * hd, ("embed", "kv_heads"), bias=True, **kw)
    self.v_proj = Linear(d, self.num_kv_heads * hd, ("embed", "kv_heads"), bias=True, **kw)
    self.o_proj = Linear(self.num_heads * hd, d, ("heads", "embed"), bias=False, **kw)

  def project_kv(self, x: jax.Array, cos: jax.Array, sin: jax.Array) -> tuple[jax.Array, jax.Array]:
    """x (B, S, D) -> rotated keys and values, each (B, S, K, head_dim)."""
    b, s, _ = x.shape
    k = constrain(self.k_proj(x).reshape(b, s, self.num_kv_heads, self.head_dim), HEADS)
    v = constrain(self.v_proj(x).reshape(b, s, self.num_kv_heads, self.head_dim), HEADS)
    return apply_rope(k, cos, sin), v

  def __call__(
    self,
    x: jax.Array,
    cos: jax.Array,
    sin: jax.Array,
    segment_ids: jax.Array,
    positions: jax.Array,
    kv: tuple[jax.Array, jax.Array] | None = None,
    view: CacheView | None = None,
  ) -> tuple[jax.Array, tuple[jax.Array, jax.Array] | None]:
    """Causal attention of x (B, S, D) -> ((B, S, D), updated cache (k, v) or None).

    segment_ids (B, S) int32 (0 = padding; packed sequences use several ids), positions (B, S) int32 token
    slots for the causal mask. With a cache (`kv` = this layer's heads-major (B, K, C, hd) keys/values and its
    `view`), the new keys/values are written at `view.write_index` and the queries attend over the whole cache.
    """
    b, s, _ = x.shape
    q = apply_rope(constrain(self.q_proj(x).reshape(b, s, self.num_heads, self.head_dim), HEADS), cos, sin)
    k, v = self.project_kv(x, cos, sin)
    if isinstance(view, PagedView):
      out, pool = paged_attention(
        q,
        k,
        v,
        kv[0],
        page_table=view.page_table,
        write_page=view.write_page,
        write_offset=view.write_offset,
        kv_lengths=view.kv_lengths,
        q_segment_ids=segment_ids,
        q_positions=positions,
        impl=self.attention_impl,
      )
      out = constrain(out, HEADS).reshape(b, s, -1)
      return constrain(self.o_proj(out), HIDDEN), (pool, None)
    if kv is None:
      kv_seg, kv_pos = segment_ids, positions
    else:
      rows, heads = jnp.arange(b)[:, None, None], jnp.arange(self.num_kv_heads)[None, :, None]
      slots = view.write_index[:, None, :]  # (B, 1, S) -> index (B, K, S) into the (B, K, C, hd) cache
      # mode="drop": slots >= C (unused bucket padding, inactive rows) write nothing.
      k = kv[0].at[rows, heads, slots].set(k.transpose(0, 2, 1, 3).astype(kv[0].dtype), mode="drop")
      v = kv[1].at[rows, heads, slots].set(v.transpose(0, 2, 1, 3).astype(kv[1].dtype), mode="drop")
      kv_seg, kv_pos = view.kv_segment_ids, view.kv_positions
    out = attention(
      q,
      k,
      v,
      q_segment_ids=segment_ids,
      kv_segment_ids=kv_seg,
      q_positions=positions,
      kv_positions=kv_pos,
      causal=True,
      impl=self.attention_impl,
      kv_heads_major=kv is not None,
    )
    out = constrain(out, HEADS).reshape(b, s, -1)
    return constrain(self.o_proj(out), HIDDEN), (None if kv is None else (k, v))


class DecoderLayer(nnx.Module):
  def __init__(self, cfg: TextConfig, *, dtype, rngs: nnx.Rngs, param_dtype=None):
    kw = dict(dtype=dtype, param_dtype=param_dtype)
    self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, **kw)
    self.self_attn = Attention(cfg, rngs=rngs, **kw)
    self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, **kw)
    self.mlp = SwiGLU(
      cfg.hidden_size, cfg.intermediate_size, bias=False, embed_axis="embed", mlp_axis="mlp", rngs=rngs, **kw
    )

  def __call__(self, x, cos, sin, segment_ids, positions, kv=None, view=None):
    x = constrain(x, HIDDEN)
    h, kv = self.self_attn(self.input_layernorm(x), cos, sin, segment_ids, positions, kv, view)
    x = x + h
    return constrain(x + self.mlp(self.post_attention_layernorm(x)), HIDDEN), kv


class TextDecoder(nnx.Module):
  """Embedding table, decoder layers and final norm (the lm_head lives on the top-level model)."""

  # How the cache-free forward (training, log-probs) runs its layers; see Qwen25VL.set_remat / `run_stack`.
  remat = "none"
  scan_layers = False

  def __init__(self, cfg: TextConfig, *, dtype, rngs: nnx.Rngs, param_dtype=None):
    self.config = cfg
    self.embed_tokens = nnx.Embed(
      cfg.vocab_size,
      cfg.hidden_size,
      dtype=dtype,
      param_dtype=param_dtype or dtype,
      embedding_init=nnx.initializers.normal(INIT_STD),
      embedding_metadata=axes("vocab", "embed"),
      rngs=rngs,
    )
    kw = dict(dtype=dtype, param_dtype=param_dtype)
    self.layers = nnx.List([DecoderLayer(cfg, rngs=rngs, **kw) for _ in range(cfg.num_hidden_layers)])
    self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, **kw)

  def __call__(
    self, x: jax.Array, cos: jax.Array, sin: jax.Array, segment_ids: jax.Array, positions: jax.Array
  ) -> jax.Array:
    """Input embeddings (B, S, D) -> final-normed hidden states (B, S, D)."""
    layer_fn = lambda layer, h: layer(h, cos, sin, segment_ids, positions)[0]  # noqa: E731
    x = run_stack(list(self.layers), layer_fn, constrain(x, HIDDEN), remat=self.remat, scan=self.scan_layers)
    return self.norm(x)

  def extend(self, x, cos, sin, segment_ids, positions, ks, vs, view: CacheView | PagedView):
    """Like __call__ but reading/writing a KV cache: ks, vs are per-layer tuples of (B, K, C, hd); with a
    `PagedView`, ks holds each layer's pool (P, page, 2K, hd) and vs is a tuple of None.

    Returns (hidden (B, S, D), new ks, new vs).
    """
    new_ks, new_vs = [], []
    for layer, k, v in zip(self.layers, ks, vs):
      x, (k, v) = layer(x, cos, sin, segment_ids, positions, (k, v), view)
      new_ks.append(k)
      new_vs.append(v)
    return self.norm(x), tuple(new_ks), tuple(new_vs)
