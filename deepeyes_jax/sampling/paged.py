"""A paged KV cache: one pool of fixed-size pages per layer, shared by every row in flight, and its host allocator.

A row's cache is a list of pages (its page table): its token at logical slot t lives in page table[t // page_size]
at offset t % page_size. Pages are taken from the pool as a row grows and given back when it finishes, so the KV
memory in use follows the tokens actually held, not rows x max_total_tokens. A page can be held by several rows
(reference counts): the G samples of a task read their shared prompt's full pages in place, and each gets a copy of
the prompt's last, partly filled page only (copy on write), so a prompt is prefilled once per group.

Layout per layer: (P, page_size, 2K, head_dim), keys at even and values at odd combined heads: the layout of jax's
TPU ragged paged attention (`jax.experimental.pallas.ops.tpu.ragged_paged_attention`), so that kernel can read it
as stored. On a mesh the pages are split over data x fsdp like the rows (each shard holds the pages of the rows in
its slots; page ids are local to a shard: `ShardedAllocator`), and the combined heads over `tensor`.

The allocator runs on the host (page ids are plain ints); device work is the jitted reads/writes in
`sampler.Sampler.extend_paged` / `decode_segment` and the two helpers here (copy pages, grow the pool).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from deepeyes_jax.models.qwen2_5_vl.config import Qwen25VLConfig
from deepeyes_jax.parallel import sharding as shd


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PagedKV:
  """pools: per-layer (P, page_size, 2K, head_dim) arrays (keys at even, values at odd combined heads)."""

  pools: tuple[jax.Array, ...]

  @property
  def num_pages(self) -> int:
    return self.pools[0].shape[0]

  @property
  def page_size(self) -> int:
    return self.pools[0].shape[1]


def page_bytes(config: Qwen25VLConfig, page_size: int, dtype) -> int:
  """Bytes of one page over all layers (keys and values)."""
  t = config.text
  return t.num_hidden_layers * page_size * 2 * t.num_key_value_heads * t.head_dim * jnp.dtype(dtype).itemsize


def pool_shardings(config: Qwen25VLConfig, num_pages: int, page_size: int, mesh: Mesh) -> PagedKV:
  """Pages over data x fsdp (like the rows), combined heads over `tensor` exactly when the K KV heads split over it
  (the split `kernels.paged_attention` runs per shard with)."""
  t = config.text
  pages = shd.logical_to_spec(("batch",), (num_pages,), mesh)[0]
  heads = shd.logical_to_spec(("kv_heads",), (t.num_key_value_heads,), mesh)[0]
  s = NamedSharding(mesh, P(pages, None, heads, None))
  return PagedKV(pools=(s,) * t.num_hidden_layers)


def init_pool(config: Qwen25VLConfig, num_pages: int, page_size: int, dtype, mesh: Mesh | None = None) -> PagedKV:
  """An empty pool of `num_pages` pages, allocated in place (sharded over `mesh` when given)."""
  t = config.text
  shape = (num_pages, page_size, 2 * t.num_key_value_heads, t.head_dim)

  def make():
    return PagedKV(pools=(jnp.zeros(shape, dtype),) * t.num_hidden_layers)

  out = None if mesh is None else pool_shardings(config, num_pages, page_size, mesh)
  return jax.jit(make, out_shardings=out)()


@functools.partial(jax.jit, donate_argnums=(0,))
def copy_pages(kv: PagedKV, src: jax.Array, dst: jax.Array) -> PagedKV:
  """Copies pages src[i] -> dst[i] (m,) in every layer (copy on write of a shared prompt's last page); global
  page ids (shard * pages_per_shard + local id); dst = P (bucket padding) copies nothing."""
  return PagedKV(pools=tuple(p.at[dst].set(p[src], mode="drop") for p in kv.pools))


@functools.partial(jax.jit, static_argnums=(1, 2, 3))  # no donation: the grown pool has another shape
def grow_pool(kv: PagedKV, shards: int, pages_per_shard: int, shardings: PagedKV | None = None) -> PagedKV:
  """Each shard's pages followed by free ones, `pages_per_shard` per shard (local page ids stay valid)."""

  def grow(p):
    local = p.reshape(shards, p.shape[0] // shards, *p.shape[1:])
    local = jnp.pad(local, [(0, 0), (0, pages_per_shard - local.shape[1])] + [(0, 0)] * 3)
    return local.reshape(shards * pages_per_shard, *p.shape[1:])

  out = PagedKV(pools=tuple(grow(p) for p in kv.pools))
  if shardings is not None:
    out = jax.tree.map(jax.lax.with_sharding_constraint, out, shardings)
  return out


class PageAllocator:
  """Host bookkeeping of a pool's pages: a free list and a reference count per page.

  `alloc` hands out the lowest free page ids first (deterministic: the same schedule gives the same pages);
  `release` drops one reference per page and frees those no row holds any more.
  """

  def __init__(self, num_pages: int):
    self.num_pages = 0
    self.refs = np.zeros((0,), np.int32)
    self.free: list[int] = []
    self.add_pages(num_pages)

  def add_pages(self, num_pages: int) -> None:
    """Extends the pool to `num_pages` pages (the device pool must grow to match: `grow_pool`)."""
    if num_pages < self.num_pages:
      raise ValueError(f"a pool cannot shrink ({self.num_pages} -> {num_pages} pages)")
    self.free = sorted(self.free + list(range(self.num_pages, num_pages)), reverse=True)
    self.refs = np.concatenate([self.refs, np.zeros((num_pages - self.num_pages,), np.int32)])
    self.num_pages = num_pages

  @property
  def in_use(self) -> int:
    return self.num_pages - len(self.free)

  def can_alloc(self, n: int) -> bool:
    return n <= len(self.free)

  def alloc(self, n: int) -> list[int]:
    if n > len(self.free):
      raise MemoryError(f"KV pool exhausted: {n} page(s) asked, {len(self.free)} of {self.num_pages} free")
    pages = [self.free.pop() for _ in range(n)]
    self.refs[pages] += 1
    return pages

  def share(self, pages: list[int]) -> None:
    """One more holder of `pages` (a sample reading its group's prompt pages)."""
    if pages:
      if np.any(self.refs[pages] <= 0):
        raise ValueError(f"sharing pages that are not allocated: {pages}")
      self.refs[pages] += 1

  def release(self, pages: list[int]) -> None:
    if not pages:
      return
    if np.any(self.refs[pages] <= 0):
      raise ValueError(f"releasing pages that are not allocated: {pages}")
    self.refs[pages] -= 1
    freed = [p for p in pages if self.refs[p] == 0]
    if freed:
      self.free = sorted(self.free + freed, reverse=True)


def pages_for(tokens: int, page_size: int) -> int:
  return -(-int(tokens) // page_size)


class ShardedAllocator:
  """One `PageAllocator` per data x fsdp shard of the pool (page ids local to the shard; see
  `kernels.paged_attention`). A row's pages all come from the shard of its slot."""

  def __init__(self, shards: int, pages_per_shard: int):
    self.shards = [PageAllocator(pages_per_shard) for _ in range(shards)]
    self.peak_in_use = 0  # the most pages held at once: what the workload needed

  @property
  def pages_per_shard(self) -> int:
    return self.shards[0].num_pages

  @property
  def num_pages(self) -> int:
    return self.pages_per_shard * len(self.shards)

  @property
  def in_use(self) -> int:
    return sum(a.in_use for a in self.shards)

  def add_pages(self, pages_per_shard: int) -> None:
    for a in self.shards:
      a.add_pages(pages_per_shard)

  def can_alloc(self, shard: int, n: int) -> bool:
    return self.shards[shard].can_alloc(n)

  def alloc(self, shard: int, n: int) -> list[int]:
    pages = self.shards[shard].alloc(n)
    self.peak_in_use = max(self.peak_in_use, self.in_use)
    return pages

  def share(self, shard: int, pages: list[int]) -> None:
    self.shards[shard].share(pages)

  def release(self, shard: int, pages: list[int]) -> None:
    self.shards[shard].release(pages)
