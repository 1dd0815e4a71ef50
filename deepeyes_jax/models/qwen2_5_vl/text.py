"""The Qwen2 text decoder of Qwen2.5-VL: pre-norm GQA attention with M-RoPE, SwiGLU MLP, final norm."""

from __future__ import annotations

import jax
from flax import nnx

from deepeyes_jax.kernels.attention import attention
from deepeyes_jax.models.qwen2_5_vl.config import TextConfig
from deepeyes_jax.models.qwen2_5_vl.layers import INIT_STD, RMSNorm, SwiGLU, apply_rope, axes, linear


class Attention(nnx.Module):
  def __init__(self, cfg: TextConfig, *, dtype, rngs: nnx.Rngs):
    d, hd = cfg.hidden_size, cfg.head_dim
    self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, hd
    self.q_proj = linear(d, self.num_heads * hd, ("embed", "heads"), bias=True, dtype=dtype, rngs=rngs)
    self.k_proj = linear(d, self.num_kv_heads * hd, ("embed", "kv_heads"), bias=True, dtype=dtype, rngs=rngs)
    self.v_proj = linear(d, self.num_kv_heads * hd, ("embed", "kv_heads"), bias=True, dtype=dtype, rngs=rngs)
    self.o_proj = linear(self.num_heads * hd, d, ("heads", "embed"), bias=False, dtype=dtype, rngs=rngs)

  def project_kv(self, x: jax.Array, cos: jax.Array, sin: jax.Array) -> tuple[jax.Array, jax.Array]:
    """x (B, S, D) -> rotated keys and values, each (B, S, K, head_dim)."""
    b, s, _ = x.shape
    k = self.k_proj(x).reshape(b, s, self.num_kv_heads, self.head_dim)
    v = self.v_proj(x).reshape(b, s, self.num_kv_heads, self.head_dim)
    return apply_rope(k, cos, sin), v

  def __call__(
    self, x: jax.Array, cos: jax.Array, sin: jax.Array, segment_ids: jax.Array, positions: jax.Array
  ) -> jax.Array:
    """Causal self-attention over x (B, S, D) -> (B, S, D).

    segment_ids (B, S) int32 (0 = padding; packed sequences use several ids), positions (B, S) int32 token
    slots for the causal mask.
    """
    b, s, _ = x.shape
    q = apply_rope(self.q_proj(x).reshape(b, s, self.num_heads, self.head_dim), cos, sin)
    k, v = self.project_kv(x, cos, sin)
    out = attention(
      q,
      k,
      v,
      q_segment_ids=segment_ids,
      kv_segment_ids=segment_ids,
      q_positions=positions,
      kv_positions=positions,
      causal=True,
    )
    return self.o_proj(out.reshape(b, s, -1))


class DecoderLayer(nnx.Module):
  def __init__(self, cfg: TextConfig, *, dtype, rngs: nnx.Rngs):
    self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype=dtype)
    self.self_attn = Attention(cfg, dtype=dtype, rngs=rngs)
    self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype=dtype)
    self.mlp = SwiGLU(
      cfg.hidden_size, cfg.intermediate_size, bias=False, embed_axis="embed", mlp_axis="mlp", dtype=dtype, rngs=rngs
    )

  def __call__(self, x, cos, sin, segment_ids, positions):
    x = x + self.self_attn(self.input_layernorm(x), cos, sin, segment_ids, positions)
    return x + self.mlp(self.post_attention_layernorm(x))


class TextDecoder(nnx.Module):
  """Embedding table, decoder layers and final norm (the lm_head lives on the top-level model)."""

  def __init__(self, cfg: TextConfig, *, dtype, rngs: nnx.Rngs):
    self.config = cfg
    self.embed_tokens = nnx.Embed(
      cfg.vocab_size,
      cfg.hidden_size,
      dtype=dtype,
      param_dtype=dtype,
      embedding_init=nnx.initializers.normal(INIT_STD),
      embedding_metadata=axes("vocab", "embed"),
      rngs=rngs,
    )
    self.layers = nnx.List([DecoderLayer(cfg, dtype=dtype, rngs=rngs) for _ in range(cfg.num_hidden_layers)])
    self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype=dtype)

  def __call__(
    self, x: jax.Array, cos: jax.Array, sin: jax.Array, segment_ids: jax.Array, positions: jax.Array
  ) -> jax.Array:
    """Input embeddings (B, S, D) -> final-normed hidden states (B, S, D)."""
    for layer in self.layers:
      x = layer(x, cos, sin, segment_ids, positions)
    return self.norm(x)
