"""Attention of new tokens against a paged KV pool (`deepeyes_jax.sampling.paged`), and their write into it.

A layer's pool is (P, page, 2K, head_dim): P pages of `page` token slots, keys at even and values at odd combined
heads (the layout of jax's TPU ragged paged attention). Row r's token at slot t lives in page page_table[r, t //
page] at offset t % page. New tokens (B, N) are written first, then each row's queries attend causally to its
slots [0, kv_lengths[r]) (a query at slot p sees slots <= p).

Implementations:
- "xla" (the reference, and CPU): gathers the pages each row reads, (B, n * page, K, head_dim) with n a bucket of
  the longest row in flight (not the capacity), then `attention.attention`.
- "pallas" on TPU (head_dim a multiple of 128, as Qwen2.5-VL's): jax's ragged paged attention kernel
  (`jax.experimental.pallas.ops.tpu.ragged_paged_attention`), which DMAs each row's pages from the pool as stored:
  nothing is gathered. Each row's N query slots (bucket padding included) are one ragged sequence whose last N
  slots are the queries, so its causal rule is ours; padding queries read slots past the row's tokens and their
  outputs are discarded.
- "pallas" on GPU (and CPU, in interpret mode): `gpu_paged_attention.paged_flash`, a Triton-lowered kernel that
  streams each row's pages from the pool as stored (nothing gathered). Compiled, it needs a power-of-two page size
  and head_dim >= 16 (Triton tiles); other shapes, and TPU test models whose head_dim is not a multiple of 128, take
  the gathered pages through our flash kernels (`pallas_attention` / `tpu_attention`).

On a mesh the pool's pages are split over data x fsdp like the rows: each shard holds the pages of its own rows
and page ids are local to the shard (the engine allocates them per shard), so the write and the read run per shard
in `shard_map` with no communication; combined heads are split over `tensor` like the query heads.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from deepeyes_jax.kernels import gpu_paged_attention, platform
from deepeyes_jax.kernels.attention import attention, resolve_impl
from deepeyes_jax.parallel import sharding as shd


def paged_write(pool: jax.Array, k: jax.Array, v: jax.Array, write_page: jax.Array, write_offset: jax.Array):
  """Writes new keys/values k, v (B, N, K, hd) into `pool` (P, page, 2K, hd) at (write_page, write_offset) (B, N);
  write_page = P (bucket padding, inactive rows) writes nothing."""
  b, n, nk, hd = k.shape
  kv = jnp.stack([k, v], axis=3).reshape(b, n, 2 * nk, hd).astype(pool.dtype)  # (B, N, 2K, hd): k, v interleaved
  return pool.at[write_page, write_offset].set(kv, mode="drop")


def paged_gather(pool: jax.Array, page_table: jax.Array) -> tuple[jax.Array, jax.Array]:
  """The reference read: keys and values (B, n * page, K, hd) of each row's pages (B, n), in order."""
  b, n = page_table.shape
  _, page, nk2, hd = pool.shape
  kv = pool[page_table].reshape(b, n * page, nk2, hd)
  return kv[:, :, 0::2], kv[:, :, 1::2]


def ragged_inputs(q, page_table, kv_lengths_after, counts, page_size: int):
  """Our batch as jax's ragged paged attention sees it: each row's N query slots (bucket padding included) are one
  sequence whose last N slots are the queries (kv_len = cached before + N), so the kernel's causal rule is ours;
  padding queries read slots past the row's tokens and their outputs are discarded.

  Returns (queries (B * N, H, hd), kv_lens (B,), page_indices (B, n), cu_q_lens (B + 1,), num_seqs (1,)).
  """
  b, n, h, hd = q.shape
  # A row without new tokens (idle, or ended earlier in the decode segment) spans one slot past its length, which
  # its page table may not cover: clamped (its output is discarded). Real rows' spans are covered by construction.
  kv_lens = jnp.minimum(kv_lengths_after - counts + n, page_table.shape[1] * page_size).astype(jnp.int32)
  cu_q_lens = jnp.arange(b + 1, dtype=jnp.int32) * n
  return q.reshape(b * n, h, hd), kv_lens, page_table.astype(jnp.int32), cu_q_lens, jnp.array([b], jnp.int32)


def _ragged(q, pool, page_table, kv_lengths_after, counts):
  """jax's TPU ragged paged attention kernel: q (B, N, H, hd) -> (B, N, H, hd)."""
  from jax.experimental.pallas.ops.tpu.ragged_paged_attention import ragged_paged_attention

  b, n, h, hd = q.shape
  queries, kv_lens, pages, cu_q_lens, num_seqs = ragged_inputs(q, page_table, kv_lengths_after, counts, pool.shape[1])
  out = ragged_paged_attention(
    queries,
    pool,
    kv_lens,
    pages,
    cu_q_lens,
    num_seqs,
    sm_scale=float(hd**-0.5),
    # Explicit blocks: the kernel's tuned table reads the local device's TPU version, which a CPU host compiling
    # for a TPU slice does not have. ~1024 keys per block, 32 queries (vLLM's TPU defaults are of this order).
    num_kv_pages_per_block=min(page_table.shape[1], max(1, 1024 // pool.shape[1])),
    num_queries_per_block=min(32, b * n),
  )
  return out.reshape(b, n, h, hd)


def _local(q, k, v, pool, page_table, write_page, write_offset, kv_lengths, q_segment_ids, q_positions, *, impl):
  """`paged_attention` on one shard (or without a mesh): write, then read through the kernel or the reference."""
  pool = paged_write(pool, k, v, write_page, write_offset)
  b, n = q.shape[:2]
  # The ragged kernel works on whole 128-lane head vectors (Qwen2.5-VL's head_dim is 128); smaller test models take
  # the gathered pages through our TPU kernel instead.
  target = platform.target_platform()
  if impl == "pallas" and target == "tpu" and q.shape[-1] % 128 == 0:
    counts = jnp.sum(q_segment_ids > 0, axis=1).astype(jnp.int32)
    return _ragged(q, pool, page_table, kv_lengths, counts), pool
  in_place = gpu_paged_attention.supported(pool.shape[1], q.shape[-1], interpret=target != "gpu")
  if impl == "pallas" and target != "tpu" and in_place:
    # A real query's slot is < kv_lengths (its token was just written), so the causal rule alone bounds its keys.
    return gpu_paged_attention.paged_flash(q, pool, page_table, q_positions, q_segment_ids), pool
  keys, values = paged_gather(pool, page_table)
  slots = jnp.arange(keys.shape[1], dtype=jnp.int32)[None]
  out = attention(
    q,
    keys,
    values,
    q_segment_ids=q_segment_ids,
    kv_segment_ids=(slots < kv_lengths[:, None]).astype(jnp.int32),
    q_positions=q_positions,
    kv_positions=jnp.broadcast_to(slots, (b, keys.shape[1])),
    causal=True,
    impl=impl,
  )
  return out, pool


def paged_attention(
  q: jax.Array,
  k: jax.Array,
  v: jax.Array,
  pool: jax.Array,
  *,
  page_table: jax.Array,
  write_page: jax.Array,
  write_offset: jax.Array,
  kv_lengths: jax.Array,
  q_segment_ids: jax.Array,
  q_positions: jax.Array,
  impl: str = "xla",
) -> tuple[jax.Array, jax.Array]:
  """Writes the new tokens' keys/values and attends to each row's pages.

  Args:
    q: (B, N, H, hd) queries of the new tokens; k, v: (B, N, K, hd) their keys/values.
    pool: (P, page, 2K, hd) this layer's pool.
    page_table: (B, n) int32 pages each row reads, in order (entries past its length: any valid page; on a mesh,
      page ids local to the row's data x fsdp shard). write_page, write_offset: (B, N) int32 where each new token
      goes (write_page = P: nowhere). kv_lengths: (B,) slots visible after the write.
    q_segment_ids: (B, N) 1 = real new token, 0 = padding; q_positions: (B, N) their slots.
  Returns:
    (B, N, H, hd) in q's dtype, and the updated pool.
  """
  impl = resolve_impl(impl)
  fn = functools.partial(_local, impl=impl)
  mesh = platform.target_mesh()
  if mesh is None or mesh.size == 1:
    return fn(q, k, v, pool, page_table, write_page, write_offset, kv_lengths, q_segment_ids, q_positions)
  b, num_pages = q.shape[0], pool.shape[0]
  rows = shd.logical_to_spec(("batch",), (b,), mesh)[0]
  if rows != shd.logical_to_spec(("batch",), (num_pages,), mesh)[0]:
    raise ValueError(
      f"paged attention on a mesh: {b} rows and {num_pages} pool pages must both split over the data x fsdp "
      "shards (page ids are local to a shard); make the slot count and the pool size multiples of data x fsdp"
    )
  heads = shd.logical_to_spec(("kv_heads",), (k.shape[2],), mesh)[0]  # divides the query heads too
  tok, row_ids, pool_spec = P(rows, None, heads, None), P(rows, None), P(rows, None, heads, None)
  target, executing = platform.target_platform(), platform.platform_of(mesh)

  def per_shard(*args):
    with platform.compiling_for(target), platform.no_mesh(executing):  # shard-local: nothing re-shards inside
      return fn(*args)

  return jax.shard_map(
    per_shard,
    mesh=mesh,
    in_specs=(tok, tok, tok, pool_spec, row_ids, row_ids, row_ids, P(rows), row_ids, row_ids),
    out_specs=(tok, pool_spec),
    check_vma=False,
  )(q, k, v, pool, page_table, write_page, write_offset, kv_lengths, q_segment_ids, q_positions)
