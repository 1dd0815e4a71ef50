"""One attention function for the vision tower, the decoder (prefill, extend, decode) and training.

`attention(..., impl="xla")` is the plain `jax.numpy` reference: it is the specification that faster kernels are
checked against, forward and backward. Masks are described, not materialised by callers:

- segment ids: a query attends to a key only if both carry the same segment id; id 0 marks padding (never
  attended to). Vision windows, per-image full attention, packed training rows and padded batches are all
  segments.
- positions + `causal=True`: a query at position p attends to keys at positions <= p. Positions here are token
  slots in the sequence/cache (monotone), not M-RoPE positions.

Implementations (`impl`):

- "xla": `xla_attention`, the reference (materialises the (B, K, G, T, S) logits).
- "pallas": `pallas_attention.pallas_attention`. On GPU (Triton) and CPU (interpret mode, for tests only): our
  flash-attention kernels (forward, decode split-K and a Pallas backward; segment/causal masks computed in the
  kernel, fully masked key blocks skipped). On TPU (Mosaic): `tpu_attention`, jax's splash attention for
  self-attention (training rows, vision) and our own kernel for queries against the KV cache (extend, decode).
- "cudnn": `jax.nn.dot_product_attention(..., implementation="cudnn")`, GPU only, bf16/fp16 only, head_dim a
  multiple of 8. Our masks are general (segments x token-slot causality), so they are passed as a dense boolean
  (B, 1, T, S) mask (cuDNN adds it as a bias; fully masked rows get the same uniform softmax as the reference).
- "auto": "pallas" on GPU and TPU, "xla" on CPU (interpret mode is for tests only).

The platform is the one the program is compiled for (`platform.target_platform()`: the mesh's devices), not
`jax.default_backend()`, which says "cpu" on a host that compiles for a TPU slice.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from deepeyes_jax.kernels import platform
from deepeyes_jax.kernels.pallas_attention import pallas_attention
from deepeyes_jax.kernels.reference import make_mask, xla_attention

__all__ = ["attention", "cudnn_attention", "make_mask", "resolve_impl", "segment_local_attention", "xla_attention"]

_IMPLS = ("xla", "pallas", "cudnn", "auto")
_AUTO_PALLAS_PLATFORMS = ("gpu", "tpu")


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
  impl = resolve_impl(impl)
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
    return pallas_attention(q, k, v, kv_heads_major=kv_heads_major, **kw)
  if impl == "cudnn":
    if kv_heads_major:  # cuDNN takes (B, S, K, D) only
      k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
    return cudnn_attention(q, k, v, **kw)
  raise ValueError(f"unknown attention impl {impl!r}; available: {_IMPLS}")


def resolve_impl(impl: str) -> str:
  """The implementation `impl` stands for on the target platform ("auto": "pallas" on GPU and TPU, else "xla")."""
  if impl == "auto":
    return "pallas" if platform.target_platform() in _AUTO_PALLAS_PLATFORMS else "xla"
  if impl not in _IMPLS:
    raise ValueError(f"unknown attention impl {impl!r}; available: {_IMPLS}")
  return impl


def cudnn_attention(
  q, k, v, *, q_segment_ids=None, kv_segment_ids=None, q_positions=None, kv_positions=None, causal=False, scale=None
):
  """cuDNN flash attention through `jax.nn.dot_product_attention`, with our mask passed densely (GPU only)."""
  target = platform.target_platform()
  if target != "gpu":
    raise ValueError(f"attention impl 'cudnn' needs a CUDA GPU; this program is compiled for {target!r}")
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
