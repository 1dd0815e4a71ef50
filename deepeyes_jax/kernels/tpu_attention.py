"""Attention on TPU (Mosaic) for the `attention.attention` interface: jax's splash attention for causal
self-attention, our own kernels for everything else.

Semantics are those of `attention.xla_attention` (the reference): a query sees a key iff both carry the same non-zero
segment id and, when `causal`, kv_position <= q_position; softmax in fp32; a row that sees no key returns the mean of
all S values (its gradient: d v += d out / S).

**Causal self-attention** (q and kv are the same sequence: packed training rows, a prefill without a cache): jax's
splash attention (`pallas.ops.tpu.splash_attention`), forward and backward, with q/kv segment ids and GQA (the G
query heads of a KV head share its K/V blocks). Splash's causal mask is by index, so this path relies on what every
caller here has: positions that increase along each segment (token slots; packed rows and prefills use arange).
Padding tokens (segment 0) are the only rows that see no key (a real token sees itself); splash lets them see each
other, and the wrapper replaces their output by the mean of the values, the reference's convention. T is padded to
a multiple of the block (128-512) with segment 0.

**Segment attention** (`segment_attention`: queries at per-row offsets against the heads-major (B, K, C, D) KV cache,
i.e. extend and decode, and the vision tower's windows and images, whose layout changes with every batch): our own
kernels, forward, dQ and dK/dV (FlashAttention-2 style). Splash precomputes its mask's block structure in numpy from
a static mask: per-row cache offsets are not static, and a static mask over a micro-batch's packed image patches
(millions of them for the 7B recipe) takes splash hours to process. jax's ragged paged attention needs a paged cache
in its own layout (the rollout engine's pages will bring that). Layout as in `pallas_attention`: the G query heads
of a KV head are folded into the rows, (B, K, T * G, D), so decode has G rows per program and the cache is read
once for all heads of the group. Grids (B, K, row blocks, key blocks) (forward, dQ) and (B, K, key blocks, row
blocks) (dK/dV) with fp32 accumulators in VMEM scratch; which blocks of the inner axis an outer block can see
(segments, causality) is computed from per-block summaries of the ids and scalar-prefetched: blocks outside
[lo, hi) are neither fetched (the index map clamps to the range, and Pallas skips the copy of a repeated block) nor
computed, so windows cost O(N window), a ragged cache O(length), not O(N^2) / O(capacity). Row statistics (lse,
delta) and ids are stored lane-major (1, n) and turned into columns in the kernel (a (n, 1) array would take a
128-lane tile per 8 rows in HBM). Rows that see no key (padded query tokens, inactive decode rows) are fixed up
after the kernel with the mean of the values, read by a second small kernel only for the batch rows that have one.

Both paths run per shard: under a mesh (`platform.target_mesh()`) the kernels are wrapped in `shard_map` with rows
over (data, fsdp) and heads over tensor where those divide, because a Pallas call is opaque to the SPMD partitioner
(it would be replicated, i.e. every chip would compute every row).

On CPU the kernels run in Pallas' TPU interpret mode (`interpret=True`, `pltpu.InterpretParams`): what the tests
use; `pallas_attention` picks it when TPU kernels are asked for (`platform.compiling_for("tpu")`) on CPU devices.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas.ops.tpu import splash_attention as splash
from jax.sharding import PartitionSpec as P

from deepeyes_jax.kernels import blocks, platform
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
def _splash_kernel(heads: int, n: int, block: int, interpret: bool):
  # The mask is static: splash precomputes its block structure in numpy at trace time (cheap for a causal mask;
  # a data-dependent layout such as the vision tower's images is what `segment_attention` is for).
  mask = splash.MultiHeadMask([splash.CausalMask((n, n)) for _ in range(heads)])
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


def splash_causal_attention(q, k, v, segment_ids, *, scale: float, interpret: bool = False):
  """Causal self-attention of packed rows: q (B, T, H, D), k/v (B, T, K, D), segment_ids (B, T) int32 (0 =
  padding) -> (B, T, H, D) in q's dtype. Causality by index (positions must increase along each segment)."""

  def local(q, k, v, seg):
    b, t, h, d = q.shape
    kh = k.shape[2]
    block = _splash_block(t)
    n = _round_up(t, block)
    kernel = _splash_kernel(h, n, block, bool(interpret))
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
# Segment attention: our Mosaic kernels (forward, dQ, dK/dV)
# ------------------------------------------------------------------------------------------------------------------
def _col(ref):
  """A lane-major (1, n) block of ids or row statistics (dense in HBM) as the (n, 1) column a mask needs."""
  return jnp.broadcast_to(ref[...], (SUBLANES, ref.shape[-1])).T[:, :1]


def _row(x):
  """(n, 1) -> (1, n): a column of row statistics stored lane-major."""
  return jnp.broadcast_to(x, (x.shape[0], LANES)).T[:1, :]


def _dot_nt(a, b):  # a @ b.T, fp32 accumulation
  return jax.lax.dot_general(a, b, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)


def _dot_nn(a, b):  # a @ b
  return jax.lax.dot_general(a, b, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)


def _fwd_kernel(
  lo_ref, hi_ref, q_ref, k_ref, v_ref, qseg_ref, qpos_ref, kseg_ref, kpos_ref, o_ref, lse_ref, m_scr, l_scr, acc_scr,
  *, scale: float, causal: bool, num_kb: int,
):  # fmt: skip
  b, i, j = pl.program_id(0), pl.program_id(2), pl.program_id(3)

  @pl.when(j == 0)
  def _init():
    m_scr[...] = jnp.full(m_scr.shape, MASK_VALUE, jnp.float32)
    l_scr[...] = jnp.zeros(l_scr.shape, jnp.float32)
    acc_scr[...] = jnp.zeros(acc_scr.shape, jnp.float32)

  @pl.when((j >= lo_ref[b, i]) & (j < hi_ref[b, i]))
  def _compute():
    mask = (_col(qseg_ref) == kseg_ref[...]) & (kseg_ref[...] != 0)  # (bq, bk)
    if causal:
      mask = mask & (kpos_ref[...] <= _col(qpos_ref))
    s = jnp.where(mask, _dot_nt(q_ref[...], k_ref[...]) * scale, MASK_VALUE)
    m_prev = m_scr[...]
    m_new = jnp.maximum(m_prev, jnp.max(s, axis=-1, keepdims=True))
    alpha = jnp.exp(m_prev - m_new)
    p = jnp.where(mask, jnp.exp(s - m_new), 0.0)  # masked keys add nothing, even to a row that saw no key yet
    l_scr[...] = alpha * l_scr[...] + jnp.sum(p, axis=-1, keepdims=True)
    acc_scr[...] = alpha * acc_scr[...] + _dot_nn(p.astype(v_ref.dtype), v_ref[...])
    m_scr[...] = m_new

  @pl.when(j == num_kb - 1)
  def _finish():
    denom = l_scr[...]
    empty = denom == 0.0
    o_ref[...] = (acc_scr[...] / jnp.where(empty, 1.0, denom)).astype(o_ref.dtype)
    lse_ref[...] = _row(jnp.where(empty, -jnp.inf, m_scr[...] + jnp.log(jnp.where(empty, 1.0, denom))))


def _dq_kernel(
  lo_ref, hi_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, qseg_ref, qpos_ref, kseg_ref, kpos_ref, dq_ref,
  acc_scr, *, scale: float, causal: bool, num_kb: int,
):  # fmt: skip
  b, i, j = pl.program_id(0), pl.program_id(2), pl.program_id(3)

  @pl.when(j == 0)
  def _init():
    acc_scr[...] = jnp.zeros(acc_scr.shape, jnp.float32)

  @pl.when((j >= lo_ref[b, i]) & (j < hi_ref[b, i]))
  def _compute():
    mask = (_col(qseg_ref) == kseg_ref[...]) & (kseg_ref[...] != 0)
    if causal:
      mask = mask & (kpos_ref[...] <= _col(qpos_ref))
    k = k_ref[...]
    p = jnp.where(mask, jnp.exp(_dot_nt(q_ref[...], k) * scale - _col(lse_ref)), 0.0)
    ds = p * (_dot_nt(do_ref[...], v_ref[...]) - _col(delta_ref))
    acc_scr[...] += _dot_nn(ds.astype(k.dtype), k)

  @pl.when(j == num_kb - 1)
  def _finish():
    dq_ref[...] = (acc_scr[...] * scale).astype(dq_ref.dtype)


def _dkv_kernel(
  lo_ref, hi_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, qseg_ref, qpos_ref, kseg_ref, kpos_ref, dk_ref,
  dv_ref, dk_scr, dv_scr, *, scale: float, causal: bool, num_rb: int,
):  # fmt: skip
  # Transposed orientation (keys x rows): the rows' lse / delta / ids broadcast along sublanes as stored.
  b, j, i = pl.program_id(0), pl.program_id(2), pl.program_id(3)

  @pl.when(i == 0)
  def _init():
    dk_scr[...] = jnp.zeros(dk_scr.shape, jnp.float32)
    dv_scr[...] = jnp.zeros(dv_scr.shape, jnp.float32)

  @pl.when((i >= lo_ref[b, j]) & (i < hi_ref[b, j]))
  def _compute():
    ks = _col(kseg_ref)  # (bk, 1)
    mask = (ks == qseg_ref[...]) & (ks != 0)  # (bk, bq)
    if causal:
      mask = mask & (_col(kpos_ref) <= qpos_ref[...])
    q, do = q_ref[...], do_ref[...]
    pt = jnp.where(mask, jnp.exp(_dot_nt(k_ref[...], q) * scale - lse_ref[...]), 0.0)
    dv_scr[...] += _dot_nn(pt.astype(do.dtype), do)
    dst = pt * (_dot_nt(v_ref[...], do) - delta_ref[...])
    dk_scr[...] += _dot_nn(dst.astype(q.dtype), q)

  @pl.when(i == num_rb - 1)
  def _finish():
    dk_ref[...] = (dk_scr[...] * scale).astype(dk_ref.dtype)
    dv_ref[...] = dv_scr[...].astype(dv_ref.dtype)


def _vsum_kernel(need_ref, v_ref, o_ref):
  b, j = pl.program_id(0), pl.program_id(2)

  @pl.when(j == 0)
  def _init():
    o_ref[...] = jnp.zeros(o_ref.shape, o_ref.dtype)

  @pl.when(need_ref[b] != 0)
  def _add():
    o_ref[...] += jnp.sum(v_ref[...].astype(jnp.float32), axis=0, keepdims=True)


def _visibility(qseg_r, qpos_r, kseg, kpos, bq: int, bk: int, causal: bool):
  """(B, row blocks, key blocks) bool: which key blocks a row block may see (from the blocks' id summaries)."""
  qmin, qmax, _, qpmax = blocks.block_summaries(qseg_r, qpos_r, bq)
  kmin, kmax, kpmin, _ = blocks.block_summaries(kseg, kpos, bk)
  vis = (kmin[:, None, :] <= qmax[:, :, None]) & (kmax[:, None, :] >= qmin[:, :, None])
  if causal:
    vis = vis & (kpmin[:, None, :] <= qpmax[:, :, None])
  return vis


def _ranges(vis):
  """[lo, hi) of the True entries along the last axis, int32 (lo = hi when none): the loop of a kernel program.
  Visible blocks form one contiguous run for every mask here (segments are contiguous, causality is monotone)."""
  n = vis.shape[-1]
  idx = jnp.arange(n, dtype=jnp.int32)
  lo = jnp.min(jnp.where(vis, idx, n), -1).astype(jnp.int32)
  hi = jnp.max(jnp.where(vis, idx + 1, 0), -1).astype(jnp.int32)
  return lo, jnp.maximum(hi, lo)


@dataclasses.dataclass(frozen=True)
class _Plan:
  """Static sizes of one call: rows = T * G query rows per KV head (row t * G + j = token t, head k * G + j)."""

  causal: bool
  scale: float
  interpret: bool
  groups: int
  rows: int
  bq: int
  bk: int
  rows_pad: int
  s: int
  s_pad: int

  @property
  def grid_rows(self) -> int:
    return self.rows_pad // self.bq

  @property
  def grid_keys(self) -> int:
    return self.s_pad // self.bk


def _make_plan(q, k, causal, scale, interpret) -> _Plan:
  b, t, h, d = q.shape
  kh, s = k.shape[1], k.shape[2]
  rows = t * (h // kh)
  bq = min(256, _round_up(rows, SUBLANES))  # lane-major row vectors: a multiple of 128, or all rows
  bk = min(512, _round_up(s, LANES))
  return _Plan(
    bool(causal), float(scale), bool(interpret), h // kh, rows, bq, bk, _round_up(rows, bq), s, _round_up(s, bk)
  )


def _clamped(j, lo, hi, n: int):
  """Block index j kept inside [lo, hi): outside its range a program keeps pointing at a block it reads anyway
  (no new copy is issued for a repeated block index)."""
  return jnp.minimum(jnp.clip(j, lo, jnp.maximum(hi - 1, lo)), n - 1)


def _layout(q, k, v, qseg, kseg, qpos, kpos, plan: _Plan):
  """Rows (B, K, rows_pad, D), padded heads-major K/V, lane-major ids (B, 1, n) and the visibility matrix."""
  b, t, h, d = q.shape
  kh = k.shape[1]
  qr = q.reshape(b, t, kh, plan.groups, d).transpose(0, 2, 1, 3, 4).reshape(b, kh, plan.rows, d)
  qr = _pad_axis(qr, 2, plan.rows_pad)
  kp, vp = _pad_axis(k, 2, plan.s_pad), _pad_axis(v, 2, plan.s_pad)
  rid = lambda x: _pad_axis(jnp.repeat(x, plan.groups, axis=1), 1, plan.rows_pad)  # noqa: E731
  qseg_r, qpos_r = rid(qseg), rid(qpos)
  kseg_p, kpos_p = _pad_axis(kseg, 1, plan.s_pad), _pad_axis(kpos, 1, plan.s_pad)
  vis = _visibility(qseg_r, qpos_r, kseg_p, kpos_p, plan.bq, plan.bk, plan.causal)
  ids = tuple(x[:, None, :] for x in (qseg_r, qpos_r, kseg_p, kpos_p))
  return qr, kp, vp, ids, vis


def _from_rows(x, t: int, plan: _Plan):
  b, kh, _, d = x.shape
  x = x[:, :, : plan.rows].reshape(b, kh, t, plan.groups, d)
  return x.transpose(0, 2, 1, 3, 4).reshape(b, t, kh * plan.groups, d)


def _call(kernel, plan: _Plan, grid, in_specs, out_specs, out_shape, scratch, name, *args):
  return pl.pallas_call(
    kernel,
    grid_spec=pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=2, grid=grid, in_specs=in_specs, out_specs=out_specs, scratch_shapes=scratch
    ),
    out_shape=out_shape,
    compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
    interpret=_interpret(plan.interpret),
    name=name,
  )(*args)


def _specs(plan: _Plan, d: int, rows_outer: bool):
  """BlockSpecs of (rows, K/V, row vectors, key vectors) for a grid (B, K, outer, inner) whose inner axis walks
  key blocks (rows_outer) or row blocks, clamped to the scalar-prefetched visible range of the outer block."""
  bq, bk = plan.bq, plan.bk
  if rows_outer:
    r_idx = lambda b, i, j, lo, hi: i  # noqa: E731
    k_idx = lambda b, i, j, lo, hi: _clamped(j, lo[b, i], hi[b, i], plan.grid_keys)  # noqa: E731
  else:
    r_idx = lambda b, j, i, lo, hi: _clamped(i, lo[b, j], hi[b, j], plan.grid_rows)  # noqa: E731
    k_idx = lambda b, j, i, lo, hi: j  # noqa: E731
  rows = pl.BlockSpec((None, None, bq, d), lambda b, h, x, y, lo, hi: (b, h, r_idx(b, x, y, lo, hi), 0))
  keys = pl.BlockSpec((None, None, bk, d), lambda b, h, x, y, lo, hi: (b, h, k_idx(b, x, y, lo, hi), 0))
  row_vec = pl.BlockSpec((None, None, 1, bq), lambda b, h, x, y, lo, hi: (b, h, 0, r_idx(b, x, y, lo, hi)))
  row_ids = pl.BlockSpec((None, 1, bq), lambda b, h, x, y, lo, hi: (b, 0, r_idx(b, x, y, lo, hi)))
  key_ids = pl.BlockSpec((None, 1, bk), lambda b, h, x, y, lo, hi: (b, 0, k_idx(b, x, y, lo, hi)))
  return rows, keys, row_vec, row_ids, key_ids


def _forward(q, k, v, qseg, kseg, qpos, kpos, plan: _Plan):
  """Returns (out (B, T, H, D), residuals for the backward)."""
  b, t, h, d = q.shape
  kh = k.shape[1]
  qr, kp, vp, ids, vis = _layout(q, k, v, qseg, kseg, qpos, kpos, plan)
  lo, hi = _ranges(vis)
  rows, keys, row_vec, row_ids, key_ids = _specs(plan, d, rows_outer=True)
  kernel = functools.partial(_fwd_kernel, scale=plan.scale, causal=plan.causal, num_kb=plan.grid_keys)
  o_rows, lse = _call(
    kernel, plan, (b, kh, plan.grid_rows, plan.grid_keys),
    [rows, keys, keys, row_ids, row_ids, key_ids, key_ids], [rows, row_vec],
    [jax.ShapeDtypeStruct(qr.shape, q.dtype), jax.ShapeDtypeStruct((b, kh, 1, plan.rows_pad), jnp.float32)],
    [pltpu.VMEM((plan.bq, 1), jnp.float32)] * 2 + [pltpu.VMEM((plan.bq, d), jnp.float32)],
    "deepeyes_tpu_attention_fwd", lo, hi, qr, kp, vp, *ids,
  )  # fmt: skip
  # Rows that saw no key: the mean of the S values of their KV head, summed only for the batch rows that need it.
  empty = jnp.isneginf(lse[:, :, 0, : plan.rows])  # (B, K, rows)
  need = jnp.any(empty, axis=(1, 2)).astype(jnp.int32)
  vsum = pl.pallas_call(
    _vsum_kernel,
    grid_spec=pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=1,
      grid=(b, kh, plan.grid_keys),
      in_specs=[pl.BlockSpec((None, None, plan.bk, d), lambda bi, hh, j, nd: (bi, hh, j * nd[bi], 0))],
      out_specs=pl.BlockSpec((None, None, 1, d), lambda bi, hh, j, nd: (bi, hh, 0, 0)),
    ),
    out_shape=jax.ShapeDtypeStruct((b, kh, 1, d), jnp.float32),
    compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary")),
    interpret=_interpret(plan.interpret),
    name="deepeyes_tpu_value_sum",
  )(need, vp)
  out = o_rows[:, :, : plan.rows]
  out = jnp.where(empty[..., None], (vsum / plan.s).astype(out.dtype), out)
  return _from_rows(out, t, plan), (qr, kp, vp, ids, vis, o_rows, lse)


def _backward(plan: _Plan, t: int, res, dout):
  qr, kp, vp, ids, vis, o_rows, lse = res
  b, kh, _, d = qr.shape
  do = dout.astype(qr.dtype).reshape(b, t, kh, plan.groups, d).transpose(0, 2, 1, 3, 4).reshape(b, kh, plan.rows, d)
  do = _pad_axis(do, 2, plan.rows_pad)
  delta = jnp.sum(do.astype(jnp.float32) * o_rows.astype(jnp.float32), axis=-1)[:, :, None, :]  # (B, K, 1, R)
  empty = jnp.isneginf(lse)
  lse_safe = jnp.where(empty, 0.0, lse)

  lo, hi = _ranges(vis)
  rows, keys, row_vec, row_ids, key_ids = _specs(plan, d, rows_outer=True)
  dq = _call(
    functools.partial(_dq_kernel, scale=plan.scale, causal=plan.causal, num_kb=plan.grid_keys), plan,
    (b, kh, plan.grid_rows, plan.grid_keys),
    [rows, keys, keys, rows, row_vec, row_vec, row_ids, row_ids, key_ids, key_ids], rows,
    jax.ShapeDtypeStruct(qr.shape, qr.dtype), [pltpu.VMEM((plan.bq, d), jnp.float32)],
    "deepeyes_tpu_attention_dq", lo, hi, qr, kp, vp, do, lse_safe, delta, *ids,
  )  # fmt: skip

  lo_t, hi_t = _ranges(vis.transpose(0, 2, 1))
  rows, keys, row_vec, row_ids, key_ids = _specs(plan, d, rows_outer=False)
  dk, dv = _call(
    functools.partial(_dkv_kernel, scale=plan.scale, causal=plan.causal, num_rb=plan.grid_rows), plan,
    (b, kh, plan.grid_keys, plan.grid_rows),
    [rows, keys, keys, rows, row_vec, row_vec, row_ids, row_ids, key_ids, key_ids], [keys, keys],
    [jax.ShapeDtypeStruct(kp.shape, kp.dtype), jax.ShapeDtypeStruct(vp.shape, vp.dtype)],
    [pltpu.VMEM((plan.bk, d), jnp.float32), pltpu.VMEM((plan.bk, d), jnp.float32)],
    "deepeyes_tpu_attention_dkv", lo_t, hi_t, qr, kp, vp, do, lse_safe, delta, *ids,
  )  # fmt: skip
  # Rows that saw no key output mean(v): every key of their KV head gets d out / S from each of them.
  dv_empty = jnp.sum(jnp.where(empty[:, :, 0, :, None], do.astype(jnp.float32), 0.0), axis=2) / plan.s  # (B, K, D)
  dv = dv[:, :, : plan.s].astype(jnp.float32) + dv_empty[:, :, None]
  return _from_rows(dq, t, plan), dk[:, :, : plan.s], dv.astype(vp.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(7,))
def _flash(q, k, v, qseg, kseg, qpos, kpos, plan: _Plan):
  return _forward(q, k, v, qseg, kseg, qpos, kpos, plan)[0]


def _flash_fwd(q, k, v, qseg, kseg, qpos, kpos, plan: _Plan):
  out, res = _forward(q, k, v, qseg, kseg, qpos, kpos, plan)
  return out, (res, q.shape[1])


def _flash_bwd(plan: _Plan, saved, dout):
  res, t = saved
  dq, dk, dv = _backward(plan, t, res, dout)
  return dq, dk, dv, None, None, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)


def segment_attention(q, k, v, qseg, kseg, qpos, kpos, *, causal: bool, scale: float, interpret: bool = False):
  """q (B, T, H, D) against heads-major k, v (B, K, S, D); ids (B, T) / (B, S) int32 -> (B, T, H, D), with a
  gradient (our dQ and dK/dV kernels). General segments and slot causality; any T and S."""

  def local(q, k, v, qseg, kseg, qpos, kpos):
    return _flash(q, k, v, qseg, kseg, qpos, kpos, _make_plan(q, k, causal, scale, interpret))

  fn = _per_shard(local, q.shape[0], k.shape[1], ("q", "kvh", "kvh", "row", "row", "row", "row"), "q")
  return fn(q, k, v, qseg, kseg, qpos, kpos)


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
  interpret: bool = False,
):
  """`attention.attention` on TPU: causal self-attention (q and k/v the same sequence: T == S, the same segment-id
  and position arrays for both) through splash; everything else (a heads-major KV cache: extend and decode; the
  vision tower's non-causal segments) through `segment_attention`."""
  b, t, h, d = q.shape
  scale = float(d**-0.5 if scale is None else scale)
  if causal and (q_positions is None or kv_positions is None):
    raise ValueError("causal attention needs q_positions and kv_positions")
  dtype = jnp.result_type(q, k, v)
  q, k, v = q.astype(dtype), k.astype(dtype), v.astype(dtype)
  self_attention = (
    not kv_heads_major and k.shape[1] == t and q_segment_ids is kv_segment_ids and q_positions is kv_positions
  )
  if causal and self_attention:
    seg = jnp.ones((b, t), jnp.int32) if q_segment_ids is None else q_segment_ids.astype(jnp.int32)
    return splash_causal_attention(q, k, v, seg, scale=scale, interpret=interpret)
  if not kv_heads_major:  # (B, S, K, D) -> the kernels' heads-major layout
    k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
  ids = blocks.dense_ids(q_segment_ids, kv_segment_ids, q_positions, kv_positions, causal, b, t, k.shape[2])
  return segment_attention(q, k, v, *ids, causal=causal, scale=scale, interpret=interpret)
