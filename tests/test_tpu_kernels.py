"""TPU attention (`kernels/tpu_attention.py`: splash for self-attention, our Mosaic kernel for the KV cache) in
Pallas' TPU interpret mode on CPU, against the XLA reference: values and gradients w.r.t. q, k, v, for every shape
class the model runs. That these kernels also lower with Mosaic is checked by tests/test_aot.py (the real TPU
compiler, no TPU needed).

Tolerance: fp32 <= 1e-5 of the largest entry (max |a - b| / max |b|), as in tests/test_kernels.py.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deepeyes_jax.kernels import attention as attn
from deepeyes_jax.kernels import platform, tpu_attention

TOL = 1e-5


def _rel(a, b) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


def _normal(rng, *shape):
  return jnp.asarray(rng.standard_normal(shape), jnp.float32)


def _compare(fn, ref, q, k, v, ct):
  value_and_grads = lambda f: jax.jit(lambda *a: (lambda o, vjp: (o, vjp(ct)))(*jax.vjp(f, *a)))(q, k, v)
  (out, grads), (out_ref, grads_ref) = value_and_grads(fn), value_and_grads(ref)
  errs = {"out": _rel(out, out_ref)}
  errs |= {f"d{n}": _rel(g, r) for n, g, r in zip("qkv", grads, grads_ref)}
  assert np.isfinite(np.asarray(out)).all()
  assert max(errs.values()) <= TOL, errs
  return out


def _segments(lengths, t):
  seg = np.zeros(t, np.int32)
  start = 0
  for i, n in enumerate(lengths):
    seg[start : start + n] = i + 1
    start += n
  return seg


@pytest.mark.parametrize("d", [64, 80])
def test_packed_causal_training_rows(d):
  """Packed rows (several segments, a padded tail), GQA 4:2, T = 300 (padded to the splash block inside)."""
  rng = np.random.default_rng(0)
  b, t, h, kh = 2, 300, 4, 2
  seg = jnp.asarray(np.stack([_segments([120, 100, 50], t), _segments([290], t)]))
  pos = jnp.asarray(np.broadcast_to(np.arange(t, dtype=np.int32), (b, t)))
  q, ct = _normal(rng, b, t, h, d), _normal(rng, b, t, h, d)
  k, v = _normal(rng, b, t, kh, d), _normal(rng, b, t, kh, d)
  meta = dict(q_segment_ids=seg, kv_segment_ids=seg, q_positions=pos, kv_positions=pos, causal=True)
  ours = lambda q, k, v: tpu_attention.tpu_attention(q, k, v, interpret=True, **meta)
  ref = lambda q, k, v: attn.xla_attention(q, k, v, **meta)
  out = _compare(ours, ref, q, k, v, ct)
  # The padded tail (segment 0) sees no key: the mean of all values, as the reference.
  np.testing.assert_allclose(out[0, -1, 0], v[0, :, 0].mean(0), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("n, lengths", [(400, [64, 64, 40, 64, 64, 64, 16]), (1100, [64] * 8 + [300, 180, 80])])
def test_vision_windows_and_images_head_dim_80(n, lengths):
  """The vision tower's attention: one packed sequence of segments (8x8-patch windows, or whole images), non-causal,
  head_dim 80, padding at the end. 1100 patches: 5 row blocks x 3 key blocks, most pairs skipped."""
  rng = np.random.default_rng(1)
  h, d = 2, 80
  seg = jnp.asarray(_segments(lengths, n))[None]
  q, ct = _normal(rng, 1, n, h, d), _normal(rng, 1, n, h, d)
  k, v = _normal(rng, 1, n, h, d), _normal(rng, 1, n, h, d)
  ours = lambda q, k, v: tpu_attention.tpu_attention(q, k, v, q_segment_ids=seg, kv_segment_ids=seg, interpret=True)
  ref = lambda q, k, v: attn.xla_attention(q, k, v, q_segment_ids=seg, kv_segment_ids=seg)
  out = _compare(ours, ref, q, k, v, ct)
  np.testing.assert_allclose(out[0, -1, 1], v[0, :, 1].mean(0), rtol=1e-5, atol=1e-6)  # padding: mean of values


def _cache(rng, b, kh, s, d, lengths):
  k, v = _normal(rng, b, kh, s, d), _normal(rng, b, kh, s, d)
  kseg = jnp.asarray((np.arange(s)[None] < np.asarray(lengths)[:, None]).astype(np.int32))
  kpos = jnp.asarray(np.broadcast_to(np.arange(s, dtype=np.int32), (b, s)))
  return k, v, kseg, kpos


def test_extend_against_cache_with_padded_queries():
  """Extend: T = 24 new tokens per row written at per-row offsets of a heads-major cache of 1100 slots (3 key
  blocks: those past a row's length are skipped), GQA 6:2; row 1 has 10 real tokens and 14 padded ones."""
  rng = np.random.default_rng(2)
  b, t, h, kh, d, s = 2, 24, 6, 2, 64, 1100
  counts = np.array([24, 10])
  starts = np.array([700, 40])
  k, v, kseg, kpos = _cache(rng, b, kh, s, d, starts + counts)
  qpos = jnp.asarray((starts[:, None] + np.arange(t)[None]).astype(np.int32))
  qseg = jnp.asarray((np.arange(t)[None] < counts[:, None]).astype(np.int32))
  q, ct = _normal(rng, b, t, h, d), _normal(rng, b, t, h, d)
  meta = dict(
    q_segment_ids=qseg, kv_segment_ids=kseg, q_positions=qpos, kv_positions=kpos, causal=True, kv_heads_major=True
  )
  ours = lambda q, k, v: tpu_attention.tpu_attention(q, k, v, interpret=True, **meta)
  ref = lambda q, k, v: attn.xla_attention(q, k, v, **meta)
  out = _compare(ours, ref, q, k, v, ct)
  np.testing.assert_allclose(out[1, -1, 3], v[1, 1].mean(0), rtol=1e-5, atol=1e-6)  # padded query: mean of values


def test_decode_ragged_lengths_and_inactive_rows():
  """Decode: one token per row, ragged cache lengths, one inactive row (segment 0: the mean of its values)."""
  rng = np.random.default_rng(3)
  b, h, kh, d, s = 3, 7, 1, 128, 640
  lengths = np.array([5, 600, 300])
  k, v, kseg, kpos = _cache(rng, b, kh, s, d, lengths)
  qpos = jnp.asarray((lengths - 1)[:, None].astype(np.int32))
  qseg = jnp.asarray(np.array([[1], [1], [0]], np.int32))
  q = _normal(rng, b, 1, h, d)
  meta = dict(
    q_segment_ids=qseg, kv_segment_ids=kseg, q_positions=qpos, kv_positions=kpos, causal=True, kv_heads_major=True
  )
  out = tpu_attention.tpu_attention(q, k, v, interpret=True, **meta)
  ref = attn.xla_attention(q, k, v, **meta)
  assert _rel(out, ref) <= TOL
  np.testing.assert_allclose(out[2, 0, 0], v[2, 0].mean(0), rtol=1e-5, atol=1e-6)


def test_visible_ranges_skip_blocks_past_the_length():
  """The key blocks a row block reads: [first, last visible] from the block summaries."""
  qseg = jnp.asarray([[1] * 8, [1] * 8, [0] * 8])
  qpos = jnp.asarray([[4] * 8, [1500] * 8, [0] * 8])
  s = 2048
  kseg = jnp.asarray((np.arange(s)[None] < np.array([[5], [1501], [0]])).astype(np.int32))
  kpos = jnp.asarray(np.broadcast_to(np.arange(s, dtype=np.int32), (3, s)))
  vis = tpu_attention._visibility(qseg, qpos, kseg, kpos, 8, 512, True)  # (3 rows, 1 row block, 4 key blocks)
  lo, hi = tpu_attention._ranges(vis)
  assert np.asarray(lo)[:, 0].tolist()[:2] == [0, 0]
  assert np.asarray(hi)[:, 0].tolist() == [1, 3, np.asarray(lo)[2, 0]]  # row 2 sees nothing: an empty range
  # The dK/dV kernel walks the transpose: key block 3 of row 1 (slots 1536..) is seen by no row block.
  lo_t, hi_t = tpu_attention._ranges(vis.transpose(0, 2, 1))
  assert np.asarray(hi_t - lo_t)[1].tolist() == [1, 1, 1, 0]


def test_pallas_impl_routes_to_tpu_kernels_when_compiling_for_tpu(monkeypatch):
  """`attention(impl="pallas")` and "auto" follow the target platform, not the default backend; on CPU devices
  the TPU kernels run interpreted."""
  called = []
  real = tpu_attention.tpu_attention
  monkeypatch.setattr(tpu_attention, "tpu_attention", lambda *a, **kw: called.append(kw["interpret"]) or real(*a, **kw))
  rng = np.random.default_rng(4)
  q, k, v = _normal(rng, 1, 128, 2, 64), _normal(rng, 1, 128, 2, 64), _normal(rng, 1, 128, 2, 64)
  seg = jnp.ones((1, 128), jnp.int32)
  pos = jnp.arange(128, dtype=jnp.int32)[None]
  meta = dict(q_segment_ids=seg, kv_segment_ids=seg, q_positions=pos, kv_positions=pos, causal=True)
  assert attn.resolve_impl("auto") == "xla"
  with platform.compiling_for("tpu"):
    assert platform.target_platform() == "tpu" and platform.executing_platform() == "cpu"
    assert attn.resolve_impl("auto") == "pallas"
    out = attn.attention(q, k, v, impl="auto", **meta)
  assert called == [True]
  assert _rel(out, attn.xla_attention(q, k, v, **meta)) <= TOL
  assert platform.target_platform() == "cpu"


def test_queries_against_another_sequence_native_layout():
  """Neither self-attention nor a heads-major cache: T = 40 queries at slots 260.. against S = 300 keys given as
  (B, S, K, D), causal by slot, GQA 4:1 (our kernels, the keys transposed to heads-major)."""
  rng = np.random.default_rng(5)
  b, t, s, h, kh, d = 2, 40, 300, 4, 1, 64
  q, ct = _normal(rng, b, t, h, d), _normal(rng, b, t, h, d)
  k, v = _normal(rng, b, s, kh, d), _normal(rng, b, s, kh, d)
  qpos = jnp.asarray(np.broadcast_to(260 + np.arange(t, dtype=np.int32), (b, t)))
  kpos = jnp.asarray(np.broadcast_to(np.arange(s, dtype=np.int32), (b, s)))
  kseg = jnp.asarray((np.arange(s)[None] < np.array([[300], [150]])).astype(np.int32))
  qseg = jnp.ones((b, t), jnp.int32)
  meta = dict(q_segment_ids=qseg, kv_segment_ids=kseg, q_positions=qpos, kv_positions=kpos, causal=True)
  ours = lambda q, k, v: tpu_attention.tpu_attention(q, k, v, interpret=True, **meta)
  ref = lambda q, k, v: attn.xla_attention(q, k, v, **meta)
  _compare(ours, ref, q, k, v, ct)


def test_model_forward_with_tpu_kernels_equals_xla():
  """The tiny Qwen2.5-VL (vision windows + full attention, GQA decoder) with attention_impl="pallas" compiled for
  TPU (interpreted on CPU): logits equal the XLA reference's on the real tokens of a padded batch with an image."""
  from conftest import image_block, random_pixels, tiny_config

  from deepeyes_jax.models import qwen2_5_vl as qvl

  model = qvl.init_random(tiny_config(), seed=0)
  grid = (1, 8, 12)
  ids = np.array([[5, 6] + image_block(grid) + [7, 8, 9], [5] * 10 + [0] * (len(image_block(grid)) - 5)])
  mask = (np.arange(ids.shape[1])[None] < np.array([[ids.shape[1]], [10]])).astype(np.int32)
  ids[1, 10:] = 0
  inputs = qvl.prepare_inputs(model.config, ids, mask, random_pixels([grid]), np.array([grid]))
  ref = model.forward(**inputs)
  model.set_attention_impl("pallas")
  with platform.compiling_for("tpu"):
    out = model.forward(**inputs)
  real = mask.astype(bool)
  assert _rel(np.asarray(out)[real], np.asarray(ref)[real]) <= 1e-4


def test_paged_attention_as_ragged_paged_attention_sees_it():
  """The paged pool through jax's ragged paged attention: `ragged_inputs` maps our rows (bucket-padded queries,
  rows of different cached lengths, a page table in any order) to the kernel's ragged sequences. The kernel does
  not run in TPU interpret mode on jax 0.10.2 (a reshape its DMAs use is not interpretable), so the mapping is
  checked through jax's own reference of the kernel (`ref_ragged_paged_attention`, what jax tests the kernel
  against); that the kernel lowers with Mosaic on these inputs is checked in tests/test_aot.py."""
  from jax.experimental.pallas.ops.tpu.ragged_paged_attention import ref_ragged_paged_attention

  from deepeyes_jax.kernels.paged_attention import paged_attention, ragged_inputs

  b, n, h, kh, d, page, num_pages, width = 3, 4, 8, 2, 16, 16, 32, 4
  rng = np.random.default_rng(0)
  pool = _normal(rng, num_pages, page, 2 * kh, d)
  q, k, v = _normal(rng, b, n, h, d), _normal(rng, b, n, kh, d), _normal(rng, b, n, kh, d)
  before, counts = np.array([5, 17, 0]), np.array([4, 1, 3])  # cached tokens, new tokens (of the N = 4 bucket)
  tables = np.stack([rng.permutation(num_pages)[:width] for _ in range(b)]).astype(np.int32)
  valid = np.arange(n)[None] < counts[:, None]
  slots = before[:, None] + np.arange(n)[None]
  write_page = np.where(valid, np.take_along_axis(tables, np.minimum(slots // page, width - 1), 1), num_pages)
  kw = dict(
    page_table=jnp.asarray(tables),
    write_page=jnp.asarray(write_page, jnp.int32),
    write_offset=jnp.asarray(slots % page, jnp.int32),
    kv_lengths=jnp.asarray(before + counts, jnp.int32),
    q_segment_ids=jnp.asarray(valid, jnp.int32),
    q_positions=jnp.asarray(slots, jnp.int32),
  )
  out, written = paged_attention(q, k, v, pool, impl="xla", **kw)
  # The write: each new token's key and value at its page and offset, nothing else changed.
  expect = np.asarray(pool).copy()
  for r, t in zip(*np.nonzero(valid)):
    expect[tables[r, slots[r, t] // page], slots[r, t] % page] = np.stack([k[r, t], v[r, t]], 1).reshape(2 * kh, d)
  np.testing.assert_array_equal(np.asarray(written), expect)
  args = ragged_inputs(q, kw["page_table"], kw["kv_lengths"], jnp.asarray(counts, jnp.int32), page)
  ragged = ref_ragged_paged_attention(args[0], written, *args[1:], sm_scale=d**-0.5).reshape(b, n, h, d)
  assert _rel(np.asarray(ragged)[valid], np.asarray(out)[valid]) <= TOL
