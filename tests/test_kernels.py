"""Pallas flash attention (interpret mode on CPU) against the XLA reference: values and gradients w.r.t. q, k, v.

Errors are max |a - b| / max |b| per array. fp32: <= 1e-5. bf16: <= 2e-2 (BF16_TOL): both sides round their inputs,
probabilities and outputs to bf16 (8 bits of mantissa, relative step 2 ** -8 = 3.9e-3) at different points (the
flash kernel casts unnormalised probabilities block by block and rescales in fp32; the reference casts normalised
ones), and gradients go through two more bf16 roundings, so a few bf16 ulps of the largest entry is the expected
disagreement; 2e-2 is ~5 ulps, tight enough to catch a wrong mask, scale or missing head group (those give O(1)).
"""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deepeyes_jax.kernels import attention as attn
from deepeyes_jax.kernels.pallas_attention import BlockSizes, pallas_attention

FP32_TOL = 1e-5
BF16_TOL = 2e-2
SMALL = BlockSizes(block_q=16, block_k=16, block_q_bwd=16, block_k_bwd=16)  # several blocks on tiny shapes


def _rel(a, b) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


def _inputs(b, t, s, h, kh, d, dtype, seed=0):
  rng = np.random.default_rng(seed)
  shapes = [(b, t, h, d), (b, s, kh, d), (b, s, kh, d), (b, t, h, d)]
  q, k, v, ct = (rng.standard_normal(shape).astype(np.float32) for shape in shapes)
  return tuple(jnp.asarray(x, dtype) for x in (q, k, v, ct))


@functools.partial(jax.jit, static_argnames=("fn",))
def _value_and_grads(fn, q, k, v, ct, meta):
  out, vjp = jax.vjp(lambda q, k, v: fn(q, k, v, **meta), q, k, v)
  return out, vjp(ct.astype(out.dtype))


def _check(q, k, v, ct, tol, sizes=SMALL, **meta):
  causal = meta.pop("causal", False)
  ours = functools.partial(pallas_attention, causal=causal, block_sizes=sizes)
  ref = functools.partial(attn.xla_attention, causal=causal)
  out, grads = _value_and_grads(ours, q, k, v, ct, meta)
  out_ref, grads_ref = _value_and_grads(ref, q, k, v, ct, meta)
  assert out.dtype == q.dtype and out.shape == q.shape
  errs = {"out": _rel(out, out_ref)} | {f"d{n}": _rel(g, r) for n, g, r in zip("qkv", grads, grads_ref)}
  assert all(np.isfinite(np.asarray(x, np.float32)).all() for x in (out, *grads))
  assert max(errs.values()) <= tol, errs
  return out


def _packed_segments(lengths_per_row, t):
  """Packed training rows: uneven segments 1, 2, ... then padding (0)."""
  seg = np.zeros((len(lengths_per_row), t), np.int32)
  for r, lengths in enumerate(lengths_per_row):
    start = 0
    for i, n in enumerate(lengths):
      seg[r, start : start + n] = i + 1
      start += n
  return jnp.asarray(seg)


@pytest.mark.parametrize(
  "dtype,d,tol", [(jnp.float32, 80, FP32_TOL), (jnp.float32, 128, FP32_TOL), (jnp.bfloat16, 128, BF16_TOL)]
)
def test_packed_causal_training_rows(dtype, d, tol):
  b, t, h, kh = 2, 56, 4, 2
  q, k, v, ct = _inputs(b, t, t, h, kh, d, dtype)
  seg = _packed_segments([[13, 30, 9], [3, 20, 33]], t)  # row 0 ends with 4 padding tokens
  pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
  meta = dict(q_segment_ids=seg, kv_segment_ids=seg, q_positions=pos, kv_positions=pos)
  _check(q, k, v, ct, tol, causal=True, **meta)


def _window_segments(grids, window):
  """Vision tokens in raster order per image; segment = window index (unique over images); windows cut by the
  grid edge are smaller (grids not multiples of the window)."""
  ids, next_id = [], 1
  for gh, gw in grids:
    wr, wc = -(-gh // window), -(-gw // window)
    rows, cols = np.meshgrid(np.arange(gh), np.arange(gw), indexing="ij")
    ids.append((next_id + (rows // window) * wc + cols // window).reshape(-1))
    next_id += wr * wc
  return jnp.asarray(np.concatenate(ids)[None].astype(np.int32))


@pytest.mark.parametrize("dtype,tol", [(jnp.float32, FP32_TOL), (jnp.bfloat16, BF16_TOL)])
def test_vision_windows_two_images(dtype, tol):
  seg = _window_segments([(6, 7), (5, 3)], window=4)  # 42 + 15 tokens, 4 + 2 windows, most cut by the edge
  t = seg.shape[1]
  q, k, v, ct = _inputs(1, t, t, 2, 2, 80, dtype, seed=1)
  _check(q, k, v, ct, tol, q_segment_ids=seg, kv_segment_ids=seg)


def test_vision_full_attention_per_image_padded_head_dim():
  # Segment = image; the head dim is padded 80 -> 128 inside (the GPU path), on CPU here.
  seg = jnp.asarray(np.array([[1] * 30 + [2] * 18 + [0] * 4], np.int32))
  q, k, v, ct = _inputs(1, 52, 52, 2, 2, 80, jnp.float32, seed=2)
  sizes = BlockSizes(block_q=32, block_k=16, block_q_bwd=16, block_k_bwd=32, pow2_head_dim=True)
  _check(q, k, v, ct, FP32_TOL, sizes=sizes, q_segment_ids=seg, kv_segment_ids=seg)


@pytest.mark.parametrize(
  "dtype,tol,splits", [(jnp.float32, FP32_TOL, 1), (jnp.float32, FP32_TOL, 3), (jnp.bfloat16, BF16_TOL, 2)]
)
def test_gqa_decode_ragged_cache(dtype, tol, splits):
  """T = 1 against a cache of S slots, per-row lengths (kv segment = slot < length), query at slot length - 1;
  the length-0 row sees nothing and must return the mean of the values."""
  b, s, h, kh, d = 4, 96, 4, 1, 128
  lengths = np.array([96, 37, 1, 0])
  q, k, v, ct = _inputs(b, 1, s, h, kh, d, dtype, seed=3)
  kv_seg = jnp.asarray((np.arange(s)[None] < lengths[:, None]).astype(np.int32))
  meta = dict(
    q_segment_ids=jnp.ones((b, 1), jnp.int32),
    kv_segment_ids=kv_seg,
    q_positions=jnp.asarray(np.maximum(lengths - 1, 0)[:, None].astype(np.int32)),
    kv_positions=jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s)),
  )
  sizes = BlockSizes(block_q=8, block_k=16, block_q_bwd=16, block_k_bwd=32, num_splits=splits)
  out = _check(q, k, v, ct, tol, sizes=sizes, causal=True, **meta)
  np.testing.assert_allclose(
    np.asarray(out[3, 0], np.float32), np.asarray(jnp.mean(v[3].astype(jnp.float32), 0)).repeat(h, 0), atol=tol
  )


@pytest.mark.parametrize("impl,splits", [("xla", 1), ("pallas", 1), ("pallas", 3)])
def test_heads_major_kv_equals_native_layout(impl, splits):
  """The KV cache's (B, K, S, D) layout (`kv_heads_major=True`) gives the native layout's outputs and gradients
  (the gradients come back in the heads-major layout): decode against a ragged cache, GQA with 2 KV heads."""
  b, s, h, kh, d = 3, 70, 6, 2, 32
  lengths = np.array([70, 23, 1])
  q, k, v, ct = _inputs(b, 1, s, h, kh, d, jnp.float32, seed=6)
  meta = dict(
    q_segment_ids=jnp.ones((b, 1), jnp.int32),
    kv_segment_ids=jnp.asarray((np.arange(s)[None] < lengths[:, None]).astype(np.int32)),
    q_positions=jnp.asarray((lengths - 1)[:, None].astype(np.int32)),
    kv_positions=jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s)),
  )
  sizes = BlockSizes(block_q=8, block_k=16, block_q_bwd=16, block_k_bwd=16, num_splits=splits)
  extra = {} if impl == "xla" else dict(block_sizes=sizes)
  fn = attn.xla_attention if impl == "xla" else pallas_attention
  native = functools.partial(fn, causal=True, **extra)
  heads_major = functools.partial(fn, causal=True, kv_heads_major=True, **extra)
  t_ = lambda x: x.transpose(0, 2, 1, 3)
  out, (dq, dk, dv) = _value_and_grads(heads_major, q, t_(k), t_(v), ct, meta)
  out_ref, (dq_ref, dk_ref, dv_ref) = _value_and_grads(native, q, k, v, ct, meta)
  assert dk.shape == (b, kh, s, d) and dv.shape == (b, kh, s, d)
  for a, r in [(out, out_ref), (dq, dq_ref), (t_(dk), dk_ref), (t_(dv), dv_ref)]:
    assert _rel(a, r) <= FP32_TOL
  # and the dispatcher passes the flag through
  ref = attn.attention(q, k, v, causal=True, impl=impl, **meta)
  assert _rel(attn.attention(q, t_(k), t_(v), causal=True, impl=impl, kv_heads_major=True, **meta), ref) <= FP32_TOL
  with pytest.raises(ValueError, match=r"read as \(B, K, S, D\)"):  # (B, S, K, D) given as heads-major
    fn(q, k, v, causal=True, kv_heads_major=True, **meta)


def test_extend_against_cache_and_padded_query_row():
  """Prefill/extend: T new tokens at slots lengths + i of an S-slot cache; row 1 has a padded query (segment 0),
  which sees nothing and must stay finite (mean of values), in the output and in the gradients."""
  b, t, s, h, kh, d = 2, 5, 40, 4, 2, 32
  lengths = np.array([11, 30])
  q, k, v, ct = _inputs(b, t, s, h, kh, d, jnp.float32, seed=4)
  q_seg = np.ones((b, t), np.int32)
  q_seg[1, 3:] = 0
  q_pos = lengths[:, None] + np.arange(t)[None]
  kv_seg = (np.arange(s)[None] < (lengths + t)[:, None]).astype(np.int32)
  meta = dict(
    q_segment_ids=jnp.asarray(q_seg),
    kv_segment_ids=jnp.asarray(kv_seg),
    q_positions=jnp.asarray(q_pos.astype(np.int32)),
    kv_positions=jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s)),
  )
  out = _check(q, k, v, ct, FP32_TOL, causal=True, **meta)
  np.testing.assert_allclose(
    np.asarray(out[1, 3:]), np.broadcast_to(np.asarray(jnp.mean(v[1], 0)).repeat(2, 0), (2, h, d)), atol=1e-5
  )


@pytest.mark.parametrize("splits,grad", [(1, True), (3, False)])
def test_lowers_to_triton_for_cuda(splits, grad):
  """No GPU here: lower the jitted kernels (forward, and dq + dkv backward) for CUDA from the CPU. This runs the
  Pallas -> Triton IR lowering (power-of-two tiles, supported primitives), not Triton's compiler."""
  b, t, s, h, kh, d = 2, 3, 200, 28, 4, 80
  q = jax.ShapeDtypeStruct((b, t, h, d), jnp.bfloat16)
  kv = jax.ShapeDtypeStruct((b, s, kh, d), jnp.bfloat16)
  iq, ik = jax.ShapeDtypeStruct((b, t), jnp.int32), jax.ShapeDtypeStruct((b, s), jnp.int32)
  sizes = BlockSizes(num_splits=splits, pow2_head_dim=True)

  def f(q, k, v, qs, ks, qp, kp):
    meta = dict(q_segment_ids=qs, kv_segment_ids=ks, q_positions=qp, kv_positions=kp)
    fn = lambda q, k, v: pallas_attention(q, k, v, causal=True, block_sizes=sizes, interpret=False, **meta)
    out, vjp = jax.vjp(fn, q, k, v)
    return vjp(out) if grad else out

  text = jax.jit(f).trace(q, kv, kv, iq, ik, iq, ik).lower(lowering_platforms=("cuda",)).as_text()
  assert text.count("xla.gpu.triton") == (3 if grad else 1)
  # the decode path: the KV cache's heads-major layout, read in place by the forward kernel
  kv_hm = jax.ShapeDtypeStruct((b, kh, s, d), jnp.bfloat16)
  q1, iq1 = jax.ShapeDtypeStruct((b, 1, h, d), jnp.bfloat16), jax.ShapeDtypeStruct((b, 1), jnp.int32)
  dec = lambda q, k, v, qs, ks, qp, kp: pallas_attention(
    q, k, v, q_segment_ids=qs, kv_segment_ids=ks, q_positions=qp, kv_positions=kp, causal=True,
    block_sizes=sizes, interpret=False, kv_heads_major=True,
  )
  text = jax.jit(dec).trace(q1, kv_hm, kv_hm, iq1, ik, iq1, ik).lower(lowering_platforms=("cuda",)).as_text()
  assert text.count("xla.gpu.triton") == 1


def _paged_case(rng, b, n, h, kh, d, page, width, before, counts, dtype):
  """A pool (P, page, 2K, d) whose pages are shared out to the rows in random order, the rows' new tokens already
  written; pages no row owns hold large garbage. Returns (q, pool, table, q_positions, q_segment_ids, reference
  output (B, N, H, d) fp64 computed slot by slot with numpy)."""
  num_pages = b * width + 3
  pool = rng.standard_normal((num_pages, page, 2 * kh, d)) * 1e4  # garbage: a read of an unowned slot shows
  table = rng.permutation(num_pages)[: b * width].reshape(b, width).astype(np.int32)
  q = rng.standard_normal((b, n, h, d))
  seg = (np.arange(n)[None] < np.asarray(counts)[:, None]).astype(np.int32)
  pos = np.asarray(before)[:, None] + np.arange(n)[None]
  keys = np.zeros((b, width * page, kh, d))
  values = np.zeros_like(keys)
  for r in range(b):
    length = before[r] + counts[r]
    kv = rng.standard_normal((length, 2 * kh, d))
    for t in range(length):
      pool[table[r, t // page], t % page] = kv[t]
    keys[r, :length], values[r, :length] = kv[:, 0::2], kv[:, 1::2]
  pool = np.asarray(jnp.asarray(pool, dtype), np.float64)  # the reference sees what the kernel sees
  keys = np.asarray(jnp.asarray(keys, dtype), np.float64)
  values = np.asarray(jnp.asarray(values, dtype), np.float64)
  qd = np.asarray(jnp.asarray(q, dtype), np.float64)
  ref = np.zeros((b, n, h, d))
  for r, t in zip(*np.nonzero(seg)):
    for head in range(h):
      kvh = head // (h // kh)
      logits = keys[r, : pos[r, t] + 1, kvh] @ qd[r, t, head] * d**-0.5
      p = np.exp(logits - logits.max())
      ref[r, t, head] = p @ values[r, : pos[r, t] + 1, kvh] / p.sum()
  args = (jnp.asarray(q, dtype), jnp.asarray(pool, dtype), jnp.asarray(table), jnp.asarray(pos, jnp.int32))
  return (*args, jnp.asarray(seg), ref)


@pytest.mark.parametrize(
  "g,n,page,block_k,splits,dtype",
  [
    (1, 1, 8, 16, 1, jnp.float32),  # decode, two pages per loop step
    (1, 1, 8, 16, 4, jnp.float32),  # the same, key blocks split over 4 programs (flash-decoding) and merged
    (4, 5, 16, 16, 1, jnp.float32),  # extend across a page boundary, one page per step
    (7, 1, 32, 64, 1, jnp.float32),  # the 7B's 7 query heads per KV head, a page larger than the key block
    (7, 1, 16, 16, 5, jnp.float32),  # splits past some rows' last block: those splits see nothing
    (2, 3, 16, 64, 1, jnp.bfloat16),
    (1, 2, 4, 8, 1, jnp.float32),  # tiny pages: 4 of them per step, 16 keys (Triton's smallest dot)
  ],
)
def test_paged_flash_reads_pages_in_place_and_matches_a_slot_by_slot_reference(g, n, page, block_k, splits, dtype):
  """`gpu_paged_attention.paged_flash` (interpret mode): rows of different cached lengths, one with no new token,
  pages in random order, garbage in every slot a row does not own; the result equals attention over each row's
  own slots, and padding queries get zeros."""
  from deepeyes_jax.kernels.gpu_paged_attention import paged_flash

  rng = np.random.default_rng(g * 100 + n)
  kh, d, width = 2, 16, 6
  before = [0, page - 1, 3 * page + 2, 5]
  counts = [n, n, max(1, n - 2), 0]
  q, pool, table, pos, seg, ref = _paged_case(rng, 4, n, g * kh, kh, d, page, width, before, counts, dtype)
  out = paged_flash(q, pool, table, pos, seg, interpret=True, block_k=block_k, num_splits=splits)
  assert out.shape == q.shape and out.dtype == q.dtype
  real = np.asarray(seg).astype(bool)
  assert _rel(np.asarray(out, np.float64)[real], ref[real]) <= (FP32_TOL if dtype == jnp.float32 else BF16_TOL)
  assert not np.asarray(out)[~real].any()


def test_paged_attention_pallas_reads_in_place_and_agrees_with_the_gather_path(monkeypatch):
  """`paged_attention(impl="pallas")` on a CPU (GPU semantics, interpret mode) takes the in-place kernel, not the
  gathered pages, and agrees with the XLA reference on the rows' real tokens; the write is the same."""
  from deepeyes_jax.kernels import gpu_paged_attention
  from deepeyes_jax.kernels.paged_attention import paged_attention

  rng = np.random.default_rng(3)
  b, n, h, kh, d, page, width = 3, 2, 4, 2, 16, 8, 4
  pool = jnp.asarray(rng.standard_normal((b * width, page, 2 * kh, d)), jnp.float32)
  q, k, v = (jnp.asarray(rng.standard_normal(s), jnp.float32) for s in [(b, n, h, d), (b, n, kh, d), (b, n, kh, d)])
  before, counts = np.array([3, 9, 0]), np.array([2, 1, 2])
  tables = rng.permutation(b * width).reshape(b, width).astype(np.int32)
  valid = np.arange(n)[None] < counts[:, None]
  slots = before[:, None] + np.arange(n)[None]
  kw = dict(
    page_table=jnp.asarray(tables),
    write_page=jnp.asarray(np.where(valid, np.take_along_axis(tables, slots // page, 1), b * width), jnp.int32),
    write_offset=jnp.asarray(slots % page, jnp.int32),
    kv_lengths=jnp.asarray(before + counts, jnp.int32),
    q_segment_ids=jnp.asarray(valid, jnp.int32),
    q_positions=jnp.asarray(slots, jnp.int32),
  )
  calls = []
  real_kernel = gpu_paged_attention.paged_flash
  monkeypatch.setattr(gpu_paged_attention, "paged_flash", lambda *a, **kw_: calls.append(1) or real_kernel(*a, **kw_))
  out, written = paged_attention(q, k, v, pool, impl="pallas", **kw)
  ref, ref_written = paged_attention(q, k, v, pool, impl="xla", **kw)
  assert calls == [1]
  np.testing.assert_array_equal(np.asarray(written), np.asarray(ref_written))
  assert _rel(np.asarray(out)[valid], np.asarray(ref)[valid]) <= FP32_TOL


@pytest.mark.parametrize("b,n", [(64, 1), (1, 1), (8, 256)])
def test_paged_flash_lowers_to_triton_for_cuda_and_leaves_the_pool_where_it_is(b, n):
  """The 7B's decode (64 rows; one row, whose keys are split over programs) and a 256-token extend over a
  recipe-sized pool, lowered for CUDA from this CPU: one Triton kernel, and no gather or slice of the pool around it
  (the pool goes to the kernel as it is)."""
  from deepeyes_jax.kernels.gpu_paged_attention import paged_flash

  s = jax.ShapeDtypeStruct
  pool_shape = (8192, 16, 8, 128)
  args = (
    s((b, n, 28, 128), jnp.bfloat16),
    s(pool_shape, jnp.bfloat16),
    s((b, 512), jnp.int32),
    s((b, n), jnp.int32),
    s((b, n), jnp.int32),
  )
  fn = lambda q, pool, table, pos, seg: paged_flash(q, pool, table, pos, seg, interpret=False)
  text = jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
  assert text.count("xla.gpu.triton") == 1
  assert "gather" not in text and "dynamic_slice" not in text
  if b == 1:  # 4 programs (one row x 4 KV heads) for a GPU of ~100 cores: per-split fp32 outputs, merged in XLA
    splits = re.search(r"tensor<(\d+)x1x4x16x128xf32>", text)
    assert splits and int(splits.group(1)) > 1
  with pytest.raises(ValueError, match="power-of-two page size"):
    jax.jit(fn).trace(args[0], s((64, 12, 8, 128), jnp.bfloat16), *args[2:]).lower(lowering_platforms=("cuda",))


def test_attention_dispatch():
  q, k, v, _ = _inputs(1, 24, 24, 2, 1, 16, jnp.float32, seed=5)
  seg = jnp.asarray(np.array([[1] * 10 + [2] * 14], np.int32))
  kw = dict(q_segment_ids=seg, kv_segment_ids=seg)
  ref = attn.attention(q, k, v, **kw)
  assert _rel(attn.attention(q, k, v, impl="pallas", **kw), ref) <= FP32_TOL
  assert _rel(attn.attention(q, k, v, impl="pallas"), attn.attention(q, k, v)) <= FP32_TOL  # no mask at all
  odd = dict(q_segment_ids=seg * 7 - 10, kv_segment_ids=seg * 7 - 10)  # any non-zero id is a segment, even < 0
  assert _rel(attn.attention(q, k, v, impl="pallas", **odd), attn.attention(q, k, v, **odd)) <= FP32_TOL
  if jax.default_backend() == "cpu":
    np.testing.assert_array_equal(np.asarray(attn.attention(q, k, v, impl="auto", **kw)), np.asarray(ref))
    with pytest.raises(ValueError, match="cpu"):
      attn.attention(q.astype(jnp.bfloat16), k, v, impl="cudnn", **kw)
  with pytest.raises(ValueError, match="unknown attention impl"):
    attn.attention(q, k, v, impl="flash")


@pytest.mark.parametrize("span,block", [(64, 128), (144, 128), (256, 64), (40, 16)])
def test_segment_local_attention_equals_full_segment_attention(span, block):
  """The banded vision-attention path == the reference on every row with a visible key (random contiguous
  segments of length <= span, padding at the end)."""
  from deepeyes_jax.kernels.attention import segment_local_attention, xla_attention

  rng = np.random.default_rng(span + block)
  lengths = []
  while sum(lengths) < 900:
    lengths.append(int(rng.integers(1, span + 1)))
  seg = np.concatenate([np.full(n, i + 1) for i, n in enumerate(lengths)] + [np.zeros(37, np.int64)]).astype(np.int32)
  n = len(seg)
  q, k, v = (jnp.asarray(rng.normal(size=(n, 2, 16)), jnp.float32) for _ in range(3))
  got = segment_local_attention(q, k, v, jnp.asarray(seg), span, block=block)
  ref = xla_attention(q[None], k[None], v[None], q_segment_ids=seg[None], kv_segment_ids=seg[None])[0]
  real = seg > 0
  np.testing.assert_allclose(np.asarray(got)[real], np.asarray(ref)[real], rtol=1e-5, atol=1e-6)


def test_vision_tower_banded_path_equals_full_attention():
  """Many images in one call: the plan's spans route the XLA path through segment_local_attention; the output is
  the same as with the spans removed (plain full attention with segment masks)."""
  import dataclasses

  from deepeyes_jax.models import qwen2_5_vl as qvl
  from deepeyes_jax.models.qwen2_5_vl.vision import make_vision_plan

  cfg = qvl.VisionConfig(
    depth=2,
    hidden_size=32,
    intermediate_size=48,
    num_heads=2,
    out_hidden_size=32,
    window_size=56,
    fullatt_block_indexes=(1,),
  )
  from flax import nnx

  from deepeyes_jax.models.qwen2_5_vl.vision import VisionTower

  tower = VisionTower(cfg, dtype=jnp.float32, rngs=nnx.Rngs(0))
  grids = np.array([[1, 8, 8], [1, 4, 6], [1, 12, 8], [1, 8, 8], [1, 6, 10], [1, 4, 4]] * 3)
  plan = make_vision_plan(grids, cfg, pad_to=1536)
  assert plan.window_span == 64 and plan.image_span == 128
  pv = jnp.asarray(np.random.default_rng(0).normal(size=(1536, cfg.patch_dim)), jnp.float32)
  banded = tower(pv, jax.tree.map(jnp.asarray, plan))
  full = tower(pv, jax.tree.map(jnp.asarray, dataclasses.replace(plan, window_span=0, image_span=0)))
  n = int(np.prod(grids, -1).sum()) // 4
  np.testing.assert_allclose(np.asarray(banded)[:n], np.asarray(full)[:n], rtol=1e-5, atol=1e-5)
