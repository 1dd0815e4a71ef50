"""Attention kernels: time, TFLOP/s and fraction of the measured matmul peak, per implementation and shape class.

    python -m deepeyes_jax.perf.attention                        # full shapes (meant for a GPU)
    python -m deepeyes_jax.perf.attention --quick                # small shapes, < 1 minute on a CPU
    python -m deepeyes_jax.perf.attention --out bench.json --dtype bfloat16 --impls xla,pallas

Implementations: every `attention(impl=...)` available on the backend: "xla" always, "pallas" (on CPU in interpret
mode: a correctness smoke run, its times say nothing about the kernel), "cudnn" on GPU only.

Shape classes (full; `--quick` shrinks every dimension so the CPU finishes in well under a minute):
- vision_windows: one image of 64 x 64 patches, 8 x 8-patch windows (64 windows of 64 tokens, contiguous as the
  vision tower orders them), 16 heads, head_dim 80, non-causal; segment id = window.
- vision_full: the same 4096 tokens as one segment (the tower's full-attention blocks).
- prefill_8k: 8192 tokens causal, 28 query heads / 4 KV heads, head_dim 128 (Qwen2.5-VL-7B decoder).
- decode_64x8k: batch 64, one query token each against an 8192-slot cache, ragged lengths drawn uniformly in
  [S/2, S] (kv segment = slot < length, query at slot length - 1), 28 / 4 heads, head_dim 128.
- paged_decode_64x8k: the decode_64x8k rows with their keys/values in a paged KV pool (pages of 16 slots, each row's
  pages scattered over the pool in random order, keys and values interleaved by head as the rollout engine stores
  them). "xla" gathers each row's pages and attends (the reference path of `kernels.paged_attention`), "pallas"
  reads the pages in place (`kernels.gpu_paged_attention`; TPU has jax's ragged paged attention instead), "cudnn"
  attends over the gathered pages.
- train_packed_8k (forward + backward): one 8192-token row packed with uneven documents and a padded tail, causal
  + segment ids, 28 / 4 heads, head_dim 128; timed as the gradient w.r.t. q, k, v of sum(out * ct).

FLOPs are the useful ones: 4 * D per visible (query, key, head) pair for the forward (two matmuls), 3x that for
forward + backward (dV, dP, dQ, dK: four more matmuls; the recomputation of P is not counted). Visible pairs are
counted exactly from the segment ids / positions. Peak: median time of a jitted square matmul in the benchmark
dtype (8192 on an accelerator, 1024 on CPU), 2 n^3 / t. Fraction of peak = TFLOP/s / peak. GB/s = the bytes of q,
k, v and the output that must be touched at least once (K/V of a decode row only up to its length) / time: the
number to watch for decode, which is bandwidth-bound.

Method: each (impl, shape) is one jitted function of the arrays; the first call (compile + run) is timed
separately; then `--reps` calls, each waited for with `block_until_ready`, median reported. The output is compared
with the "xla" reference on the same inputs (max |a - b| / max |b|, column `err`). A shape whose estimated time
exceeds `--max_seconds` (from the FLOPs and the measured peak; on CPU the Pallas interpreter is charged 1000x) is
skipped and listed as such. A run that fails (e.g. a cuDNN shape constraint) is reported with its error, not fatal.
"""

from __future__ import annotations

import argparse
import dataclasses
import platform
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from deepeyes_jax.kernels import attention as attn
from deepeyes_jax.kernels import gpu_paged_attention, paged_attention
from deepeyes_jax.perf import write_json

PAGE = 16  # slots per page of the paged shape class (the rollout engine's default page size)


@dataclasses.dataclass(frozen=True)
class Shape:
  name: str
  b: int
  t: int
  s: int
  h: int
  kh: int
  d: int
  kind: str  # "windows" | "full" | "prefill" | "decode" | "paged" | "packed"
  window: int = 0  # tokens per window (kind "windows")
  backward: bool = False


def shapes(quick: bool) -> list[Shape]:
  """The six shape classes: the 7B recipe's sizes, or small ones (--quick)."""
  vis, vis_heads, window = (256, 4, 16) if quick else (4096, 16, 64)  # vision tokens per image, heads, window
  txt, heads, kv_heads = (256, 7, 1) if quick else (8192, 28, 4)  # text tokens, query / KV heads
  rows, cached = (4, 512) if quick else (64, 8192)  # decode rows and their cache length
  sfx, dec = ("", "decode") if quick else ("_8k", "decode_64x8k")
  return [
    Shape("vision_windows", 1, vis, vis, vis_heads, vis_heads, 80, "windows", window=window),
    Shape("vision_full", 1, vis, vis, vis_heads, vis_heads, 80, "full"),
    Shape("prefill" + sfx, 1, txt, txt, heads, kv_heads, 128, "prefill"),
    Shape(dec, rows, 1, cached, heads, kv_heads, 128, "decode"),
    Shape("paged_" + dec, rows, 1, cached, heads, kv_heads, 128, "paged"),
    Shape("train_packed" + sfx, 1, txt, txt, heads, kv_heads, 128, "packed", backward=True),
  ]


def make_inputs(sh: Shape, dtype, seed: int = 0):
  """(q, k, v, ct, meta kwargs, visible pairs per head, bytes touched)."""
  rng = np.random.default_rng(seed)
  q = rng.standard_normal((sh.b, sh.t, sh.h, sh.d), np.float32)
  k = rng.standard_normal((sh.b, sh.s, sh.kh, sh.d), np.float32)
  v = rng.standard_normal((sh.b, sh.s, sh.kh, sh.d), np.float32)
  ct = rng.standard_normal((sh.b, sh.t, sh.h, sh.d), np.float32)
  kv_len = np.full((sh.b,), sh.s)
  causal = sh.kind in ("prefill", "decode", "packed")
  if sh.kind == "windows":
    seg = np.repeat(np.arange(sh.t // sh.window) + 1, sh.window)[None].astype(np.int32)
    meta = dict(q_segment_ids=seg, kv_segment_ids=seg)
  elif sh.kind == "full":
    meta = {}
  elif sh.kind == "prefill":
    pos = np.arange(sh.t, dtype=np.int32)[None]
    meta = dict(q_positions=pos, kv_positions=pos)
  elif sh.kind in ("decode", "paged"):
    kv_len = rng.integers(sh.s // 2, sh.s + 1, size=sh.b)
    meta = dict(
      q_segment_ids=np.ones((sh.b, 1), np.int32),
      kv_segment_ids=(np.arange(sh.s)[None] < kv_len[:, None]).astype(np.int32),
      q_positions=(kv_len - 1)[:, None].astype(np.int32),
      kv_positions=np.broadcast_to(np.arange(sh.s, dtype=np.int32), (sh.b, sh.s)).copy(),
    )
  elif sh.kind == "packed":
    seg = np.zeros((sh.b, sh.t), np.int32)
    for r in range(sh.b):
      start, i = 0, 1
      while start < sh.t * 15 // 16:  # uneven documents, a padded tail
        n = int(rng.integers(sh.t // 16, sh.t // 3))
        seg[r, start : start + n] = i
        start, i = start + n, i + 1
      seg[r, sh.t * 15 // 16 :] = 0
    pos = np.broadcast_to(np.arange(sh.t, dtype=np.int32), (sh.b, sh.t)).copy()
    meta = dict(q_segment_ids=seg, kv_segment_ids=seg, q_positions=pos, kv_positions=pos)
  else:
    raise ValueError(sh.kind)
  mask = attn.make_mask(
    meta.get("q_segment_ids"),
    meta.get("kv_segment_ids"),
    meta.get("q_positions"),
    meta.get("kv_positions"),
    causal,
    (sh.b, sh.t, sh.s),
  )
  pairs = sh.b * sh.t * sh.s if mask is None else int(np.asarray(mask).sum())
  itemsize = jnp.dtype(dtype).itemsize
  nbytes = itemsize * sh.d * (2 * sh.b * sh.t * sh.h + 2 * int(kv_len.sum()) * sh.kh)
  if sh.kind == "paged":  # k, v -> one pool (P, page, 2K, D), row r's slot t at page table[r, t // page]
    width = sh.s // PAGE
    order = rng.permutation(sh.b * width).astype(np.int32)
    meta["page_table"] = order.reshape(sh.b, width)
    pool = np.zeros((sh.b * width, PAGE, 2 * sh.kh, sh.d), np.float32)
    kv = np.stack([k, v], axis=3).reshape(sh.b, width, PAGE, 2 * sh.kh, sh.d)
    pool[meta["page_table"]] = kv
    k = v = pool  # the pool once, under both names (the timed functions read it once)
  arrays = tuple(jnp.asarray(x, dtype) for x in (q, k, v, ct))
  meta = {n: jnp.asarray(x) for n, x in meta.items()}
  return arrays, meta, causal, pairs, nbytes


def measure_peak(dtype, n: int, reps: int) -> float:
  """TFLOP/s of a jitted n x n matmul."""
  a = jax.random.normal(jax.random.key(0), (n, n), dtype)
  f = jax.jit(lambda x, y: x @ y)
  f(a, a).block_until_ready()
  times = []
  for _ in range(reps):
    t0 = time.perf_counter()
    f(a, a).block_until_ready()
    times.append(time.perf_counter() - t0)
  return 2 * n**3 / statistics.median(times) / 1e12


def available_impls(backend: str) -> list[str]:
  return ["xla", "pallas"] + (["cudnn"] if backend == "gpu" else [])


def build(impl: str, sh: Shape, causal: bool, meta):
  if sh.kind == "paged":
    return _build_paged(impl, meta)

  def fwd(q, k, v):
    return attn.attention(q, k, v, causal=causal, impl=impl, **meta)

  if not sh.backward:
    return jax.jit(lambda q, k, v, ct: fwd(q, k, v))

  def loss(q, k, v, ct):
    return jnp.sum(fwd(q, k, v).astype(jnp.float32) * ct.astype(jnp.float32))

  return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))


def _build_paged(impl: str, meta):
  """One decode step's attention over a paged pool (the new token already written): pages read in place by the
  Pallas kernel, or gathered per row first (the XLA reference; cuDNN attends over the gathered pages)."""
  table, qpos, qseg = meta["page_table"], meta["q_positions"], meta["q_segment_ids"]

  def read(q, pool, _, ct):
    if impl == "pallas":
      return gpu_paged_attention.paged_flash(q, pool, table, qpos, qseg)
    keys, values = paged_attention.paged_gather(pool, table)
    kw = {n: meta[n] for n in ("q_segment_ids", "kv_segment_ids", "q_positions", "kv_positions")}
    return attn.attention(q, keys, values, causal=True, impl=impl, **kw)

  return jax.jit(read)


def rel_err(a, b) -> float:
  a = [np.asarray(x, np.float64) for x in jax.tree.leaves(a)]
  b = [np.asarray(x, np.float64) for x in jax.tree.leaves(b)]
  return max(float(np.abs(x - y).max() / max(np.abs(y).max(), 1e-30)) for x, y in zip(a, b))


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--quick", action="store_true", help="small shapes (CPU smoke run)")
  p.add_argument("--out", default=None, help="write the results as JSON here")
  p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32", "float16"])
  p.add_argument("--impls", default=None, help="comma-separated subset of the available implementations")
  p.add_argument("--shapes", default=None, help="comma-separated subset of the shape class names")
  p.add_argument("--reps", type=int, default=None, help="timed runs per case (default 10; 3 with --quick)")
  p.add_argument("--max_seconds", type=float, default=None, help="skip a case estimated to run longer than this")
  args = p.parse_args(argv)

  backend = jax.default_backend()
  device = jax.devices()[0]
  dtype = jnp.dtype(args.dtype)
  reps = args.reps or (3 if args.quick else 10)
  max_seconds = args.max_seconds or (2.0 if args.quick else 30.0)
  impls = available_impls(backend)
  if args.impls:
    wanted = args.impls.split(",")
    unknown = [i for i in wanted if i not in impls]
    if unknown:
      p.error(f"implementations {unknown} are not available on backend {backend!r} (available: {impls})")
    impls = wanted
  cases = shapes(args.quick)
  if args.shapes:
    cases = [c for c in cases if c.name in args.shapes.split(",")]

  peak_n = 1024 if backend == "cpu" else 8192
  peak = measure_peak(dtype, peak_n, reps=max(reps, 3))
  print(f"backend {backend} ({device.device_kind}), dtype {dtype.name}, matmul peak {peak:.3f} TFLOP/s (n={peak_n})")
  if backend == "cpu" and "pallas" in impls:
    print("note: pallas runs in interpret mode on CPU; its times are not kernel performance")

  results, skipped = [], []
  for sh in cases:
    (q, k, v, ct), meta, causal, pairs, nbytes = make_inputs(sh, dtype)
    flops = 4 * sh.d * sh.h * pairs * (3 if sh.backward else 1)
    ref_out = None
    for impl in impls:
      slowdown = 1000.0 if (backend == "cpu" and impl == "pallas") else 1.0
      if impl == "xla":  # the reference materialises all logits: charge the masked ones too
        slowdown *= sh.b * sh.t * sh.s / max(pairs, 1)
      estimate = flops / (peak * 1e12) * slowdown
      if estimate > max_seconds:
        msg = f"{sh.name}/{impl}: skipped, estimated {estimate:.0f} s per run > --max_seconds {max_seconds:g}"
        print(msg)
        skipped.append(dict(shape=sh.name, impl=impl, reason=msg))
        continue
      row = dict(shape=sh.name, impl=impl, **dataclasses.asdict(sh), visible_pairs=pairs, flops=flops, bytes=nbytes)
      try:
        fn = build(impl, sh, causal, meta)
        t0 = time.perf_counter()
        out = jax.block_until_ready(fn(q, k, v, ct))
        first = time.perf_counter() - t0
        times = []
        for _ in range(reps):
          t0 = time.perf_counter()
          jax.block_until_ready(fn(q, k, v, ct))
          times.append(time.perf_counter() - t0)
      except Exception as e:  # noqa: BLE001 - a failing implementation is a result, not a crash
        row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
        print(f"{sh.name}/{impl}: failed: {row['error']}")
        results.append(row)
        continue
      t = statistics.median(times)
      if impl == "xla":
        ref_out = out
      row.update(
        first_call_s=first,
        time_ms=t * 1e3,
        tflops=flops / t / 1e12,
        frac_peak=flops / t / 1e12 / peak,
        gbps=nbytes / t / 1e9,
        err_vs_xla=None if ref_out is None else rel_err(out, ref_out),
      )
      results.append(row)

  header = f"{'shape':<18} {'impl':<7} {'ms':>10} {'TFLOP/s':>9} {'%peak':>7} {'GB/s':>9} {'err':>9} {'first s':>8}"
  print(header)
  print("-" * len(header))
  for r in results:
    if "error" in r:
      print(f"{r['shape']:<18} {r['impl']:<7} failed: {r['error']}")
      continue
    err = "-" if r["err_vs_xla"] is None else f"{r['err_vs_xla']:.1e}"
    print(
      f"{r['shape']:<18} {r['impl']:<7} {r['time_ms']:>10.3f} {r['tflops']:>9.3f} {100 * r['frac_peak']:>6.1f}% "
      f"{r['gbps']:>9.1f} {err:>9} {r['first_call_s']:>8.2f}"
    )
  if args.out:
    payload = dict(
      backend=backend,
      device=device.device_kind,
      dtype=dtype.name,
      quick=args.quick,
      reps=reps,
      peak_tflops=peak,
      peak_matmul_n=peak_n,
      jax_version=jax.__version__,
      python=platform.python_version(),
      results=results,
      skipped=skipped,
    )
    write_json(args.out, payload)
  return 0


if __name__ == "__main__":
  sys.exit(main())
