"""One attention function for the vision tower, the decoder (prefill, extend, decode) and training.

`attention(..., impl="xla")` is the plain `jax.numpy` reference: it is the specification that faster kernels are
checked against (DESIGN.md principle 1). Masks are described, not materialised by callers:

- segment ids: a query attends to a key only if both carry the same segment id; id 0 marks padding (never
  attended to). Vision windows, per-image full attention, packed training rows and padded batches are all
  segments.
- positions + `causal=True`: a query at position p attends to keys at positions <= p. Positions here are token
  slots in the sequence/cache (monotone), not M-RoPE positions.

Implementations (`impl`):

- "xla": `xla_attention`, the reference (materialises the (B, K, G, T, S) logits).
- "pallas": `pallas_attention.pallas_attention`, our flash-attention kernels (forward, decode split-K and a Pallas
  backward; segment/causal masks computed in the kernel, fully masked key blocks skipped). Interpret mode on CPU
  (slow: for tests only), Triton on GPU. Why jax's own Pallas attention ops are not routed to: see that module.
- "cudnn": `jax.nn.dot_product_attention(..., implementation="cudnn")`, GPU only, bf16/fp16 only, head_dim a
  multiple of 8. Our masks are general (segments x token-slot causality), so they are passed as a dense boolean
  (B, 1, T, S) mask (cuDNN adds it as a bias; fully masked rows get the same uniform softmax as the reference).
- "auto": "pallas" on GPU, "xla" elsewhere. CPU: interpret mode is for tests only. TPU: our kernel is written for
  the Triton lowering and its Mosaic lowering is unverified (and unlikely as is); add "tpu" to
  `_AUTO_PALLAS_BACKENDS` once it is checked there.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

_IMPLS = ("xla", "pallas", "cudnn", "auto")
_AUTO_PALLAS_BACKENDS = ("gpu",)
_FEW_QUERIES = 8  # query rows per KV head (G x T) up to which the CPU logits take the key-major form


def attention(
  q: jax.Array,
  k: jax.Array,
  v: jax.Array,
  *,
  q_segment_ids: jax.Array | None = None,
  kv_segment_ids: jax.Array | None = None,
  q_positions: jax.Array | None = None,
  kv_positions: jax.Array | None = None,
  causal: bool = False,
  scale: float | None = None,
  impl: str = "xla",
  kv_heads_major: bool = False,
) -> jax.Array:
  """Grouped-query attention.

  Args:
    q: (B, T, H, D) queries.
    k, v: (B, S, K, D) keys/values, H % K == 0 (query head h reads KV head h // (H // K)); (B, K, S, D) with
      `kv_heads_major` (the KV cache's layout: the XLA path then multiplies it as stored, with no transposed copy
      of the whole cache per layer and step; the Pallas kernels read either layout in place).
    q_segment_ids: (B, T) int32, kv_segment_ids: (B, S) int32; None means one segment with no padding.
    q_positions: (B, T) int32, kv_positions: (B, S) int32 token slots; required when `causal`.
    scale: logit scale, default D ** -0.5.
  Returns:
    (B, T, H, D) in q's dtype. Rows with no visible key return the mean of all values (finite, never NaN).
  """
  if impl == "auto":
    impl = "pallas" if jax.default_backend() in _AUTO_PALLAS_BACKENDS else "xla"
  kw = dict(
    q_segment_ids=q_segment_ids,
    kv_segment_ids=kv_segment_ids,
    q_positions=q_positions,
    kv_positions=kv_positions,
    causal=causal,
    scale=scale,
  )
  if impl == "xla":
    return xla_attention(q, k, v, kv_heads_major=kv_heads_major, **kw)
  if impl == "pallas":
    from deepeyes_jax.kernels.pallas_attention import pallas_attention

    return pallas_attention(q, k, v, kv_heads_major=kv_heads_major, **kw)
  if impl == "cudnn":
    if kv_heads_major:  # cuDNN takes (B, S, K, D) only
      k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
    return cudnn_attention(q, k, v, **kw)
  raise ValueError(f"unknown attention impl {impl!r}; available: {_IMPLS}")


def cudnn_attention(
  q, k, v, *, q_segment_ids=None, kv_segment_ids=None, q_positions=None, kv_positions=None, causal=False, scale=None
):
  """cuDNN flash attention through `jax.nn.dot_product_attention`, with our mask passed densely (GPU only)."""
  backend = jax.default_backend()
  if backend != "gpu":
    raise ValueError(f"attention impl 'cudnn' needs a CUDA GPU backend; the default JAX backend is {backend!r}")
  if q.dtype not in (jnp.bfloat16, jnp.float16):
    raise ValueError(f"attention impl 'cudnn' supports bfloat16/float16 only, got {q.dtype}")
  b, t = q.shape[:2]
  s = k.shape[1]
  mask = make_mask(q_segment_ids, kv_segment_ids, q_positions, kv_positions, causal, (b, t, s))
  return jax.nn.dot_product_attention(
    q,
    k.astype(q.dtype),
    v.astype(q.dtype),
    mask=None if mask is None else mask[:, None],
    scale=scale,
    implementation="cudnn",
  )


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
  if g * t <= _FEW_QUERIES and jax.default_backend() == "cpu":
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


def segment_local_attention(q, k, v, segment_ids, span: int, block: int = 128):
  """Attention within contiguous segments of at most `span` tokens, for ONE sequence (the vision tower's packed
  patches: windows or whole images, one after the other).

  q, k, v: (N, H, D); segment_ids: (N,) int32, equal ids form contiguous runs of <= `span` tokens, 0 = padding.
  Equal to `xla_attention` with these segment ids on every row that has a visible key, at O(N (2 span + block))
  cost instead of O(N^2): query block i reads only the key blocks its segments can reach (i - r .. i + r,
  r = ceil((span - 1) / block)). Without it, a packed training batch of 56 small images spends ~60x longer in
  vision attention than in everything else on a CPU. Falls back to the full computation when the band would
  cover everything.
  """
  n = q.shape[0]
  r = max(0, -(-(span - 1) // block))
  nb = -(-n // block)
  if span <= 0 or 2 * r + 1 >= nb:
    seg = segment_ids[None]
    return xla_attention(q[None], k[None], v[None], q_segment_ids=seg, kv_segment_ids=seg)[0]
  pad = nb * block - n

  def band(x):  # (N, ...) -> (nb, (2r + 1) * block, ...): the keys each query block can see
    x = jnp.pad(x, [(r * block, pad + r * block)] + [(0, 0)] * (x.ndim - 1))
    x = x.reshape(nb + 2 * r, block, *x.shape[1:])
    idx = jnp.arange(nb)[:, None] + jnp.arange(2 * r + 1)[None, :]
    return x[idx].reshape(nb, (2 * r + 1) * block, *x.shape[2:])

  def blocks(x):  # (N, ...) -> (nb, block, ...)
    return jnp.pad(x, [(0, pad)] + [(0, 0)] * (x.ndim - 1)).reshape(nb, block, *x.shape[1:])

  out = xla_attention(blocks(q), band(k), band(v), q_segment_ids=blocks(segment_ids), kv_segment_ids=band(segment_ids))
  return out.reshape(nb * block, *q.shape[1:])[:n]
