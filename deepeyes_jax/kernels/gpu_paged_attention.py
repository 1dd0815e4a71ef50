"""Attention of new tokens against a paged KV pool, reading the pages where they are (Pallas, Triton lowering).

The GPU (and CPU interpret) half of `paged_attention`'s "pallas" implementation; on TPU jax's ragged paged attention
does the same job. Nothing is gathered: a program streams one row's pages straight from the pool, so a decode step
reads each cached token once and moves no cache bytes besides.

Layout. The pool is (P, page, 2K, hd) with keys at even and values at odd combined heads (see `paged_attention`).
Two BlockSpecs over the same pool pick KV head k's keys (combined head 2k) and values (2k + 1), squeezing that axis,
so a program sees keys and values as (P, page, hd) without any copy. As in `pallas_attention`, the G = H // K query
heads of a KV group are folded into the query axis ("rows": row t * G + j = token t, head k * G + j), so the group's
pages are read once for all G heads and decode (N = 1) still gives G rows per program.

Kernel (grid: row blocks x key splits x B x K). A row block loads `pages_per_block` page ids of its row from the
page table at a time (one vector load), then the keys and values of those pages with one indexed load each,
(pages_per_block, page, hd) -> (block_k, hd), and folds them in with an online softmax in base 2 and fp32
accumulators (`pallas_attention._fold_block`). Visibility is the causal rule on slots: a query at slot p sees slots
<= p, all of which belong to its row (the engine writes the new tokens first, and a row's slots [0, kv_length) are
its own), so neither segment ids nor lengths are read; the loop stops at the block holding the largest slot of the
row block (a data-dependent bound, no branch inside). Padding queries (segment 0) get slot -1: they see nothing,
output zeros, and are discarded by the caller. When rows x KV heads are too few programs for the GPU (decode at a
small batch), the key blocks are split over a grid axis (flash-decoding) and the splits' outputs are merged by
their log-sum-exp in XLA.

Why not jax's `pallas.ops.gpu.paged_attention`: it takes one query token per row (no extend, no causal rule),
separate K and V pools laid out (K, P, page, hd), and K == H or an explicit GQA batch; our pool layout is fixed by
TPU's ragged paged attention, and transposing it per step would be the whole-cache copy this kernel exists to avoid.

Triton constraints (checked by lowering for CUDA in tests/test_kernels.py): power-of-two tiles, dots with M, N, K >=
16, so compiled kernels need a power-of-two page size and head_dim >= 16 (`supported`); other shapes take the
gathered-pages path in `paged_attention`. In interpret mode (CPU) any shape runs.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from deepeyes_jax.kernels import blocks, platform
from deepeyes_jax.kernels.pallas_attention import LOG2E, MASK_VALUE, _fold_block, _next_pow2

BLOCK_Q = 64  # query rows (tokens x heads of a group) per program, at most
BLOCK_K = 64  # keys per loop step, at least (whole pages: a page larger than this is one step)


def _pow2(x: int) -> bool:
  return x > 0 and x & (x - 1) == 0


def supported(page_size: int, head_dim: int, interpret: bool) -> bool:
  """Whether the kernel takes these shapes: always in interpret mode; compiled (Triton), power-of-two tiles."""
  return interpret or (_pow2(page_size) and _pow2(head_dim) and head_dim >= 16)


def _kernel(pt_ref, q_ref, qpos_ref, k_ref, v_ref, *out_refs, scale2: float, pages_per_block: int, blocks_per_split):
  """One row block of one (row, KV head), over one split of its key blocks: q (bq, hd), slots (bq,) int32 (-1 =
  padding); pages streamed from the pool. Writes the normalised output, and with splits its lse (base 2)."""
  q = q_ref[...]
  qp = qpos_ref[...]
  page = k_ref.shape[1]
  block_k = pages_per_block * page
  # Blocks [0, last) hold every slot this row block sees (none when all its rows are padding: max slot -1).
  last = (jnp.max(qp) + block_k) // block_k
  lo = pl.program_id(1) * blocks_per_split
  hi = jnp.minimum(lo + blocks_per_split, last)

  def body(j, carry):
    pages = pt_ref[pl.ds(pl.multiple_of(j * pages_per_block, pages_per_block), pages_per_block)]
    k = k_ref[pages].reshape(block_k, k_ref.shape[-1])  # the pages as stored: one indexed load, nothing gathered
    v = v_ref[pages].reshape(block_k, v_ref.shape[-1])
    slots = j * block_k + lax.broadcasted_iota(jnp.int32, (block_k,), 0)
    return _fold_block(carry, q, k, v, slots[None, :] <= qp[:, None], scale2)

  rows, hd = q.shape
  init = (
    jnp.zeros((rows, hd), jnp.float32),
    jnp.full((rows,), MASK_VALUE, jnp.float32),
    jnp.zeros((rows,), jnp.float32),
  )
  acc, m, denom = lax.fori_loop(lo, jnp.maximum(lo, hi), body, init)
  empty = denom == 0.0
  out_refs[0][...] = (acc / jnp.where(empty, 1.0, denom)[:, None]).astype(out_refs[0].dtype)
  if len(out_refs) == 2:
    out_refs[1][...] = jnp.where(empty, -jnp.inf, m + jnp.log2(jnp.where(empty, 1.0, denom)))


def _num_splits(programs: int, num_blocks: int, interpret: bool) -> int:
  """Key splits (flash-decoding) so that a small batch still fills the GPU: about two programs per core, at least
  4 key blocks per split; 1 in interpret mode."""
  if interpret:
    return 1
  cores = getattr(jax.devices()[0], "core_count", None) or 108
  return max(1, min(num_blocks // 4, -(-2 * cores // programs)))


def paged_flash(
  q: jax.Array,
  pool: jax.Array,
  page_table: jax.Array,
  q_positions: jax.Array,
  q_segment_ids: jax.Array,
  *,
  interpret: bool | None = None,
  block_q: int = BLOCK_Q,
  block_k: int = BLOCK_K,
  num_splits: int | None = None,
  num_warps: int | None = None,
  num_stages: int = 2,
) -> jax.Array:
  """Causal attention of new tokens to their rows' pages, read in place (the keys/values already written).

  Args:
    q: (B, N, H, hd) queries; pool: (P, page, 2K, hd), keys at even and values at odd combined heads.
    page_table: (B, n) int32 pages of each row in order (entries past a row's tokens: any valid page id).
    q_positions: (B, N) int32 slot of each query; q_segment_ids: (B, N) 1 = real token, 0 = padding.
    interpret: None = interpret unless compiling for GPU (`platform.target_platform()`).
    num_splits: key splits per row block, merged in XLA (None: enough programs for the GPU's cores, 1 interpreted).
  Returns:
    (B, N, H, hd) in q's dtype; padding queries get zeros.
  """
  b, n, h, hd = q.shape
  _, page, nk2, _ = pool.shape
  kh = nk2 // 2
  g = h // kh
  if interpret is None:
    interpret = platform.target_platform() != "gpu"
  if not supported(page, hd, interpret):
    raise ValueError(f"paged_flash compiled for GPU needs a power-of-two page size and head_dim >= 16: {page}, {hd}")
  rows = n * g
  bq = min(block_q, _next_pow2(max(rows, 16)))  # Triton dots need M >= 16
  rows_pad = blocks.round_up(rows, bq)
  width = page_table.shape[1]
  # Pages per loop step: about block_k keys, at least 16 (Triton dots need N, K >= 16; the table is padded to a
  # multiple), a power of two when the page size is.
  ppb = max(1, min(block_k // page, _next_pow2(width)), -(-16 // page))
  n_pad = blocks.round_up(width, ppb)

  # (B, N, H, hd) -> (B, K, rows_pad, hd), row t * G + j = (token t, head k * G + j)
  qr = q.reshape(b, n, kh, g, hd).transpose(0, 2, 1, 3, 4).reshape(b, kh, rows, hd)
  qr = blocks.pad_axis(qr, 2, rows_pad)
  slots = jnp.where(q_segment_ids > 0, q_positions, -1).astype(jnp.int32)
  qpos = blocks.pad_axis(jnp.repeat(slots, g, axis=1), 1, rows_pad, -1)  # (B, rows_pad)
  table = blocks.pad_axis(page_table.astype(jnp.int32), 1, n_pad)  # page 0: never visible past a row's slots

  num_rb, num_blocks = rows_pad // bq, n_pad // ppb
  ns = max(1, min(num_blocks, num_splits or _num_splits(num_rb * b * kh, num_blocks, interpret)))
  per_split = -(-num_blocks // ns)
  kernel = functools.partial(_kernel, scale2=float(hd**-0.5) * LOG2E, pages_per_block=ppb, blocks_per_split=per_split)
  row_spec = pl.BlockSpec((None, None, bq, hd), lambda i, sp, bi, hi: (bi, hi, i, 0))
  if ns == 1:
    out_specs = row_spec
    out_shape = jax.ShapeDtypeStruct((b, kh, rows_pad, hd), q.dtype)
  else:  # per split: output in fp32 and its lse, merged below
    out_specs = [
      pl.BlockSpec((None, None, None, bq, hd), lambda i, sp, bi, hi: (sp, bi, hi, i, 0)),
      pl.BlockSpec((None, None, None, bq), lambda i, sp, bi, hi: (sp, bi, hi, i)),
    ]
    out_shape = [
      jax.ShapeDtypeStruct((ns, b, kh, rows_pad, hd), jnp.float32),
      jax.ShapeDtypeStruct((ns, b, kh, rows_pad), jnp.float32),
    ]
  compiler_params = None
  if not interpret:
    from jax.experimental.pallas import triton as plgpu

    compiler_params = plgpu.CompilerParams(num_warps=num_warps or (4 if hd <= 64 else 8), num_stages=num_stages)
  out = pl.pallas_call(
    kernel,
    grid=(num_rb, ns, b, kh),
    in_specs=[
      pl.BlockSpec((None, n_pad), lambda i, sp, bi, hi: (bi, 0)),
      row_spec,
      pl.BlockSpec((None, bq), lambda i, sp, bi, hi: (bi, i)),
      # The same pool twice: KV head hi's keys (combined head 2 hi) and values (2 hi + 1), that axis squeezed.
      pl.BlockSpec((pool.shape[0], page, None, hd), lambda i, sp, bi, hi: (0, 0, 2 * hi, 0)),
      pl.BlockSpec((pool.shape[0], page, None, hd), lambda i, sp, bi, hi: (0, 0, 2 * hi + 1, 0)),
    ],
    out_specs=out_specs,
    out_shape=out_shape,
    interpret=interpret,
    compiler_params=compiler_params,
    name="deepeyes_paged_flash",
  )(table, qr, qpos, pool, pool)
  if ns > 1:  # merge the splits by their lse; a split that saw nothing has lse -inf and weight 0
    o, lse = out
    m = jnp.max(lse, axis=0)
    w = jnp.exp2(lse - jnp.where(jnp.isfinite(m), m, 0.0))
    wsum = jnp.sum(w, axis=0)
    out = (jnp.sum(w[..., None] * o, axis=0) / jnp.where(wsum == 0, 1.0, wsum)[..., None]).astype(q.dtype)
  out = out[:, :, :rows].reshape(b, kh, n, g, hd)
  return out.transpose(0, 2, 1, 3, 4).reshape(b, n, h, hd)
