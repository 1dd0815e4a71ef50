"""Attention on TPU (Mosaic) for the `attention.attention` interface: two kernels, one per shape class.

Semantics are those of `attention.xla_attention` (the reference): a query sees a key iff both carry the same non-zero
segment id and, when `causal`, kv_position <= q_position; softmax in fp32; a row that sees no key returns the mean of
all S values (its gradient: d v += d out / S).

**Self-attention** (q and kv are the same sequence: packed training rows, a prefill without cache, the vision
tower's windows and images): jax's own splash attention (`pallas.ops.tpu.splash_attention`), forward and backward,
with q/kv segment ids and GQA (the G query heads of a KV head share its K/V blocks). Splash's causal mask is by index,
so this path requires what every caller here has: positions that increase along the row within a segment (slot
numbers; packed rows and prefills use arange). Padding tokens (segment 0) are the only rows that see no key (a real
token always sees itself); splash lets them see each other, and the wrapper replaces their output by the mean of
the values, the reference's convention. T is padded to a multiple of the block (128-512) with segment 0.

**Cache** (queries at per-row offsets against a heads-major (B, K, C, D) KV cache: extend and decode): our own
Mosaic kernel. Splash needs a static mask (a per-row offset is not one), and jax's ragged paged attention needs a
paged cache in its own layout (the rollout engine's pages will bring that). Layout as in `pallas_attention`: the
G query heads of a KV head are folded into the rows, (B, K, T * G, D), so decode has G rows per program and the
cache is read once for all heads of the group. Grid (B, K, row blocks, key blocks) with fp32 accumulators in VMEM
scratch; the key blocks a row block can see (segments, causality) are computed on the host side of the kernel
from per-block summaries and scalar-prefetched: blocks outside [lo, hi) are neither fetched (the index map clamps
to the range, and Pallas skips the copy of a repeated block) nor computed. Rows that see no key (padded query
tokens, inactive decode rows) are fixed up after the kernel with the mean of the values, read by a second small
kernel only for the batch rows that have such a row. Gradients of this path come from the XLA reference (the
learner never differentiates through a KV cache).

Both paths run per shard: under a mesh (`platform.target_mesh()`) the kernels are wrapped in `shard_map` with rows
over (data, fsdp) and heads over tensor where those divide, because a Pallas call is opaque to the SPMD
partitioner (it would be replicated, i.e. every chip would compute every row).

On CPU the kernels run in Pallas' TPU interpret mode (`interpret=True`, `pltpu.InterpretParams`): what the tests
use; `pallas_attention` picks it when TPU kernels are asked for (`platform.compiling_for("tpu")`) on CPU devices.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas.ops.tpu import splash_attention as splash
from jax.sharding import PartitionSpec as P

from deepeyes_jax.kernels import blocks, platform
from deepeyes_jax.kernels.reference import xla_attention
from deepeyes_jax.parallel import sharding as shd

MASK_VALUE = -1e30
LANES = 128
SUBLANES = 8
_round_up, _pad_axis = blocks.round_up, blocks.pad_axis


# ------------------------------------------------------------------------------------------------------------------
# Sharding: run the kernel per shard
# ------------------------------------------------------------------------------------------------------------------
def _per_shard(fn, batch: int, kv_heads: int, arg_kinds, out_kinds):
  """Wraps fn in shard_map over the target mesh (if any). kinds per argument: "q" (B, T, H, D), "kv" (B, S, K, D),
  "kvh" (B, K, S, D), "row" (B, N)."""
  mesh = platform.target_mesh()
  if mesh is None or mesh.size == 1:
    return fn
  rows = shd.logical_to_spec(("batch",), (batch,), mesh)[0]
  heads = shd.logical_to_spec(("kv_heads",), (kv_heads,), mesh)[0]  # divides q_heads too (a multiple of K)
  specs = {
    "q": P(rows, None, heads, None),
    "kv": P(rows, None, heads, None),
    "kvh": P(rows, heads, None, None),
    "row": P(rows, None),
  }
  return jax.shard_map(
    fn,
    mesh=mesh,
    in_specs=tuple(specs[k] for k in arg_kinds),
    out_specs=tuple(specs[k] for k in out_kinds) if isinstance(out_kinds, tuple) else specs[out_kinds],
    check_vma=False,
  )


def _mean_values(v_b_s_k_d, s_real: int):
  """(B, S, K, D) -> (B, K, D) fp32 mean over the S values (padding included, as the reference's uniform softmax)."""
  return jnp.sum(v_b_s_k_d.astype(jnp.float32), axis=1) / s_real


# ------------------------------------------------------------------------------------------------------------------
# Self-attention: splash
# ------------------------------------------------------------------------------------------------------------------
def _splash_block(n: int) -> int:
  return 512 if n >= 512 else 256 if n >= 256 else 128


def _interpret(interpret: bool):
  return pltpu.InterpretParams() if interpret else False


@functools.lru_cache(maxsize=64)
def _splash_kernel(heads: int, n: int, block: int, causal: bool, span: int, interpret: bool):
  if causal:
    one = splash.CausalMask((n, n))
  elif span:  # segments are contiguous runs of <= span tokens: keys farther than span - 1 are never visible
    one = splash.LocalMask((n, n), window_size=(span - 1, span - 1), offset=0)
  else:
    one = splash.FullMask((n, n))
  mask = splash.MultiHeadMask([one for _ in range(heads)])
  b = block
  sizes = splash.BlockSizes(
    block_q=b,
    block_kv=b,
    block_kv_compute=b,
    block_q_dkv=b,
    block_kv_dkv=b,
    block_kv_dkv_compute=b,
    block_q_dq=b,
    block_kv_dq=b,
  )
  # Cached across traces, so its mask-info arrays must be concrete constants, never tracers of the first trace.
  with jax.ensure_compile_time_eval():
    return splash.make_splash_mha(
      mask, block_sizes=sizes, head_shards=1, q_seq_shards=1, interpret=_interpret(interpret)
    )


def splash_self_attention(
  q, k, v, segment_ids, *, causal: bool, scale: float, segment_span: int = 0, interpret: bool = False
):
  """q (B, T, H, D), k/v (B, T, K, D), segment_ids (B, T) int32 (0 = padding) -> (B, T, H, D) in q's dtype.

  `segment_span` > 0 (non-causal only): segments are contiguous runs of at most that many tokens, so splash skips
  the key blocks outside the band (the vision tower's windows: O(N span) instead of O(N^2))."""

  def local(q, k, v, seg):
    b, t, h, d = q.shape
    kh = k.shape[2]
    block = _splash_block(t)
    n = _round_up(t, block)
    kernel = _splash_kernel(h, n, block, bool(causal), int(segment_span), bool(interpret))
    # Splash wants (heads, T, D) per sequence; it does not scale the logits.
    qh = _pad_axis((q * jnp.asarray(scale, q.dtype)).transpose(0, 2, 1, 3), 2, n)
    kh_, vh = (_pad_axis(x.transpose(0, 2, 1, 3), 2, n) for x in (k, v))
    segp = _pad_axis(seg, 1, n)
    one = lambda a, bb, c, s: kernel(a, bb, c, segment_ids=splash.SegmentIds(s, s))
    if interpret:  # the TPU interpreter does not batch a vmapped splash call (its grid gains an axis): row by row
      out = jnp.stack([one(qh[r], kh_[r], vh[r], segp[r]) for r in range(b)])
    else:
      out = jax.vmap(one)(qh, kh_, vh, segp)
    out = out[:, :, :t].transpose(0, 2, 1, 3)  # (B, T, H, D)
    # Padding rows see no key in the reference: the mean of all values (of their KV head).
    mean = jnp.repeat(_mean_values(v, t), h // kh, axis=1)  # (B, H, D)
    return jnp.where((seg == 0)[:, :, None, None], mean[:, None].astype(out.dtype), out)

  b, _, h, _ = q.shape
  fn = _per_shard(local, b, k.shape[2], ("q", "kv", "kv", "row"), "q")
  return fn(q, k, v, segment_ids)


# ------------------------------------------------------------------------------------------------------------------
# Cache attention: our Mosaic kernel
# ------------------------------------------------------------------------------------------------------------------
def _cache_kernel(
  lo_ref,
  hi_ref,
  q_ref,
  k_ref,
  v_ref,
  qseg_ref,
  qpos_ref,
  kseg_ref,
  kpos_ref,
  o_ref,
  seen_ref,
  m_scr,
  l_scr,
  acc_scr,
  seen_scr,
  *,
  scale: float,
  causal: bool,
  num_kb: int,
):
  b, i, j = pl.program_id(0), pl.program_id(2), pl.program_id(3)

  @pl.when(j == 0)
  def _init():
    m_scr[...] = jnp.full(m_scr.shape, MASK_VALUE, jnp.float32)
    l_scr[...] = jnp.zeros(l_scr.shape, jnp.float32)
    acc_scr[...] = jnp.zeros(acc_scr.shape, jnp.float32)
    seen_scr[...] = jnp.zeros(seen_scr.shape, jnp.float32)

  @pl.when((j >= lo_ref[b, i]) & (j < hi_ref[b, i]))
  def _compute():
    q = q_ref[...]
    k = k_ref[...]
    s = jax.lax.dot_general(q, k, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32) * scale
    # The rows' ids arrive lane-major (1, bq) (dense in HBM); the mask wants them as a (bq, 1) column.
    col = lambda ref: jnp.broadcast_to(ref[...], (SUBLANES, ref.shape[-1])).T[:, :1]
    qs, ks = col(qseg_ref), kseg_ref[...]  # (bq, 1), (1, bk)
    mask = (qs == ks) & (ks != 0)
    if causal:
      mask = mask & (kpos_ref[...] <= col(qpos_ref))
    s = jnp.where(mask, s, MASK_VALUE)
    m_prev = m_scr[...]
    m_new = jnp.maximum(m_prev, jnp.max(s, axis=-1, keepdims=True))
    alpha = jnp.exp(m_prev - m_new)
    p = jnp.where(mask, jnp.exp(s - m_new), 0.0)
    l_scr[...] = alpha * l_scr[...] + jnp.sum(p, axis=-1, keepdims=True)
    v = v_ref[...]
    pv = jax.lax.dot_general(p.astype(v.dtype), v, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)
    acc_scr[...] = alpha * acc_scr[...] + pv
    m_scr[...] = m_new
    # Visible keys per row, counted lane-major ((8, bq) = ones @ mask.T) so that the result is stored densely
    # (a (bq, 1) column would take a 128-lane tile per 8 rows in HBM).
    ones = jnp.ones((SUBLANES, mask.shape[1]), jnp.float32)
    seen_scr[...] += jax.lax.dot_general(
      ones, mask.astype(jnp.float32), (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32
    )

  @pl.when(j == num_kb - 1)
  def _finish():
    denom = l_scr[...]
    o_ref[...] = (acc_scr[...] / jnp.where(denom == 0.0, 1.0, denom)).astype(o_ref.dtype)
    seen_ref[...] = seen_scr[0:1, :]


def _vsum_kernel(need_ref, v_ref, o_ref):
  b, j = pl.program_id(0), pl.program_id(2)

  @pl.when(j == 0)
  def _init():
    o_ref[...] = jnp.zeros(o_ref.shape, o_ref.dtype)

  @pl.when(need_ref[b] != 0)
  def _add():
    o_ref[...] += jnp.sum(v_ref[...].astype(jnp.float32), axis=0, keepdims=True)


def _visible_ranges(qseg_r, qpos_r, kseg, kpos, bq: int, bk: int, causal: bool):
  """[lo, hi) key blocks each row block may see: (B, num row blocks) int32 each (lo = hi when none)."""
  qmin, qmax, _, qpmax = blocks.block_summaries(qseg_r, qpos_r, bq)
  kmin, kmax, kpmin, _ = blocks.block_summaries(kseg, kpos, bk)
  vis = (kmin[:, None, :] <= qmax[:, :, None]) & (kmax[:, None, :] >= qmin[:, :, None])
  if causal:
    vis = vis & (kpmin[:, None, :] <= qpmax[:, :, None])
  nk = kmin.shape[1]
  idx = jnp.arange(nk, dtype=jnp.int32)
  lo = jnp.min(jnp.where(vis, idx, nk), -1).astype(jnp.int32)
  hi = jnp.max(jnp.where(vis, idx + 1, 0), -1).astype(jnp.int32)
  return lo, jnp.maximum(hi, lo)


def _cache_forward(q, k, v, qseg, kseg, qpos, kpos, *, causal: bool, scale: float, interpret: bool):
  """q (B, T, H, D); k, v (B, K, S, D) heads-major; ids (B, T) / (B, S) int32 -> (B, T, H, D)."""
  b, t, h, d = q.shape
  kh, s = k.shape[1], k.shape[2]
  g = h // kh
  rows = t * g
  bq = min(256, _round_up(rows, SUBLANES))
  rows_pad = _round_up(rows, bq)
  bk = min(512, _round_up(s, LANES))
  s_pad = _round_up(s, bk)
  num_rb, num_kb = rows_pad // bq, s_pad // bk

  qr = q.reshape(b, t, kh, g, d).transpose(0, 2, 1, 3, 4).reshape(b, kh, rows, d)
  qr = _pad_axis(qr, 2, rows_pad)
  kp, vp = _pad_axis(k, 2, s_pad), _pad_axis(v, 2, s_pad)
  qseg_r = _pad_axis(jnp.repeat(qseg, g, axis=1), 1, rows_pad)  # row t * G + j carries token t's ids
  qpos_r = _pad_axis(jnp.repeat(qpos, g, axis=1), 1, rows_pad)
  kseg_p, kpos_p = _pad_axis(kseg, 1, s_pad), _pad_axis(kpos, 1, s_pad)
  lo, hi = _visible_ranges(qseg_r, qpos_r, kseg_p, kpos_p, bq, bk, causal)

  def kv_block(bi, hi_, i, j, lo_ref, hi_ref):
    # Outside [lo, hi) keep pointing at a block of the range: no new copy is issued for a repeated block index.
    last = jnp.maximum(hi_ref[bi, i] - 1, lo_ref[bi, i])
    return jnp.minimum(jnp.clip(j, lo_ref[bi, i], last), num_kb - 1)

  q_spec = pl.BlockSpec((None, None, bq, d), lambda bi, hh, i, j, lo_r, hi_r: (bi, hh, i, 0))
  kv_spec = pl.BlockSpec(
    (None, None, bk, d), lambda bi, hh, i, j, lo_r, hi_r: (bi, hh, kv_block(bi, hh, i, j, lo_r, hi_r), 0)
  )
  qmeta_spec = pl.BlockSpec((None, 1, bq), lambda bi, hh, i, j, lo_r, hi_r: (bi, 0, i))
  kmeta_spec = pl.BlockSpec((None, 1, bk), lambda bi, hh, i, j, lo_r, hi_r: (bi, 0, kv_block(bi, hh, i, j, lo_r, hi_r)))
  seen_spec = pl.BlockSpec((None, None, 1, bq), lambda bi, hh, i, j, lo_r, hi_r: (bi, hh, 0, i))
  grid_spec = pltpu.PrefetchScalarGridSpec(
    num_scalar_prefetch=2,
    grid=(b, kh, num_rb, num_kb),
    in_specs=[q_spec, kv_spec, kv_spec, qmeta_spec, qmeta_spec, kmeta_spec, kmeta_spec],
    out_specs=[q_spec, seen_spec],
    scratch_shapes=[
      pltpu.VMEM((bq, 1), jnp.float32),
      pltpu.VMEM((bq, 1), jnp.float32),
      pltpu.VMEM((bq, d), jnp.float32),
      pltpu.VMEM((SUBLANES, bq), jnp.float32),
    ],
  )
  out, seen = pl.pallas_call(
    functools.partial(_cache_kernel, scale=float(scale), causal=bool(causal), num_kb=num_kb),
    grid_spec=grid_spec,
    out_shape=[
      jax.ShapeDtypeStruct((b, kh, rows_pad, d), q.dtype),
      jax.ShapeDtypeStruct((b, kh, 1, rows_pad), jnp.float32),
    ],
    compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
    interpret=_interpret(interpret),
    name="deepeyes_tpu_cache_attention",
  )(lo, hi, qr, kp, vp, qseg_r[:, None, :], qpos_r[:, None, :], kseg_p[:, None, :], kpos_p[:, None, :])

  # Rows that saw no key: the mean of the S values of their KV head, summed only for the batch rows that need it.
  empty = (seen[:, :, 0] == 0.0)[:, :, :rows]  # (B, K, rows)
  need = jnp.any(empty, axis=(1, 2)).astype(jnp.int32)
  vsum = pl.pallas_call(
    _vsum_kernel,
    grid_spec=pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=1,
      grid=(b, kh, num_kb),
      in_specs=[pl.BlockSpec((None, None, bk, d), lambda bi, hh, j, nd: (bi, hh, j * nd[bi], 0))],
      out_specs=pl.BlockSpec((None, None, 1, d), lambda bi, hh, j, nd: (bi, hh, 0, 0)),
    ),
    out_shape=jax.ShapeDtypeStruct((b, kh, 1, d), jnp.float32),
    compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary")),
    interpret=_interpret(interpret),
    name="deepeyes_tpu_value_sum",
  )(need, vp)
  out = out[:, :, :rows]
  out = jnp.where(empty[..., None], (vsum / s).astype(out.dtype), out)
  return out.reshape(b, kh, t, g, d).transpose(0, 2, 1, 3, 4).reshape(b, t, h, d)


def cache_attention(q, k, v, qseg, kseg, qpos, kpos, *, causal: bool, scale: float, interpret: bool = False):
  """q (B, T, H, D) against a heads-major cache k, v (B, K, S, D) -> (B, T, H, D); differentiable (through the
  XLA reference)."""
  return _cache_attention(q, k, v, qseg, kseg, qpos, kpos, bool(causal), float(scale), bool(interpret))


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8, 9))
def _cache_attention(q, k, v, qseg, kseg, qpos, kpos, causal, scale, interpret):
  fwd = functools.partial(_cache_forward, causal=causal, scale=scale, interpret=interpret)
  fn = _per_shard(fwd, q.shape[0], k.shape[1], ("q", "kvh", "kvh", "row", "row", "row", "row"), "q")
  return fn(q, k, v, qseg, kseg, qpos, kpos)


def _cache_attention_fwd(q, k, v, qseg, kseg, qpos, kpos, causal, scale, interpret):
  out = _cache_attention(q, k, v, qseg, kseg, qpos, kpos, causal, scale, interpret)
  return out, (q, k, v, qseg, kseg, qpos, kpos)


def _cache_attention_bwd(causal, scale, interpret, res, dout):
  q, k, v, qseg, kseg, qpos, kpos = res
  ref = lambda q, k, v: xla_attention(
    q,
    k,
    v,
    q_segment_ids=qseg,
    kv_segment_ids=kseg,
    q_positions=qpos,
    kv_positions=kpos,
    causal=causal,
    scale=scale,
    kv_heads_major=True,
  )
  dq, dk, dv = jax.vjp(ref, q, k, v)[1](dout)
  return dq, dk, dv, None, None, None, None


_cache_attention.defvjp(_cache_attention_fwd, _cache_attention_bwd)


# ------------------------------------------------------------------------------------------------------------------
# Entry point
# ------------------------------------------------------------------------------------------------------------------
def tpu_attention(
  q,
  k,
  v,
  *,
  q_segment_ids=None,
  kv_segment_ids=None,
  q_positions=None,
  kv_positions=None,
  causal: bool = False,
  scale: float | None = None,
  kv_heads_major: bool = False,
  segment_span: int = 0,
  interpret: bool = False,
):
  """`attention.attention` on TPU. A heads-major `k`/`v` is a KV cache (extend, decode: our kernel); otherwise q and
  kv must be the same sequence (T == S, one segment-id vector and one position vector for both, positions increasing
  along each segment): self-attention through splash."""
  b, t, h, d = q.shape
  scale = float(d**-0.5 if scale is None else scale)
  if causal and (q_positions is None or kv_positions is None):
    raise ValueError("causal attention needs q_positions and kv_positions")
  dtype = jnp.result_type(q, k, v)
  q, k, v = q.astype(dtype), k.astype(dtype), v.astype(dtype)
  if kv_heads_major:
    ids = blocks.dense_ids(q_segment_ids, kv_segment_ids, q_positions, kv_positions, causal, b, t, k.shape[2])
    qseg, kseg, qpos, kpos = ids
    return cache_attention(q, k, v, qseg, kseg, qpos, kpos, causal=causal, scale=scale, interpret=interpret)
  if k.shape[1] != t or q_segment_ids is not kv_segment_ids or (causal and q_positions is not kv_positions):
    raise ValueError(
      "TPU attention without a KV cache is self-attention: q and k/v must be the same sequence (T == S, the same "
      f"segment-id and position arrays for both); got T={t}, S={k.shape[1]}. Pass the cache heads-major "
      "(kv_heads_major=True) for queries at offsets into a cache."
    )
  seg = jnp.ones((b, t), jnp.int32) if q_segment_ids is None else q_segment_ids.astype(jnp.int32)
  span = 0 if causal else int(segment_span)
  return splash_self_attention(q, k, v, seg, causal=causal, scale=scale, segment_span=span, interpret=interpret)
