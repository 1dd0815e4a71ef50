"""The jitted sampler: `extend` (run new tokens, possibly with images, against the cache) and `decode`.

    sampler = Sampler(model, mesh=mesh)                      # splits the model once
    cache = sampler.init_cache(batch=8, capacity=4096)
    cache, logits = sampler.extend(cache, [Chunk(ids, images=[(pv, grid)]), ...])   # prefill = extend on empty
    cache, out = sampler.decode(cache, logits, max_new_tokens=256, stop_tokens=[im_end], keys=row_keys(0, 8))
    cache, logits = sampler.extend(cache, [None, Chunk(observation_ids, [(crop_pv, crop_grid)]), ...])
    cache, out = sampler.decode(cache, logits, max_new_tokens=[0, 256, ...], ...)

Host work per call (numpy): validating inputs, M-RoPE positions of the new tokens (continuing each row's
position exactly as `get_rope_index` over the whole sequence would), the vision plan, and padding everything to
shape buckets (powers of two) so that compilations stay few; each new shape signature is logged.
Device work: one jitted call per `extend`, one `lax.while_loop` per `decode`; the cache is donated through both.

Weights: `sampler.state = learner.state` lays the parameters out for sampling once per rollout phase
(`sampling_layout`): cast to the compute dtype (fp32 master weights are read as bf16) and, on a mesh, sharded only
over `tensor` (heads, MLP columns, vocabulary) and replicated over data x fsdp, so a decode step reads its chip's
weights in place instead of all-gathering every layer's FSDP shards at every token. `weight_layout="learner"`
(the `Sampler` default, and what evaluation uses) keeps the model's own arrays: no copy; the trainer picks the layout
from `config.rollout.weight_layout` and calls `release()` after each rollout phase, so that the learner step does not
hold the copy.

Images are passed in the row layout (each row's images with its row, `models.qwen2_5_vl.vision`), so on a mesh
each chip runs the vision tower on its own rows' images.

Rows are independent: each row has its own PRNG key (token i of a row is drawn with fold_in(key, slot)), its own
budget and stop state, so a row's output does not depend on the other rows of the batch.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from deepeyes_jax.kernels import platform
from deepeyes_jax.models.qwen2_5_vl.model import Qwen25VL
from deepeyes_jax.models.qwen2_5_vl.rope import positions_for_tokens
from deepeyes_jax.models.qwen2_5_vl.text import CacheView, PagedView
from deepeyes_jax.models.qwen2_5_vl.vision import make_row_plans, row_patches
from deepeyes_jax.parallel import sharding as shd
from deepeyes_jax.sampling import paged, rules
from deepeyes_jax.sampling.cache import KVCache, cache_shardings, constrain, init_cache
from deepeyes_jax.sampling.paged import PagedKV, init_pool, pool_shardings

log = logging.getLogger(__name__)

STOP_REASONS = ("stop_token", "length", "cache_full", "inactive")
_STOP, _LENGTH, _FULL, _INACTIVE = range(4)


@dataclasses.dataclass
class Chunk:
  """New tokens for one row: ids with each image's `<|image_pad|>` already expanded to t*h*w/4 copies, and the
  images in placeholder order as (pixel_values (n, 1176) float32, grid_thw (3,) int)."""

  tokens: Sequence[int]
  images: Sequence[tuple[np.ndarray, np.ndarray]] = ()


@dataclasses.dataclass
class DecodeResult:
  """Per row: generated token ids (the stop token included), their log-probs, and why the row stopped."""

  tokens: list[list[int]]
  logprobs: list[np.ndarray]
  stop_reason: list[str]
  logits: np.ndarray | None = None  # (B, T, V) fp32 when asked for: the distribution of each generated token


def bucket(n: int, minimum: int) -> int:
  """Smallest power of two >= max(n, minimum)."""
  return max(minimum, 1 << max(0, int(n) - 1).bit_length())


def row_keys(seed: int, rows: Sequence[int] | int) -> jax.Array:
  """Per-row PRNG keys folded from (seed, row id): (B,) key array."""
  rows = np.arange(rows) if isinstance(rows, int) else np.asarray(rows)
  base = jax.random.key(seed)
  return jax.vmap(lambda r: jax.random.fold_in(base, r))(jnp.asarray(rows, jnp.uint32))


# The sampling layout: no FSDP (a decode step would all-gather every weight), tensor parallelism as in training.
SAMPLING_RULES = {**shd.DEFAULT_RULES, "embed": None, "vision_embed": None, "merger_in": None}
WEIGHT_LAYOUTS = ("tensor_parallel", "learner")


def sampling_shardings(state, mesh: Mesh | None, layout: str = "tensor_parallel"):
  """NamedShardings of the sampler's copy of `state` (a tree of nnx Variables), or None without a mesh."""
  if mesh is None:
    return None
  rules_ = SAMPLING_RULES if layout == "tensor_parallel" else shd.DEFAULT_RULES
  return jax.tree.map(
    lambda v: shd.variable_sharding(v, mesh, rules_), state, is_leaf=lambda x: isinstance(x, nnx.Variable)
  )


def sampling_layout(state, dtype, mesh: Mesh | None, layout: str = "tensor_parallel"):
  """The parameters as the sampler reads them: floating-point leaves cast to the compute `dtype`, laid out by
  `sampling_shardings`. Returns `state` itself (no copy) when that changes nothing."""
  if layout not in WEIGHT_LAYOUTS:
    raise ValueError(f"weight_layout {layout!r}: must be one of {', '.join(WEIGHT_LAYOUTS)}")
  leaves = jax.tree.leaves(state)
  shardings = sampling_shardings(state, mesh, layout)
  if shardings is not None and any(
    getattr(x, "sharding", None) is not None and x.sharding.device_set != set(mesh.devices.flat) for x in leaves
  ):
    # Weights on other devices (the learner's group, the sampler on devices of its own: one-step-off-policy
    # rollouts): moved across first.
    state = _to_other_devices(state, shardings, jnp.dtype(dtype))
    leaves = jax.tree.leaves(state)
  same_dtype = all(not jnp.issubdtype(x.dtype, jnp.floating) or x.dtype == dtype for x in leaves)
  same_layout = shardings is None or all(
    getattr(x, "sharding", None) is not None and x.sharding.is_equivalent_to(s, x.ndim)
    for x, s in zip(leaves, jax.tree.leaves(shardings))
  )
  if same_dtype and same_layout:
    return state
  return _cast_fn(jnp.dtype(dtype), shardings)(state)


_PUSH_BYTES_IN_FLIGHT = 1 << 30


def _to_other_devices(state, shardings, dtype):
  """`state` on `shardings`, whose devices are not its own. One process: a resharding `jax.device_put` (the cast then
  runs on the new devices). Several processes: JAX refuses a cross-host reshard between different device sets
  ("should have the same set of devices": jax 0.10.2, but on TPU's TFRT runtime), so each leaf is cast to `dtype`
  and replicated over its own mesh (a program of that mesh: an all-gather), then each process copies the slices its
  target devices hold from one of its own devices holding the leaf (device to device, within the process) and
  assembles them (`jax.make_array_from_single_device_arrays`). One leaf at a time: the source devices hold about
  one gathered leaf (at most ~1 GiB in flight) beyond their own state. Issue it while nothing else dispatches to
  either device group (it spans both)."""
  if jax.process_count() == 1:
    return jax.device_put(state, shardings)
  leaves, treedef = jax.tree.flatten(state)
  out, in_flight = [], 0
  for x, target in zip(leaves, jax.tree.leaves(shardings), strict=True):
    gathered = _cast_fn(dtype, NamedSharding(x.sharding.mesh, P()))(x)  # replicated over its own devices
    local = gathered.addressable_shards[0].data  # the whole leaf, on one of this process's devices
    shards = [jax.device_put(local[idx], d) for d, idx in target.addressable_devices_indices_map(local.shape).items()]
    out.append(jax.make_array_from_single_device_arrays(local.shape, target, shards))
    in_flight += local.nbytes
    if in_flight > _PUSH_BYTES_IN_FLIGHT:  # bounds what the gathered copies hold
      out[-1].block_until_ready()
      in_flight = 0
  return jax.tree.unflatten(treedef, out)


def _cast(dtype, state):
  return jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, state)


_CAST_FNS: dict = {}


def _cast_fn(dtype, shardings):
  """One jitted cast per (dtype, layout), reused by every weight push (a fresh jit per call recompiled each step)."""
  key = (dtype, jax.tree.structure(shardings), tuple(jax.tree.leaves(shardings)))
  if key not in _CAST_FNS:
    _CAST_FNS[key] = jax.jit(functools.partial(_cast, dtype), out_shardings=shardings)
  return _CAST_FNS[key]


class Sampler:
  """Split-once sampler over a `Qwen25VL`; `state` holds the weights in the sampling layout (`sampling_layout`)."""

  def __init__(
    self,
    model: Qwen25VL,
    *,
    mesh: Mesh | None = None,
    min_token_bucket: int = 16,
    min_patch_bucket: int = 256,
    min_step_bucket: int = 16,
    weight_layout: str = "learner",
  ):
    self.config = model.config
    self.dtype = model.dtype
    self.mesh = mesh
    self.weight_layout = weight_layout
    self.graphdef, state = nnx.split(model)
    self.state = state
    self.min_token_bucket, self.min_patch_bucket, self.min_step_bucket = (
      min_token_bucket,
      min_patch_bucket,
      min_step_bucket,
    )
    self.signatures: set[tuple] = set()

  @property
  def state(self):
    return self._state

  @state.setter
  def state(self, state) -> None:
    """New weights (e.g. `learner.state` after an update): laid out for sampling once, here."""
    self._state = sampling_layout(state, self.dtype, self.mesh, self.weight_layout)

  def push(self, state, *, private: bool = False) -> None:
    """`self.state = state`; with `private`, never the caller's own arrays (a copy where the layout made none):
    the learner may meanwhile donate its parameters to its next update (one-step-off-policy rollouts)."""
    self.state = state
    if private:
      mine, theirs = jax.tree.leaves(self._state), jax.tree.leaves(state)
      if any(a is b for a, b in zip(mine, theirs)):
        self._state = jax.tree.map(jnp.copy, self._state)

  def release(self) -> None:
    """Drops the sampler's reference to its weights (its copy, with `weight_layout="tensor_parallel"`, is freed):
    the trainer calls it after each rollout phase so that the learner step does not hold two models. Set `state`
    again before the next `extend` / `decode`."""
    self._state = None

  def _weights(self):
    if self._state is None:
      raise RuntimeError("the sampler's weights were released (Sampler.release): set sampler.state first")
    return self._state

  # --- bookkeeping ---------------------------------------------------------------------------------------
  @property
  def num_compiles(self) -> int:
    """Distinct shape signatures compiled so far (extend + decode)."""
    return len(self.signatures)

  def _note(self, signature: tuple) -> None:
    if signature not in self.signatures:
      self.signatures.add(signature)
      log.info("sampler: compiling %s (compilation #%d)", signature, len(self.signatures))

  def _shardings(self, cache: KVCache) -> KVCache | None:
    if self.mesh is None:
      return None
    return cache_shardings(self.config, cache.batch_size, cache.capacity, self.mesh)

  def init_cache(self, batch: int, capacity: int) -> KVCache:
    return init_cache(self.config, batch, capacity, self.dtype, self.mesh)

  # --- extend --------------------------------------------------------------------------------------------
  def _host_inputs(self, lengths: np.ndarray, next_pos: np.ndarray, chunks: Sequence[Chunk | None], cap):
    """Validates each row's chunk against its cached length and capacity (one, or one per row) and lays the batch
    out in shape buckets.

    Returns tokens (B, N), counts (B,), position_ids (3, B, N), the rows' next M-RoPE positions (B,), and the
    images in the row layout (pixel_values (B, n_patches, 1176) and their plan, or None, None).
    """
    cfg = self.config
    b = len(chunks)
    caps = np.broadcast_to(np.asarray(cap), (b,))
    m = cfg.vision.spatial_merge_size
    rows_ids, rows_pos, pvs, grids = [], [], [], []
    new_next = next_pos.copy()
    for r, ch in enumerate(chunks):
      ids = np.asarray([] if ch is None else ch.tokens, np.int64).reshape(-1)
      if len(ids) and (ids.min() < 0 or ids.max() >= cfg.text.vocab_size):
        raise ValueError(f"row {r}: token id outside the vocabulary [0, {cfg.text.vocab_size})")
      if lengths[r] + len(ids) > caps[r]:
        raise ValueError(
          f"row {r}: {lengths[r]} cached + {len(ids)} new tokens exceed the cache capacity {caps[r]}; "
          "use a larger capacity or a shorter prompt"
        )
      images = [] if ch is None else list(ch.images)
      row_grids = [np.asarray(g, np.int64).reshape(3) for _, g in images]
      for k, (pv, g) in enumerate(zip((p for p, _ in images), row_grids)):
        if np.shape(pv) != (int(np.prod(g)), cfg.vision.patch_dim):
          raise ValueError(f"row {r} image {k}: pixel_values shape {np.shape(pv)} does not match grid {g.tolist()}")
      n_pad = int((ids == cfg.image_token_id).sum())
      n_feat = sum(int(np.prod(g)) // (m * m) for g in row_grids)
      if n_pad != n_feat:
        raise ValueError(f"row {r}: {n_pad} <|image_pad|> tokens but its {len(row_grids)} image(s) give {n_feat}")
      pos, nxt = positions_for_tokens(
        ids, iter(row_grids), cfg.image_token_id, m, start=int(next_pos[r]), source=f"row {r}: "
      )
      if len(ids):
        new_next[r] = nxt
      rows_ids.append(ids)
      rows_pos.append(pos)
      pvs.append([np.asarray(p, np.float32) for p, _ in images])
      grids.append(row_grids)
    counts = np.array([len(x) for x in rows_ids], np.int32)
    if counts.max() == 0:
      raise ValueError("extend: every chunk is empty (an empty prompt?)")
    empty_new = (lengths == 0) & (counts == 0)
    if np.all(lengths == 0) and empty_new.any():
      raise ValueError(f"prefill: rows {np.flatnonzero(empty_new).tolist()} have an empty prompt")

    n = bucket(counts.max(), self.min_token_bucket)
    tokens = np.zeros((b, n), np.int32)
    position_ids = np.zeros((3, b, n), np.int32)
    for r, (ids, pos) in enumerate(zip(rows_ids, rows_pos)):
      tokens[r, : len(ids)] = ids
      position_ids[:, r, : len(ids)] = pos
    pixel_values = plan = None
    n_patches = 0
    most = max(sum(len(p) for p in row) for row in pvs)
    if most:  # the row layout: (B, n_patches, 1176), each row's images with its row
      n_patches = bucket(most, self.min_patch_bucket)
      pixel_values = row_patches(pvs, n_patches, cfg.vision.patch_dim)
      plan = make_row_plans(grids, cfg.vision, pad_to=n_patches)
      if self.mesh is not None:  # each row's images on the chips of its row
        rows_sharding = shd.logical_to_sharding(("batch",), (b,), self.mesh)  # the leading (row) axis
        pixel_values, plan = shd.put_host((pixel_values, plan), rows_sharding)
    return tokens, counts, position_ids, new_next.astype(np.int32), pixel_values, plan

  def extend(self, cache: KVCache, chunks: Sequence[Chunk | None]) -> tuple[KVCache, jax.Array]:
    """Appends each row's chunk (None or empty = row unchanged) and returns logits (B, V) fp32 at each row's
    last new token (rows without new tokens get zeros). `cache` is donated: use the returned one."""
    b, cap = cache.batch_size, cache.capacity
    if len(chunks) != b:
      raise ValueError(f"got {len(chunks)} chunks for a cache of {b} rows")
    lengths = np.asarray(jax.device_get(cache.lengths))
    next_pos = np.asarray(jax.device_get(cache.next_pos))
    tokens, counts, position_ids, new_next, pixel_values, plan = self._host_inputs(lengths, next_pos, chunks, cap)
    n, n_patches = tokens.shape[1], 0 if pixel_values is None else pixel_values.shape[1]
    self._note(("extend", b, cap, n, n_patches))
    with platform.scope(self.mesh):
      cache, logits = _extend(
        self.graphdef,
        self._shardings(cache),
        self._weights(),
        cache,
        tokens,
        counts,
        position_ids,
        new_next,
        pixel_values,
        plan,
      )
    return cache, logits

  # --- the paged pool (continuous batching: `deepeyes_jax.agent.rollout`) ---------------------------------
  @property
  def pool_shards(self) -> int:
    """The data x fsdp shards a paged pool's pages (and the decode slots) are split over: 1 without a mesh."""
    if self.mesh is None:
      return 1
    axes = shd.DEFAULT_RULES["batch"]
    return int(np.prod([self.mesh.shape[a] for a in ((axes,) if isinstance(axes, str) else axes)]))

  def init_pool(self, num_pages: int, page_size: int) -> PagedKV:
    """An empty paged KV pool (`deepeyes_jax.sampling.paged`) of num_pages x page_size token slots, num_pages a
    multiple of `pool_shards` (each shard holds num_pages / pool_shards of them)."""
    if num_pages % self.pool_shards:
      raise ValueError(f"a pool of {num_pages} pages does not split over {self.pool_shards} data x fsdp shards")
    return init_pool(self.config, num_pages, page_size, self.dtype, self.mesh)

  def grow_pool(self, kv: PagedKV, pages_per_shard: int) -> PagedKV:
    """The same pool with `pages_per_shard` pages per shard (local page ids stay valid)."""
    d = self.pool_shards
    new = None if self.mesh is None else pool_shardings(self.config, d * pages_per_shard, kv.page_size, self.mesh)
    return paged.grow_pool(kv, d, pages_per_shard, new)

  def copy_pages(self, kv: PagedKV, copies: Sequence[tuple[int, int, int]]) -> PagedKV:
    """Copies pages (shard, src, dst) (local ids) in every layer; padded to a power of two copies."""
    per_shard = kv.num_pages // self.pool_shards
    m = bucket(len(copies), 1)
    src = np.zeros((m,), np.int32)
    dst = np.full((m,), kv.num_pages, np.int32)  # padding: out of range, copies nothing
    for k, (d, a, b) in enumerate(copies):
      src[k], dst[k] = d * per_shard + a, d * per_shard + b
    return paged.copy_pages(kv, src, dst)

  def _pool_shardings(self, kv: PagedKV) -> PagedKV | None:
    return None if self.mesh is None else pool_shardings(self.config, kv.num_pages, kv.page_size, self.mesh)

  def _page_table(self, tables: Sequence[Sequence[int]], rows: int, width: int | None = None) -> np.ndarray:
    """Page tables padded to (rows, width) (default a bucket of the longest) with page 0 (past a row's length:
    masked, or read by padding queries whose outputs are discarded)."""
    width = width or bucket(max((len(t) for t in tables), default=1), 1)
    out = np.zeros((rows, width), np.int32)
    for r, t in enumerate(tables):
      out[r, : len(t)] = t
    return out

  def extend_paged(
    self,
    kv: PagedKV,
    page_tables: Sequence[Sequence[int]],
    lengths: Sequence[int],
    next_pos: Sequence[int],
    chunks: Sequence[Chunk],
    shards: Sequence[int] | None = None,
  ) -> tuple[PagedKV, jax.Array, np.ndarray]:
    """Appends each row's chunk after its `lengths[r]` cached tokens, in the pages of `page_tables[r]` (which must
    cover the new length; local ids of the row's shard `shards[r]`, default 0). Returns (kv, logits (B, V) fp32 at
    each row's last new token, each row's next M-RoPE position), in the order given. The call's batch is laid out
    shard by shard (each shard's rows with its pages), padded to a power of two rows per shard. `kv` is donated."""
    b = len(chunks)
    if not (len(page_tables) == len(lengths) == len(next_pos) == b) or b == 0:
      raise ValueError(f"extend_paged: {b} chunks, {len(page_tables)} page tables, {len(lengths)} lengths")
    d = self.pool_shards
    shards = [0] * b if shards is None else list(shards)
    if len(shards) != b or any(not 0 <= k < d for k in shards):
      raise ValueError(f"extend_paged: shard ids {shards} for {b} rows; the pool has shards 0..{d - 1}")
    by_shard = [[r for r in range(b) if shards[r] == k] for k in range(d)]
    per = bucket(max(len(x) for x in by_shard), 1)
    place = np.full((d * per,), -1)  # batch position -> input row (-1: padding)
    for k, rows_k in enumerate(by_shard):
      place[k * per : k * per + len(rows_k)] = rows_k
    where = np.empty((b,), np.int64)
    for pos, r in enumerate(place):
      if r >= 0:
        where[r] = pos
    page = kv.page_size
    real = place >= 0
    # Padding rows: no tokens, length 1 (so that they do not read as empty prompts), no pages.
    lens = np.where(real, np.asarray(lengths, np.int64)[np.maximum(place, 0)], 1)
    pos0 = np.where(real, np.asarray(next_pos, np.int64)[np.maximum(place, 0)], 0)
    caps = [len(page_tables[r]) * page if r >= 0 else 1 for r in place]
    tokens, counts, position_ids, new_next, pixel_values, plan = self._host_inputs(
      lens, pos0, [chunks[r] if r >= 0 else None for r in place], caps
    )
    n = tokens.shape[1]
    # The table covers each row's slots up to its length + the token bucket (what a ragged kernel's queries span).
    width = bucket(max(paged.pages_for(lens[k] + n, page) for k in range(len(place))), 1)
    table = self._page_table([page_tables[r] if r >= 0 else [] for r in place], len(place), width)
    n_patches = 0 if pixel_values is None else pixel_values.shape[1]
    self._note(("extend_paged", len(place), kv.num_pages, page, width, n, n_patches))
    with platform.scope(self.mesh):
      kv, logits = _extend_paged(
        self.graphdef,
        self._pool_shardings(kv),
        self._weights(),
        kv,
        tokens,
        counts,
        position_ids,
        table,
        lens.astype(np.int32),
        pixel_values,
        plan,
      )
    return kv, logits[where], new_next[where]

  def decode_segment(
    self,
    kv: PagedKV,
    logits: jax.Array,
    *,
    page_tables: Sequence[Sequence[int]],
    lengths: Sequence[int],
    next_pos: Sequence[int],
    budgets: Sequence[int],
    keys: jax.Array,
    steps: int,
    stop_tokens: Sequence[int] = (),
    suppress_tokens: Sequence[int] | None = None,
    params: rules.SamplingParams = rules.GREEDY,
    forced_tokens: Sequence[Sequence[int] | None] | None = None,
    release: int = 1,
  ) -> tuple[PagedKV, jax.Array, DecodeResult]:
    """One decode segment of every slot of the pool: at most `steps` tokens per row, ending as soon as `release`
    rows ended their turn (a stop token or their budget), so that the host can serve them while the other rows
    keep their state. The page tables must cover each row's length + min(steps, budget).

    Args:
      logits: (S, V) the distribution of each slot's next token (from `extend_paged` or the last segment).
      budgets: tokens each slot may still generate in its turn (0 = empty or idle slot).
      keys: (S,) the rows' PRNG keys (`row_keys`): sampling depends on (key, slot), never on the slot's neighbours.
    Returns:
      (kv, logits (S, V) for each row's next token, DecodeResult with each row's tokens of this segment;
      stop_reason "running" for a row whose turn goes on).
    """
    b = len(budgets)
    budgets = np.asarray(budgets, np.int32)
    if budgets.min() < 0:
      raise ValueError(f"budgets must be >= 0, got {budgets.tolist()}")
    steps = bucket(steps, 1)
    forced = np.full((b, steps), -1, np.int32)
    for r, toks in enumerate(forced_tokens or ()):
      if toks is not None:
        toks = list(toks)[:steps]
        forced[r, : len(toks)] = toks
    stops = np.asarray(list(stop_tokens) or [-1], np.int32)
    if suppress_tokens is None:
      suppress_tokens = (self.config.image_token_id, self.config.video_token_id)
    suppress = np.asarray(list(suppress_tokens) or [-1], np.int32)
    # Wide enough for every row's pages, and for one slot past each row's length (what a ragged kernel's query of
    # an idle row spans; its output is discarded).
    width = max(max(len(t), paged.pages_for(n + 1, kv.page_size)) for t, n in zip(page_tables, lengths))
    table = self._page_table(page_tables, b, bucket(width, 1))
    for r, (t, n, budget) in enumerate(zip(page_tables, lengths, budgets)):
      if budget and len(t) * kv.page_size < n + min(steps, budget):
        raise ValueError(
          f"decode_segment: row {r} holds {len(t)} pages of {kv.page_size} for {n} tokens + up to "
          f"{min(steps, budget)} new ones"
        )
    self._note(("decode_segment", b, kv.num_pages, kv.page_size, table.shape[1], steps, len(stops), params))
    with platform.scope(self.mesh):
      kv, logits, tokens, logprobs, counts, reasons = _decode_segment(
        self.graphdef,
        self._pool_shardings(kv),
        params,
        steps,
        self._weights(),
        kv,
        logits,
        keys,
        table,
        np.asarray(lengths, np.int32),
        np.asarray(next_pos, np.int32),
        budgets,
        stops,
        suppress,
        forced,
        np.int32(max(1, release)),
      )
    tokens, logprobs, counts, reasons = jax.device_get((tokens, logprobs, counts, reasons))
    result = DecodeResult(
      tokens=[tokens[r, : counts[r]].tolist() for r in range(b)],
      logprobs=[logprobs[r, : counts[r]] for r in range(b)],
      stop_reason=["running" if x < 0 else STOP_REASONS[int(x)] for x in reasons],
    )
    return kv, logits, result

  # --- decode --------------------------------------------------------------------------------------------
  def decode(
    self,
    cache: KVCache,
    logits: jax.Array,
    *,
    max_new_tokens: int | Sequence[int],
    stop_tokens: Sequence[int] = (),
    suppress_tokens: Sequence[int] | None = None,
    params: rules.SamplingParams = rules.GREEDY,
    keys: jax.Array | None = None,
    return_logits: bool = False,
    forced_tokens: Sequence[Sequence[int] | None] | None = None,
  ) -> tuple[KVCache, DecodeResult]:
    """Generates until every row hit a stop token, its budget, or a full cache.

    Args:
      logits: (B, V) from `extend`: the distribution of each row's first new token.
      max_new_tokens: a budget for all rows or one per row (0 = row inactive).
      keys: (B,) PRNG keys (see `row_keys`); required unless greedy.
      suppress_tokens: ids never sampled; default the image/video placeholders, whose generation would make
        the sequence ambiguous (a generated `<|image_pad|>` has no image behind it). Suppression is a hard
        constraint outside the policy: the reported log-probs are those of the unsuppressed model.
      forced_tokens: per row, tokens to emit instead of sampling (None = sample); a scripted policy for tests
        and demos. The model still runs on them and their log-probs are reported; the budget still applies.
    """
    b = cache.batch_size
    budgets = np.broadcast_to(np.asarray(max_new_tokens, np.int32), (b,)).copy()
    if budgets.min() < 0:
      raise ValueError(f"max_new_tokens must be >= 0, got {budgets.tolist()}")
    if keys is None:
      if not params.greedy:
        raise ValueError("sampling with temperature > 0 needs per-row keys (see row_keys)")
      keys = row_keys(0, b)
    steps = bucket(budgets.max(), self.min_step_bucket)
    forced = np.full((b, steps), -1, np.int32)
    for r, toks in enumerate(forced_tokens or ()):
      if toks is not None:  # tokens past the row's budget are never reached
        toks = list(toks)[:steps]
        forced[r, : len(toks)] = toks
    stops = np.asarray(list(stop_tokens) or [-1], np.int32)
    if suppress_tokens is None:
      suppress_tokens = (self.config.image_token_id, self.config.video_token_id)
    suppress = np.asarray(list(suppress_tokens) or [-1], np.int32)
    self._note(("decode", b, cache.capacity, steps, len(stops), len(suppress), params, return_logits))
    with platform.scope(self.mesh):
      cache, tokens, logprobs, counts, reasons, all_logits = _decode(
        self.graphdef,
        self._shardings(cache),
        params,
        steps,
        return_logits,
        self._weights(),
        cache,
        logits,
        keys,
        budgets,
        stops,
        suppress,
        forced,
      )
    tokens, logprobs, counts, reasons = jax.device_get((tokens, logprobs, counts, reasons))
    result = DecodeResult(
      tokens=[tokens[r, : counts[r]].tolist() for r in range(b)],
      logprobs=[logprobs[r, : counts[r]] for r in range(b)],
      stop_reason=[STOP_REASONS[int(x)] for x in reasons],
      logits=None if all_logits is None else np.asarray(all_logits),
    )
    return cache, result


# --------------------------------------------------------------------------------------------------------------
# Jitted functions
# --------------------------------------------------------------------------------------------------------------
def _run(model, cache: KVCache, tokens, counts, position_ids, new_next, pixel_values=None, plan=None):
  """Writes tokens (B, N) of which the first counts[r] are real; returns (cache, logits at last real token)."""
  b, n = tokens.shape
  cap = cache.capacity
  idx = jnp.arange(n, dtype=jnp.int32)[None]
  valid = idx < counts[:, None]
  slots = cache.lengths[:, None] + idx
  new_lengths = cache.lengths + counts
  view = CacheView(
    write_index=jnp.where(valid, slots, cap),
    kv_segment_ids=(jnp.arange(cap, dtype=jnp.int32)[None] < new_lengths[:, None]).astype(jnp.int32),
    kv_positions=jnp.broadcast_to(jnp.arange(cap, dtype=jnp.int32), (b, cap)),
  )
  logits, ks, vs = model.extend(
    cache.k,
    cache.v,
    view,
    tokens,
    position_ids,
    valid.astype(jnp.int32),
    slots,
    jnp.maximum(counts - 1, 0),
    pixel_values,
    plan,
  )
  logits = shd.constrain(jnp.where((counts > 0)[:, None], logits, 0.0), ("batch", None))  # (B, V): rows sharded
  return KVCache(ks, vs, new_lengths, new_next), logits


@functools.partial(jax.jit, static_argnums=(0, 1), donate_argnums=(3,))
def _extend(graphdef, shardings, state, cache, tokens, counts, position_ids, new_next, pixel_values, plan):
  model = nnx.merge(graphdef, state)
  cache, logits = _run(model, cache, tokens, counts, position_ids, new_next, pixel_values, plan)
  return constrain(cache, shardings), logits


def _draw(logits, keys, lengths, suppress, forced, params):
  """The next token of each row (B,) and its log-prob under the unsuppressed model.

  A token's randomness depends only on its row's key and its slot (the row's length), never on the batch.
  forced (B,): a token to emit instead of sampling, or -1.
  """
  tok_keys = jax.vmap(jax.random.fold_in)(keys, lengths)
  allowed = logits.at[:, suppress].set(rules.NEG_INF, mode="drop")
  tok = jax.vmap(lambda k, lg: rules.sample(k, lg, params))(tok_keys, allowed)
  tok = jnp.where(forced >= 0, forced, tok)
  return tok, rules.token_logprob(logits, tok, params)


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3, 4), donate_argnums=(6,))
def _decode(
  graphdef, shardings, params, steps, return_logits, state, cache, logits, keys, budgets, stops, suppress, forced
):
  model = nnx.merge(graphdef, state)
  b, v = logits.shape
  cap = cache.capacity
  done0 = (budgets <= 0) | (cache.lengths >= cap)
  reason0 = jnp.where(budgets <= 0, _INACTIVE, jnp.where(cache.lengths >= cap, _FULL, -1)).astype(jnp.int32)
  carry = dict(
    cache=cache,
    logits=logits.astype(jnp.float32),
    step=jnp.int32(0),
    count=jnp.zeros((b,), jnp.int32),
    done=done0,
    reason=reason0,
    tokens=jnp.full((b, steps), -1, jnp.int32),
    logprobs=jnp.zeros((b, steps), jnp.float32),
    all_logits=jnp.zeros((b, steps, v), jnp.float32) if return_logits else None,
  )

  def cond(c):
    return (c["step"] < steps) & ~jnp.all(c["done"])

  def body(c):
    cache, step, active = c["cache"], c["step"], ~c["done"]
    tok, lp = _draw(c["logits"], keys, cache.lengths, suppress, forced[:, step], params)
    put = lambda buf, x: buf.at[:, step].set(jnp.where(active, x, buf[:, step]))
    out = dict(c, tokens=put(c["tokens"], tok), logprobs=put(c["logprobs"], lp))
    if return_logits:
      out["all_logits"] = c["all_logits"].at[:, step].set(c["logits"])
    n = active.astype(jnp.int32)
    pos = jnp.broadcast_to(cache.next_pos[None, :, None], (3, b, 1))
    cache, new_logits = _run(model, cache, tok[:, None], n, pos, cache.next_pos + n)
    count = c["count"] + n
    hit_stop = active & jnp.isin(tok, stops)
    hit_len = active & (count >= budgets)
    hit_full = active & (cache.lengths >= cap)
    reason = jnp.where(hit_stop, _STOP, jnp.where(hit_len, _LENGTH, jnp.where(hit_full, _FULL, c["reason"])))
    out.update(
      cache=constrain(cache, shardings),
      logits=jnp.where(active[:, None], new_logits, c["logits"]),
      step=step + 1,
      count=count,
      done=c["done"] | hit_stop | hit_len | hit_full,
      reason=reason.astype(jnp.int32),
    )
    return out

  c = jax.lax.while_loop(cond, body, carry)
  outs = (c["tokens"], c["logprobs"], c["count"], c["reason"], c["all_logits"])
  if shardings is not None:  # small per-row results every host reads: replicated (multi-process safe)
    rep = shardings.lengths
    outs = jax.tree.map(lambda x: jax.lax.with_sharding_constraint(x, rep.update(spec=P())), outs)
  return (c["cache"], *outs)


# --------------------------------------------------------------------------------------------------------------
# The paged KV pool (`deepeyes_jax.sampling.paged`): rows address the pool through page tables
# --------------------------------------------------------------------------------------------------------------
def _paged_run(model, kv: PagedKV, tokens, counts, position_ids, page_table, lengths, pixel_values=None, plan=None):
  """Writes tokens (B, N) of which the first counts[r] are real after each row's `lengths[r]` cached tokens, through
  `page_table` (B, n); returns (kv, logits (B, V) at each row's last real token, zeros for rows without any)."""
  b, n = tokens.shape
  num_pages, page = kv.num_pages, kv.page_size
  idx = jnp.arange(n, dtype=jnp.int32)[None]
  valid = idx < counts[:, None]
  slots = lengths[:, None] + idx
  which = jnp.minimum(slots // page, page_table.shape[1] - 1)
  view = PagedView(
    page_table=page_table,
    write_page=jnp.where(valid, jnp.take_along_axis(page_table, which, axis=1), num_pages),
    write_offset=slots % page,
    kv_lengths=lengths + counts,
  )
  logits, pools, _ = model.extend(
    kv.pools,
    (None,) * len(kv.pools),
    view,
    tokens,
    position_ids,
    valid.astype(jnp.int32),
    slots,
    jnp.maximum(counts - 1, 0),
    pixel_values,
    plan,
  )
  logits = shd.constrain(jnp.where((counts > 0)[:, None], logits, 0.0), ("batch", None))
  return PagedKV(pools=pools), logits


@functools.partial(jax.jit, static_argnums=(0, 1), donate_argnums=(3,))
def _extend_paged(
  graphdef, shardings, state, kv, tokens, counts, position_ids, page_table, lengths, pixel_values, plan
):
  model = nnx.merge(graphdef, state)
  kv, logits = _paged_run(model, kv, tokens, counts, position_ids, page_table, lengths, pixel_values, plan)
  return constrain(kv, shardings), logits


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3), donate_argnums=(5,))
def _decode_segment(
  graphdef,
  shardings,
  params,
  steps,
  state,
  kv,
  logits,
  keys,
  page_table,
  lengths,
  next_pos,
  budgets,
  stops,
  suppress,
  forced,
  release,
):
  """Up to `steps` decode steps of every slot; ends early once `release` rows ended their turn (stop token or
  budget). Returns (kv, logits (B, V) of each row's next token, tokens, logprobs (B, steps), counts (B,),
  reasons (B,): _STOP / _LENGTH / _INACTIVE, or -1 for a row still in its turn)."""
  model = nnx.merge(graphdef, state)
  b, _ = logits.shape
  inactive = budgets <= 0
  carry = dict(
    kv=kv,
    logits=logits.astype(jnp.float32),
    step=jnp.int32(0),
    lengths=lengths,
    next_pos=next_pos,
    count=jnp.zeros((b,), jnp.int32),
    done=inactive,
    ended=jnp.int32(0),
    reason=jnp.where(inactive, _INACTIVE, -1).astype(jnp.int32),
    tokens=jnp.full((b, steps), -1, jnp.int32),
    logprobs=jnp.zeros((b, steps), jnp.float32),
  )

  def cond(c):
    return (c["step"] < steps) & ~jnp.all(c["done"]) & (c["ended"] < release)

  def body(c):
    step, active = c["step"], ~c["done"]
    tok, lp = _draw(c["logits"], keys, c["lengths"], suppress, forced[:, step], params)
    put = lambda buf, x: buf.at[:, step].set(jnp.where(active, x, buf[:, step]))  # noqa: E731
    n = active.astype(jnp.int32)
    pos = jnp.broadcast_to(c["next_pos"][None, :, None], (3, b, 1))
    kv, new_logits = _paged_run(model, c["kv"], tok[:, None], n, pos, page_table, c["lengths"])
    count = c["count"] + n
    hit_stop = active & jnp.isin(tok, stops)
    hit_len = active & (count >= budgets)
    ended = hit_stop | hit_len
    return dict(
      c,
      kv=constrain(kv, shardings),
      logits=jnp.where(active[:, None], new_logits, c["logits"]),
      step=step + 1,
      lengths=c["lengths"] + n,
      next_pos=c["next_pos"] + n,
      count=count,
      done=c["done"] | ended,
      ended=c["ended"] + jnp.sum(ended).astype(jnp.int32),
      reason=jnp.where(hit_stop, _STOP, jnp.where(hit_len, _LENGTH, c["reason"])).astype(jnp.int32),
      tokens=put(c["tokens"], tok),
      logprobs=put(c["logprobs"], lp),
    )

  c = jax.lax.while_loop(cond, body, carry)
  outs = (c["logits"], c["tokens"], c["logprobs"], c["count"], c["reason"])
  if shardings is not None:  # small per-row results every host reads: replicated (multi-process safe)
    rep = jax.sharding.NamedSharding(shardings.pools[0].mesh, P())
    outs = outs[:1] + jax.tree.map(lambda x: jax.lax.with_sharding_constraint(x, rep), outs[1:])
  return (c["kv"], *outs)


@functools.partial(jax.jit, donate_argnums=(0,))
def set_rows(table: jax.Array, rows: jax.Array, values: jax.Array) -> jax.Array:
  """table.at[rows].set(values), donating `table` (rows out of range are dropped)."""
  return table.at[rows].set(values.astype(table.dtype), mode="drop")
