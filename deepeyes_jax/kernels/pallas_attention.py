"""Flash attention in Pallas for the `attention.attention` interface (segment ids, token-slot causality, GQA).

Semantics are those of `attention.xla_attention` (the reference): a query sees a key iff both carry the same non-zero
segment id and, when `causal`, kv_position <= q_position; softmax in fp32; a row that sees no key returns the mean
of all S values (and its gradient is the reference's: d v += d out / S, nothing for q and k).

Layout. The G = H // K query heads that share a KV head are folded into the query axis: q (B, T, H, D) becomes
"rows" (B, K, T * G, D) with row t * G + j = (token t, head k * G + j), and the segment ids / positions are
repeated G times. A program then owns a block of rows of one KV head and streams that head's K/V blocks once for
all G heads (GQA costs no extra K/V traffic), and decode (T = 1) has G rows per program instead of one, so the
same kernel serves prefill, extend, decode and training. K and V stay in their native layout, (B, S, K, D) or the
KV cache's heads-major (B, K, S, D) (the BlockSpec squeezes the head axis), so the cache is never copied or
transposed; q, the output and dO are
transposed (cheap next to attention). T * G and S are padded to block multiples inside (padded keys get segment 0,
padded rows segment 0, both sliced off); D is padded with zeros to a power of two >= 16 on GPU (Triton needs
power-of-two tiles: 80 -> 128), left as is elsewhere.

Forward kernel (grid: row blocks x KV splits x B x K). Online softmax in base 2 (logits * scale * log2 e, `exp2`)
with fp32 accumulators (acc, running max m, running sum l); masked logits are replaced by -1e30 AND their
probabilities forced to 0, so a row that has seen only masked keys keeps l = 0 (no NaN, no spurious mass). The
mask is computed in the kernel from the segment / position vectors of the row block and the key block. Key-block
skipping: per key block the wrapper computes (min and max non-zero segment, min position of a non-padding key);
the kernel compares them with its row block's (min and max non-zero segment, max position) and loops
only from the first to the last key block that can be visible (a contiguous range for windows, packed causal rows
and ragged decode caches, whose blocks beyond the length are all segment 0). The loop has data-dependent bounds
and no branch inside, so it stays pipelinable. The kernel writes the normalised output and lse = m + log2 l
(-inf for a row with no visible key). A real row with no visible key (a padded query token, an unused decode slot)
gets the mean of the S values, computed in the kernel behind a branch, so only a program that has such a row reads
V a second time (no extra pass over the cache in ordinary decode). Decode: when row blocks x B x K programs are too
few to fill the GPU, the key range is split over a grid axis (flash-decoding; the wrapper then also computes which
tokens see no key at all from the ids, O(B T S) integer work with T small); the splits' (output, lse) are merged in
XLA.

Backward (Pallas, two kernels, FlashAttention-2 style): delta = rowsum(dO * O) in XLA; a dQ kernel (grid: row
blocks x B x K, loop over visible key blocks) and a dK/dV kernel (grid: key blocks x B x K, loop over visible row
blocks, with the row-block summaries computed by the wrapper). Probabilities are recomputed from the saved lse;
because the rows of a program are all G heads of the group, dK/dV are summed over the group inside the kernel.
The empty-row term (d v += d out / S) is added in XLA. Nothing falls back to the XLA reference.

Why not jax's own Pallas ops: `pallas.ops.gpu.attention.mha` takes one segment-id vector for both q and kv (so
T == S: no extend/decode against a cache), causality by index rather than by token slot, K == H (GQA would need
K/V repeated), and no fully-masked-row convention; `pallas.ops.gpu.decode_attention` takes a contiguous
[start, end) per row, not segment ids; `pallas.ops.tpu.flash_attention` / splash attention are TPU-only (Mosaic)
with index-based causality. None fits packed rows + slot positions + cache lengths at once, and routing only the
subset that fits would need value-dependent checks (segment ids that are a prefix mask) that cannot be made under
jit; this kernel covers all of them with one code path.

Backends: on CPU the kernels run with `interpret=True` (what the tests exercise). On GPU they are compiled with
the Triton lowering, selected explicitly through `pallas.triton.CompilerParams` (jax's default GPU lowering is now
Mosaic GPU); they are written for it: power-of-two tiles, 2-D dots with M, N, K >= 16, `fori_loop` with dynamic
bounds, no scalar refs (checked on H100/H200, docs/benchmarks.md). They do not lower with Mosaic (1-D vectors,
squeezed second-minor block dims): on TPU `pallas_attention` routes to `tpu_attention`, which is written for it.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from deepeyes_jax.kernels import blocks, platform, tpu_attention
from deepeyes_jax.kernels.blocks import INT_MAX, INT_MIN

LOG2E = math.log2(math.e)
MASK_VALUE = -1e30  # masked (base-2) logit; its probability is also forced to 0
_round_up, _pad_axis = blocks.round_up, blocks.pad_axis


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Tile sizes (rows = query tokens x heads of a KV group). Powers of two; clipped to the problem size.

  `num_splits` None picks one from the device's core count on GPU (1 elsewhere); `pow2_head_dim` None pads D to a
  power of two on GPU only; `num_warps` None picks 4 for D <= 64 else 8 (GPU only).
  """

  block_q: int = 128
  block_k: int = 64
  block_q_bwd: int = 64
  block_k_bwd: int = 64
  num_splits: int | None = None
  pow2_head_dim: bool | None = None
  num_warps: int | None = None
  num_stages: int = 2


DEFAULT_BLOCK_SIZES = BlockSizes()


# ------------------------------------------------------------------------------------------------------------------
# Helpers
# ------------------------------------------------------------------------------------------------------------------
def _next_pow2(x: int) -> int:
  return 1 << max(0, int(x) - 1).bit_length()


def _dot_nt(a, b):  # a @ b.T
  return lax.dot_general(a, b, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)


def _dot_nn(a, b):  # a @ b
  return lax.dot_general(a, b, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)


def _dot_tn(a, b):  # a.T @ b
  return lax.dot_general(a, b, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)


def _mask(qs, qp, ks, kp, causal: bool):
  """(rows, keys) visibility from 1-D segment ids / positions."""
  m = (qs[:, None] == ks[None, :]) & (ks[None, :] != 0)
  if causal:
    m = m & (kp[None, :] <= qp[:, None])
  return m


def _fold_block(carry, q, k, v, mask, scale2: float):
  """One key block folded into the online softmax (base 2, fp32 accumulators): carry (acc (rows, D), running max
  (rows,), running sum (rows,)). Masked logits are MASK_VALUE and their probabilities 0, so a row that has seen only
  masked keys keeps a zero sum (no NaN, no spurious mass)."""
  acc, m, denom = carry
  s = jnp.where(mask, _dot_nt(q, k) * scale2, MASK_VALUE)
  m_new = jnp.maximum(m, jnp.max(s, axis=-1))
  alpha = jnp.exp2(m - m_new)
  p = jnp.where(mask, jnp.exp2(s - m_new[:, None]), 0.0)
  denom = alpha * denom + jnp.sum(p, axis=-1)
  acc = alpha[:, None] * acc + _dot_nn(p.astype(v.dtype), v)
  return acc, m_new, denom


def _seg_summary(seg):
  """(min, max) non-zero segment id of a 1-D block, as scalars; (INT_MAX, INT_MIN) when all are padding."""
  live = seg != 0
  return jnp.min(jnp.where(live, seg, INT_MAX)), jnp.max(jnp.where(live, seg, INT_MIN))


def _visible_range(vis, start, stop):
  """[lo, hi) of the True entries of a 1-D bool vector, clipped to [start, stop)."""
  n = vis.shape[0]
  idx = lax.broadcasted_iota(jnp.int32, (n,), 0)
  lo = jnp.min(jnp.where(vis, idx, n))
  hi = jnp.max(jnp.where(vis, idx + 1, 0))
  return jnp.maximum(lo, start), jnp.minimum(hi, stop)


def _block_summaries(seg, pos, block: int, n_pad: int):
  """`blocks.block_summaries`, each padded to (B, n_pad) with values that make the extra blocks invisible."""
  fill = (INT_MAX, INT_MIN, INT_MAX, INT_MIN)
  return tuple(_pad_axis(x, 1, n_pad, f) for x, f in zip(blocks.block_summaries(seg, pos, block), fill))


# ------------------------------------------------------------------------------------------------------------------
# Kernels
# ------------------------------------------------------------------------------------------------------------------
def _fwd_kernel(
  q_ref,
  k_ref,
  v_ref,
  qseg_ref,
  qpos_ref,
  kseg_ref,
  kpos_ref,
  kmin_ref,
  kmax_ref,
  kpmin_ref,
  *refs,
  scale2: float,
  causal: bool,
  block_k: int,
  num_kb: int,
  kb_per_split: int,
  rows_real: int,
  s_real: int,
):
  if len(refs) == 3:  # split keys: which rows see no key at all is computed by the wrapper
    empty_ref, o_ref, lse_ref = refs
  else:
    empty_ref, (o_ref, lse_ref) = None, refs
  split = pl.program_id(1)
  q = q_ref[...]
  qs = qseg_ref[...]
  qp = qpos_ref[...]
  qmin, qmax = _seg_summary(qs)
  vis = (kmin_ref[...] <= qmax) & (kmax_ref[...] >= qmin)
  if causal:
    vis = vis & (kpmin_ref[...] <= jnp.max(jnp.where(qs != 0, qp, INT_MIN)))
  start = split * kb_per_split
  stop = jnp.minimum(start + kb_per_split, num_kb)
  lo, hi = _visible_range(vis, start, stop)

  def body(j, carry):
    sl = pl.ds(pl.multiple_of(j * block_k, block_k), block_k)
    return _fold_block(carry, q, k_ref[sl, :], v_ref[sl, :], _mask(qs, qp, kseg_ref[sl], kpos_ref[sl], causal), scale2)

  rows, dp = q.shape
  init = (
    jnp.zeros((rows, dp), jnp.float32),
    jnp.full((rows,), MASK_VALUE, jnp.float32),
    jnp.zeros((rows,), jnp.float32),
  )
  acc, m, denom = lax.fori_loop(lo, hi, body, init)
  empty = denom == 0.0
  denom = jnp.where(empty, 1.0, denom)
  o = acc / denom[:, None]

  # Rows (not padding rows) that see no key output the mean of the S values, as the reference's uniform softmax
  # does. Only a program that has such a row reads V once more (padded query tokens, unused decode slots).
  real = pl.program_id(0) * rows + lax.broadcasted_iota(jnp.int32, (rows,), 0) < rows_real
  need = (empty if empty_ref is None else empty_ref[...] != 0) & real

  def v_sum():
    def add(j, total):
      sl = pl.ds(pl.multiple_of(j * block_k, block_k), block_k)
      return total + jnp.sum(v_ref[sl, :].astype(jnp.float32), axis=0)

    # With split keys each split sums its own range (the merge adds them up); padded keys are zeros.
    lo_v, hi_v = (0, num_kb) if empty_ref is None else (start, stop)
    return lax.fori_loop(lo_v, hi_v, add, jnp.zeros((dp,), jnp.float32))

  any_need = jnp.max(jnp.where(need, 1, 0)) > 0
  total = lax.cond(any_need, v_sum, lambda: jnp.zeros((dp,), jnp.float32))
  o = jnp.where(need[:, None], total[None, :] * (1.0 / s_real), o)
  o_ref[...] = o.astype(o_ref.dtype)
  lse_ref[...] = jnp.where(empty, -jnp.inf, m + jnp.log2(denom))


def _dq_kernel(
  q_ref,
  k_ref,
  v_ref,
  do_ref,
  lse_ref,
  delta_ref,
  qseg_ref,
  qpos_ref,
  kseg_ref,
  kpos_ref,
  kmin_ref,
  kmax_ref,
  kpmin_ref,
  dq_ref,
  *,
  scale: float,
  causal: bool,
  block_k: int,
  num_kb: int,
):
  q = q_ref[...]
  do = do_ref[...]
  lse = lse_ref[...]
  delta = delta_ref[...]
  qs = qseg_ref[...]
  qp = qpos_ref[...]
  qmin, qmax = _seg_summary(qs)
  vis = (kmin_ref[...] <= qmax) & (kmax_ref[...] >= qmin)
  if causal:
    vis = vis & (kpmin_ref[...] <= jnp.max(jnp.where(qs != 0, qp, INT_MIN)))
  lo, hi = _visible_range(vis, 0, num_kb)

  def body(j, dq):
    sl = pl.ds(pl.multiple_of(j * block_k, block_k), block_k)
    k = k_ref[sl, :]
    v = v_ref[sl, :]
    mask = _mask(qs, qp, kseg_ref[sl], kpos_ref[sl], causal)
    p = jnp.where(mask, jnp.exp2(_dot_nt(q, k) * (scale * LOG2E) - lse[:, None]), 0.0)
    ds = p * (_dot_nt(do, v) - delta[:, None])
    return dq + _dot_nn(ds.astype(k.dtype), k)

  dq = lax.fori_loop(lo, hi, body, jnp.zeros(q.shape, jnp.float32))
  dq_ref[...] = (dq * scale).astype(dq_ref.dtype)


def _dkv_kernel(
  q_ref,
  k_ref,
  v_ref,
  do_ref,
  lse_ref,
  delta_ref,
  qseg_ref,
  qpos_ref,
  kseg_ref,
  kpos_ref,
  qmin_ref,
  qmax_ref,
  qpmax_ref,
  dk_ref,
  dv_ref,
  *,
  scale: float,
  causal: bool,
  block_q: int,
  num_qb: int,
):
  k = k_ref[...]
  v = v_ref[...]
  ks = kseg_ref[...]
  kp = kpos_ref[...]
  kmin, kmax = _seg_summary(ks)
  vis = (qmin_ref[...] <= kmax) & (qmax_ref[...] >= kmin)
  if causal:
    vis = vis & (qpmax_ref[...] >= jnp.min(jnp.where(ks != 0, kp, INT_MAX)))
  lo, hi = _visible_range(vis, 0, num_qb)

  def body(i, carry):
    dk, dv = carry
    sl = pl.ds(pl.multiple_of(i * block_q, block_q), block_q)
    q = q_ref[sl, :]
    do = do_ref[sl, :]
    lse = lse_ref[sl]
    delta = delta_ref[sl]
    mask = _mask(qseg_ref[sl], qpos_ref[sl], ks, kp, causal)
    p = jnp.where(mask, jnp.exp2(_dot_nt(q, k) * (scale * LOG2E) - lse[:, None]), 0.0)
    dv = dv + _dot_tn(p.astype(do.dtype), do)
    ds = p * (_dot_nt(do, v) - delta[:, None])
    dk = dk + _dot_tn(ds.astype(q.dtype), q)
    return dk, dv

  zeros = jnp.zeros(k.shape, jnp.float32)
  dk, dv = lax.fori_loop(lo, hi, body, (zeros, zeros))
  dk_ref[...] = (dk * scale).astype(dk_ref.dtype)
  dv_ref[...] = dv.astype(dv_ref.dtype)


# ------------------------------------------------------------------------------------------------------------------
# Wrapper: layout, padding, pallas_call, custom VJP
# ------------------------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class _Plan:
  """Static sizes of one call (hashable: a nondiff argument of the custom VJP)."""

  causal: bool
  scale: float
  groups: int  # G = H // K
  dp: int  # padded head dim
  bq: int  # forward row block
  bk: int  # forward key block
  bq_bwd: int
  bk_bwd: int
  rows_pad: int
  s_pad: int
  num_splits: int
  interpret: bool
  num_warps: int | None
  num_stages: int
  kv_heads_major: bool = False  # K/V (B, K, S, D) (a KV cache) instead of (B, S, K, D)


def _compiler_params(plan: _Plan):
  """Triton compiler params whenever compiled (not interpreted). Passing them also selects the Triton lowering:
  jax >= 0.9 lowers a plain GPU `pallas_call` with Mosaic GPU, which these kernels are not written for."""
  if plan.interpret:
    return None
  from jax.experimental.pallas import triton as plgpu

  warps = plan.num_warps or (4 if plan.dp <= 64 else 8)
  return plgpu.CompilerParams(num_warps=warps, num_stages=plan.num_stages)


def _kv_dims(k, heads_major: bool) -> tuple[int, int]:
  """(S, K) of keys in either layout."""
  return (k.shape[2], k.shape[1]) if heads_major else (k.shape[1], k.shape[2])


def _make_plan(
  q, k, causal, scale, sizes: BlockSizes, interpret: bool | None, kv_heads_major: bool = False, target: str = "gpu"
) -> _Plan:
  b, t, h, d = q.shape
  s, kh = _kv_dims(k, kv_heads_major)
  if interpret is None:
    interpret = target == "cpu"
  gpu = target == "gpu" and not interpret
  pow2_d = gpu if sizes.pow2_head_dim is None else sizes.pow2_head_dim
  dp = _next_pow2(max(d, 16)) if pow2_d else d
  g = h // kh
  rows = t * g
  min_tile = 16  # Triton dots need M, N, K >= 16
  bq = min(sizes.block_q, _next_pow2(max(rows, min_tile)))
  bk = min(sizes.block_k, _next_pow2(max(s, min_tile)))
  bq_bwd = min(sizes.block_q_bwd, _next_pow2(max(rows, min_tile)))
  bk_bwd = min(sizes.block_k_bwd, _next_pow2(max(s, min_tile)))
  rows_pad = _round_up(rows, max(bq, bq_bwd))
  s_pad = _round_up(s, max(bk, bk_bwd))
  num_kb = s_pad // bk
  splits = sizes.num_splits
  if splits is None:
    splits = 1
    if gpu:
      cores = getattr(jax.devices()[0], "core_count", None) or 108
      programs = (rows_pad // bq) * b * kh
      splits = max(1, min(num_kb // 4, -(-2 * cores // programs)))  # >= 4 key blocks per split
  splits = max(1, min(splits, num_kb))
  return _Plan(
    causal=bool(causal),
    scale=float(d**-0.5 if scale is None else scale),
    groups=g,
    dp=dp,
    bq=bq,
    bk=bk,
    bq_bwd=bq_bwd,
    bk_bwd=bk_bwd,
    rows_pad=rows_pad,
    s_pad=s_pad,
    num_splits=splits,
    interpret=bool(interpret),
    num_warps=sizes.num_warps,
    num_stages=sizes.num_stages,
    kv_heads_major=bool(kv_heads_major),
  )


def _to_rows(x, kh: int, plan: _Plan):
  """(B, T, H, D) -> (B, K, rows_pad, dp), row t * G + j = (token t, head k * G + j)."""
  b, t, h, d = x.shape
  x = x.reshape(b, t, kh, plan.groups, d).transpose(0, 2, 1, 3, 4).reshape(b, kh, t * plan.groups, d)
  return _pad_axis(_pad_axis(x, 2, plan.rows_pad), 3, plan.dp)


def _from_rows(x, t: int, d: int, plan: _Plan):
  b, kh = x.shape[:2]
  x = x[:, :, : t * plan.groups, :d].reshape(b, kh, t, plan.groups, d)
  return x.transpose(0, 2, 1, 3, 4).reshape(b, t, kh * plan.groups, d)


def _row_meta(x, plan: _Plan):
  """(B, T) -> (B, rows_pad), repeated per head of the group; padding rows get 0."""
  return _pad_axis(jnp.repeat(x.astype(jnp.int32), plan.groups, axis=1), 1, plan.rows_pad)


def _kv_pad(x, plan: _Plan):
  return _pad_axis(_pad_axis(x, 2 if plan.kv_heads_major else 1, plan.s_pad), 3, plan.dp)


def _prepare(q, k, v, qseg, kseg, qpos, kpos, plan: _Plan):
  kh = _kv_dims(k, plan.kv_heads_major)[1]
  qr = _to_rows(q, kh, plan)
  kp_, vp_ = _kv_pad(k, plan), _kv_pad(v, plan)
  qseg_r, qpos_r = _row_meta(qseg, plan), _row_meta(qpos, plan)
  kseg_p = _pad_axis(kseg.astype(jnp.int32), 1, plan.s_pad)
  kpos_p = _pad_axis(kpos.astype(jnp.int32), 1, plan.s_pad)
  return qr, kp_, vp_, qseg_r, qpos_r, kseg_p, kpos_p


def _forward(q, k, v, qseg, kseg, qpos, kpos, plan: _Plan):
  """Returns (out (B, T, H, D), lse rows (B, K, rows_pad) in base 2, -inf on rows with no visible key)."""
  b, t, h, d = q.shape
  s, kh = _kv_dims(k, plan.kv_heads_major)
  qr, kp_, vp_, qseg_r, qpos_r, kseg_p, kpos_p = _prepare(q, k, v, qseg, kseg, qpos, kpos, plan)
  num_kb = plan.s_pad // plan.bk
  nk_pad = max(16, _next_pow2(num_kb))
  kmin, kmax, kpmin, _ = _block_summaries(kseg_p, kpos_p, plan.bk, nk_pad)
  num_rb = plan.rows_pad // plan.bq
  ns = plan.num_splits
  kb_per_split = -(-num_kb // ns)
  dp, bq = plan.dp, plan.bq

  row_spec = pl.BlockSpec((None, None, bq, dp), lambda i, sp, bi, hi: (bi, hi, i, 0))
  if plan.kv_heads_major:
    kv_spec = pl.BlockSpec((None, None, plan.s_pad, dp), lambda i, sp, bi, hi: (bi, hi, 0, 0))
  else:
    kv_spec = pl.BlockSpec((None, plan.s_pad, None, dp), lambda i, sp, bi, hi: (bi, 0, hi, 0))
  rmeta_spec = pl.BlockSpec((None, bq), lambda i, sp, bi, hi: (bi, i))
  kmeta_spec = pl.BlockSpec((None, plan.s_pad), lambda i, sp, bi, hi: (bi, 0))
  summ_spec = pl.BlockSpec((None, nk_pad), lambda i, sp, bi, hi: (bi, 0))
  if ns == 1:
    o_shape = jax.ShapeDtypeStruct((b, kh, plan.rows_pad, dp), q.dtype)
    lse_shape = jax.ShapeDtypeStruct((b, kh, plan.rows_pad), jnp.float32)
    o_spec, lse_spec = row_spec, pl.BlockSpec((None, None, bq), lambda i, sp, bi, hi: (bi, hi, i))
  else:
    o_shape = jax.ShapeDtypeStruct((ns, b, kh, plan.rows_pad, dp), jnp.float32)
    lse_shape = jax.ShapeDtypeStruct((ns, b, kh, plan.rows_pad), jnp.float32)
    o_spec = pl.BlockSpec((None, None, None, bq, dp), lambda i, sp, bi, hi: (sp, bi, hi, i, 0))
    lse_spec = pl.BlockSpec((None, None, None, bq), lambda i, sp, bi, hi: (sp, bi, hi, i))
  kernel = functools.partial(
    _fwd_kernel,
    scale2=plan.scale * LOG2E,
    causal=plan.causal,
    block_k=plan.bk,
    num_kb=num_kb,
    kb_per_split=kb_per_split,
    rows_real=t * plan.groups,
    s_real=s,
  )
  in_specs = [row_spec, kv_spec, kv_spec, rmeta_spec, rmeta_spec, kmeta_spec, kmeta_spec] + [summ_spec] * 3
  args = [qr, kp_, vp_, qseg_r, qpos_r, kseg_p, kpos_p, kmin, kmax, kpmin]
  if ns > 1:
    # Whether a token sees any key at all (integer work on the ids only: T is small when the keys are split).
    sees = (qseg[:, :, None] == kseg[:, None, :]) & (kseg[:, None, :] != 0)
    if plan.causal:
      sees = sees & (kpos[:, None, :] <= qpos[:, :, None])
    in_specs.append(rmeta_spec)
    args.append(_row_meta(~jnp.any(sees, axis=-1), plan))
  o, lse = pl.pallas_call(
    kernel,
    grid=(num_rb, ns, b, kh),
    in_specs=in_specs,
    out_specs=[o_spec, lse_spec],
    out_shape=[o_shape, lse_shape],
    interpret=plan.interpret,
    compiler_params=_compiler_params(plan),
    name="deepeyes_flash_fwd",
  )(*args)
  if ns > 1:  # merge the key splits (flash-decoding)
    m = jnp.max(lse, axis=0)
    m_safe = jnp.where(jnp.isfinite(m), m, 0.0)
    w = jnp.exp2(lse - m_safe)  # 0 for splits where the row sees nothing
    wsum = jnp.sum(w, axis=0)
    merged = jnp.sum(w[..., None] * o, axis=0) / jnp.where(wsum == 0, 1.0, wsum)[..., None]
    # A row that sees nothing anywhere holds partial sums of the values / S in every split: add them up.
    o = jnp.where((wsum == 0)[..., None], jnp.sum(o, axis=0), merged).astype(q.dtype)
    lse = jnp.where(wsum == 0, -jnp.inf, m_safe + jnp.log2(jnp.where(wsum == 0, 1.0, wsum)))
  return _from_rows(o, t, d, plan), lse


def _backward(plan: _Plan, res, dout):
  q, k, v, qseg, kseg, qpos, kpos, out, lse = res
  if plan.kv_heads_major:  # only decode reads a heads-major cache; a gradient through one takes the native path
    native = dataclasses.replace(plan, kv_heads_major=False)
    t_ = lambda x: x.transpose(0, 2, 1, 3)
    dq, dk, dv, *rest = _backward(native, (q, t_(k), t_(v), qseg, kseg, qpos, kpos, out, lse), dout)
    return (dq, t_(dk), t_(dv), *rest)
  b, t, h, d = q.shape
  s, kh = k.shape[1], k.shape[2]
  qr, kp_, vp_, qseg_r, qpos_r, kseg_p, kpos_p = _prepare(q, k, v, qseg, kseg, qpos, kpos, plan)
  dor = _to_rows(dout.astype(q.dtype), kh, plan)
  o_r = _to_rows(out, kh, plan)
  delta = jnp.sum(dor.astype(jnp.float32) * o_r.astype(jnp.float32), axis=-1)  # (B, K, rows_pad)
  empty = jnp.isneginf(lse)
  lse_safe = jnp.where(empty, 0.0, lse)
  dp = plan.dp

  # dQ: grid over row blocks, loop over key blocks.
  bq, bk = plan.bq_bwd, plan.bk_bwd
  num_kb = plan.s_pad // bk
  nk_pad = max(16, _next_pow2(num_kb))
  kmin, kmax, kpmin, _ = _block_summaries(kseg_p, kpos_p, bk, nk_pad)
  row_spec = pl.BlockSpec((None, None, bq, dp), lambda i, bi, hi: (bi, hi, i, 0))
  rvec_spec = pl.BlockSpec((None, None, bq), lambda i, bi, hi: (bi, hi, i))
  kv_spec = pl.BlockSpec((None, plan.s_pad, None, dp), lambda i, bi, hi: (bi, 0, hi, 0))
  rmeta_spec = pl.BlockSpec((None, bq), lambda i, bi, hi: (bi, i))
  kmeta_spec = pl.BlockSpec((None, plan.s_pad), lambda i, bi, hi: (bi, 0))
  summ_spec = pl.BlockSpec((None, nk_pad), lambda i, bi, hi: (bi, 0))
  dq = pl.pallas_call(
    functools.partial(_dq_kernel, scale=plan.scale, causal=plan.causal, block_k=bk, num_kb=num_kb),
    grid=(plan.rows_pad // bq, b, kh),
    in_specs=[row_spec, kv_spec, kv_spec, row_spec, rvec_spec, rvec_spec, rmeta_spec, rmeta_spec]
    + [kmeta_spec, kmeta_spec]
    + [summ_spec] * 3,
    out_specs=row_spec,
    out_shape=jax.ShapeDtypeStruct(qr.shape, q.dtype),
    interpret=plan.interpret,
    compiler_params=_compiler_params(plan),
    name="deepeyes_flash_bwd_dq",
  )(qr, kp_, vp_, dor, lse_safe, delta, qseg_r, qpos_r, kseg_p, kpos_p, kmin, kmax, kpmin)

  # dK, dV: grid over key blocks, loop over row blocks (all G heads of the group: summed over the group here).
  num_qb = plan.rows_pad // bq
  nq_pad = max(16, _next_pow2(num_qb))
  qmin, qmax, _, qpmax = _block_summaries(qseg_r, qpos_r, bq, nq_pad)
  rows_spec = pl.BlockSpec((None, None, plan.rows_pad, dp), lambda j, bi, hi: (bi, hi, 0, 0))
  rvecs_spec = pl.BlockSpec((None, None, plan.rows_pad), lambda j, bi, hi: (bi, hi, 0))
  rmetas_spec = pl.BlockSpec((None, plan.rows_pad), lambda j, bi, hi: (bi, 0))
  kblk_spec = pl.BlockSpec((None, bk, None, dp), lambda j, bi, hi: (bi, j, hi, 0))
  kmetab_spec = pl.BlockSpec((None, bk), lambda j, bi, hi: (bi, j))
  qsumm_spec = pl.BlockSpec((None, nq_pad), lambda j, bi, hi: (bi, 0))
  dk, dv = pl.pallas_call(
    functools.partial(_dkv_kernel, scale=plan.scale, causal=plan.causal, block_q=bq, num_qb=num_qb),
    grid=(num_kb, b, kh),
    in_specs=[rows_spec, kblk_spec, kblk_spec, rows_spec, rvecs_spec, rvecs_spec, rmetas_spec, rmetas_spec]
    + [kmetab_spec, kmetab_spec]
    + [qsumm_spec] * 3,
    out_specs=[kblk_spec, kblk_spec],
    out_shape=[jax.ShapeDtypeStruct(kp_.shape, k.dtype), jax.ShapeDtypeStruct(vp_.shape, v.dtype)],
    interpret=plan.interpret,
    compiler_params=_compiler_params(plan),
    name="deepeyes_flash_bwd_dkv",
  )(qr, kp_, vp_, dor, lse_safe, delta, qseg_r, qpos_r, kseg_p, kpos_p, qmin, qmax, qpmax)

  dq = _from_rows(dq, t, d, plan)
  dk = dk[:, :s, :, :d]
  dv = dv[:, :s, :, :d]
  # Empty rows output mean(v): every key gets d out / S from each of them.
  dv_empty = jnp.sum(jnp.where(empty[..., None], dor.astype(jnp.float32), 0.0), axis=2)[..., :d] / s  # (B, K, D)
  dv = (dv.astype(jnp.float32) + dv_empty[:, None]).astype(v.dtype)
  return dq, dk, dv, None, None, None, None


@functools.partial(jax.custom_vjp, nondiff_argnums=(7,))
def _flash(q, k, v, qseg, kseg, qpos, kpos, plan: _Plan):
  return _forward(q, k, v, qseg, kseg, qpos, kpos, plan)[0]


def _flash_fwd(q, k, v, qseg, kseg, qpos, kpos, plan: _Plan):
  out, lse = _forward(q, k, v, qseg, kseg, qpos, kpos, plan)
  return out, (q, k, v, qseg, kseg, qpos, kpos, out, lse)


_flash.defvjp(_flash_fwd, _backward)


def pallas_attention(
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
  block_sizes: BlockSizes = DEFAULT_BLOCK_SIZES,
  interpret: bool | None = None,
  kv_heads_major: bool = False,
) -> jax.Array:
  """`attention.attention` semantics with Pallas kernels (differentiable; see the module docstring).

  The kernels follow the platform the program is compiled for (`platform.target_platform()`): TPU gets
  `tpu_attention` (Mosaic), GPU and CPU the flash kernels of this module (Triton; interpret mode on CPU).
  `interpret` None: interpret mode when the devices that run the program are not the target's (CPU). `block_sizes`
  applies to this module's kernels. `kv_heads_major`:
  k, v are (B, K, S, D) (the KV cache's layout), read in place by the forward kernels.
  """
  b, t, h, d = q.shape
  s, kh = _kv_dims(k, kv_heads_major)
  layout = "(B, K, S, D)" if kv_heads_major else "(B, S, K, D)"
  if h % kh:
    raise ValueError(f"{h} query heads are not a multiple of {kh} KV heads (k {k.shape} read as {layout})")
  want = (b, kh, s, d) if kv_heads_major else (b, s, kh, d)
  if k.shape != want or v.shape != k.shape:
    raise ValueError(f"k {k.shape} and v {v.shape} must be {layout} matching q {q.shape}")
  if causal and (q_positions is None or kv_positions is None):
    raise ValueError("causal attention needs q_positions and kv_positions")
  meta = dict(
    q_segment_ids=q_segment_ids,
    kv_segment_ids=kv_segment_ids,
    q_positions=q_positions,
    kv_positions=kv_positions,
    causal=causal,
    scale=scale,
    kv_heads_major=kv_heads_major,
  )
  target = platform.target_platform()
  if target == "tpu":
    interp = platform.executing_platform() != "tpu" if interpret is None else bool(interpret)
    return tpu_attention.tpu_attention(q, k, v, interpret=interp, **meta)
  return _flash_attention(q, k, v, block_sizes=block_sizes, interpret=interpret, target=target, **meta)


# The target platform is a static argument: a trace made for one platform is never reused for another.
@functools.partial(jax.jit, static_argnames=("causal", "scale", "block_sizes", "interpret", "kv_heads_major", "target"))
def _flash_attention(
  q,
  k,
  v,
  *,
  q_segment_ids,
  kv_segment_ids,
  q_positions,
  kv_positions,
  causal,
  scale,
  block_sizes,
  interpret,
  kv_heads_major,
  target,
):
  b, t, h, d = q.shape
  s, kh = _kv_dims(k, kv_heads_major)
  dtype = jnp.result_type(q, k, v)
  q, k, v = q.astype(dtype), k.astype(dtype), v.astype(dtype)
  qseg, kseg, qpos, kpos = blocks.dense_ids(q_segment_ids, kv_segment_ids, q_positions, kv_positions, causal, b, t, s)
  plan = _make_plan(q, k, causal, scale, block_sizes, interpret, kv_heads_major, target)
  return _flash(q, k, v, qseg, kseg, qpos, kpos, plan)
