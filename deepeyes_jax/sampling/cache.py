"""The KV cache of a batch of rows that grows across turns.

Each row's tokens are stored contiguously from slot 0 (no padding inside a row); `lengths[r]` slots are filled.
New tokens of row r go to slots lengths[r], lengths[r] + 1, ... so rows advance independently: a row that is
still thinking, a row that just received a crop, and a finished row share one cache.

K/V are stored heads-major, (B, K, C, head_dim) per layer: attention multiplies the cache as stored. In the
(B, C, K, head_dim) layout of the projections, XLA transposed the whole cache of every layer at every decode step
(16 copies of the cache per step in the sampling benchmark, a third of its attention time on CPU); the new tokens'
keys/values (B, N, K, head_dim) are transposed instead, N = 1 when decoding.

`next_pos[r]` is the M-RoPE position the next text token of row r takes on all three axes. It differs from
`lengths[r]` by the row's rope delta, which changes with every image (an image of t x h x w patches occupies
t*h*w/4 slots but advances the position by max(h, w)/2).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from deepeyes_jax.models.qwen2_5_vl.config import Qwen25VLConfig
from deepeyes_jax.parallel import sharding as shd


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
  """k, v: per-layer tuples of (B, K, C, head_dim) (heads-major); lengths, next_pos: (B,) int32."""

  k: tuple[jax.Array, ...]
  v: tuple[jax.Array, ...]
  lengths: jax.Array
  next_pos: jax.Array

  @property
  def batch_size(self) -> int:
    return self.lengths.shape[0]

  @property
  def capacity(self) -> int:
    return self.k[0].shape[2]


def cache_shardings(config: Qwen25VLConfig, batch: int, capacity: int, mesh: Mesh) -> KVCache:
  """NamedShardings: K/V rows over (data, fsdp), KV heads over tensor (where they divide); lengths replicated."""
  t = config.text
  kv_shape = (batch, t.num_key_value_heads, capacity, t.head_dim)
  kv = shd.logical_to_sharding(("batch", "kv_heads", None, None), kv_shape, mesh)
  # Lengths and positions are a few integers that the host reads after each call: replicated.
  row = shd.logical_to_sharding((None,), (batch,), mesh)
  n = t.num_hidden_layers
  return KVCache(k=(kv,) * n, v=(kv,) * n, lengths=row, next_pos=row)


def init_cache(
  config: Qwen25VLConfig, batch: int, capacity: int, dtype=jnp.float32, mesh: Mesh | None = None
) -> KVCache:
  """An empty cache; sharded over `mesh` when given, allocated directly in place (no host copy)."""
  t = config.text
  kv_shape = (batch, t.num_key_value_heads, capacity, t.head_dim)

  def make():
    zeros = jnp.zeros(kv_shape, dtype)
    n = t.num_hidden_layers
    return KVCache(
      k=(zeros,) * n, v=(zeros,) * n, lengths=jnp.zeros((batch,), jnp.int32), next_pos=jnp.zeros((batch,), jnp.int32)
    )

  out_shardings = None if mesh is None else cache_shardings(config, batch, capacity, mesh)
  return jax.jit(make, out_shardings=out_shardings)()


def constrain(cache, shardings):
  """Pins a cache produced inside jit (a `KVCache`, or a paged pool `paged.PagedKV`) to its shardings, a tree of the
  same structure or None (keeps the layout stable across donated calls)."""
  if shardings is None:
    return cache
  return jax.tree.map(jax.lax.with_sharding_constraint, cache, shardings)
