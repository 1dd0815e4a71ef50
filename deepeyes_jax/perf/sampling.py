"""Sampling throughput: our KV-cache sampler against HF transformers `generate`, on the same random weights.

    python -m deepeyes_jax.perf.sampling                    # full: batches 1,8,32, prompt 256, 64 new tokens
    python -m deepeyes_jax.perf.sampling --quick            # tiny config, a smoke run of the whole script
    python -m deepeyes_jax.perf.sampling --out bench.json --dtype bfloat16 --batches 1,8 --skip_hf
    python -m deepeyes_jax.perf.sampling --device_roofline  # on a GPU: decode against the bandwidth floor

Set-up. A small Qwen2.5-VL-shaped config (the preset "sampling_bench": text 8 layers x 1024, 16 heads, 4 KV heads,
head_dim 64, vocab 32000, untied lm_head, ~161M parameters; a 4-block vision tower that text-only prompts never run;
`--quick`: "sampling_bench_quick") is
initialised randomly (`qvl.init_random`, fp32, seed 0), written with `qvl.save_pretrained` and read back by both
sides: ours with `qvl.from_pretrained(dir, dtype)` (the real loader), HF with
`Qwen2_5_VLForConditionalGeneration.from_pretrained(dir, attn_implementation="sdpa", dtype)` (`--hf_attn` picks
another). Prompts are seeded random text token ids (no special tokens), every row `prompt_len` long (no padding).
Decoding is greedy with no stop token, and the image/video placeholders are suppressed on both sides (our
sampler's default; HF gets `suppress_tokens`), so every row generates exactly `new_tokens` tokens.

Method, per batch size B:
- One warm-up run of each side, then `--reps` rounds of (ours, HF prefill, HF generate): the sides are interleaved
  so that both are timed under the same machine conditions (the speed of a shared machine drifts over minutes;
  timing all of ours and then all of HF's turned that drift into ratio noise).
- ours: `Sampler.extend` on an empty cache of capacity prompt_len + new_tokens (prefill), then `Sampler.decode`
  (max_new_tokens=new_tokens). The warm-up run compiles both; each timed run gets a fresh cache, allocated
  outside the timed region. Prefill time = extend until its outputs are ready; decode time = the
  `decode` call (it returns host data). Compile s = (first prefill - median prefill) + (first decode - median
  decode). A timed run that triggers a new compilation is an error.
- HF: prefill time = one forward of the prompt with use_cache=True and logits_to_keep=1 (what `generate` runs as
  its first step); generate time = `generate(max_new_tokens=N, min_new_tokens=N, do_sample=False)`; decode time =
  median(generate) - median(prefill).
- prefill tok/s = B * prompt_len / prefill time; decode tok/s = B * new_tokens / decode time; medians over reps;
  ratio = ours / HF (> 1: ours is faster). The JSON also has the decode ratio of each round
  (`decode_ratio_rounds`: that round's HF generate - prefill over our decode), printed under the table.
- Note: our decode runs new_tokens forwards (the last one computes logits for a token never drawn), HF's decode
  part new_tokens - 1; this is not corrected for and favours HF by ~1/new_tokens.
- Check: at batch 1 (and in fp32) the first tokens of ours and HF must agree (AssertionError otherwise); a later
  divergence (fp near-ties of a random model) or a divergence at other batch sizes only prints a warning.

Threads: torch.set_num_threads(number of usable cores); JAX keeps its default threading. HF runs on the CPU unless
`--hf_device cuda` (then each timing is bracketed by torch.cuda.synchronize()); ours on JAX's default device.

`--device_roofline` (GPU backend only): measures the device memory bandwidth from a jitted copy of a 2 GB array
(`x + 1`, bytes read + written / median time) and reports decode tok/s against the bandwidth floor: bytes of a
decode step = the parameters a step reads (text decoder and lm_head; the embedding table only through a B-row
gather, the vision tower not at all) + the KV cache up to the current length (2 * layers * kv_heads * head_dim *
dtype bytes * length * B), summed over the new_tokens steps; floor time = bytes / bandwidth.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from deepeyes_jax import sampling as smp
from deepeyes_jax.models import qwen2_5_vl as qvl
from deepeyes_jax.models.qwen2_5_vl import presets
from deepeyes_jax.perf import write_json

CHECK_FIRST = 4  # tokens of ours and HF that must agree at batch 1 (fp32)


FULL_DEFAULTS = dict(batches="1,8,32", prompt_len=256, new_tokens=64, reps=3)
QUICK_DEFAULTS = dict(batches="1,2", prompt_len=32, new_tokens=8, reps=2)


def num_cores() -> int:
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:  # not on Linux
    return os.cpu_count() or 1


# --------------------------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------------------------
def _median(xs) -> float:
  return float(statistics.median(xs))


def ours_timer(sampler: smp.Sampler, prompts: np.ndarray, new_tokens: int):
  """A callable timing one run of ours: () -> (prefill s, decode s, DecodeResult)."""
  b, p = prompts.shape
  chunks = [smp.Chunk(row.tolist()) for row in prompts]

  def once():
    cache = jax.block_until_ready(sampler.init_cache(b, p + new_tokens))
    t0 = time.perf_counter()
    cache, logits = sampler.extend(cache, chunks)
    jax.block_until_ready((cache, logits))
    t1 = time.perf_counter()
    cache, res = sampler.decode(cache, logits, max_new_tokens=new_tokens, params=smp.GREEDY)
    t2 = time.perf_counter()
    del cache
    return t1 - t0, t2 - t1, res

  return once


def summarize_ours(prompts: np.ndarray, new_tokens: int, first, runs) -> dict:
  """Medians of the timed runs (first = the compiling warm-up run)."""
  b, p = prompts.shape
  first_pre, first_dec, _ = first
  res = runs[-1][2]
  if any(len(t) != new_tokens for t in res.tokens):
    raise RuntimeError(f"batch {b}: expected {new_tokens} tokens per row, got stop reasons {set(res.stop_reason)}")
  pre = _median([r[0] for r in runs])
  dec = _median([r[1] for r in runs])
  return dict(
    prefill_s=pre,
    decode_s=dec,
    prefill_runs_s=[r[0] for r in runs],
    decode_runs_s=[r[1] for r in runs],
    first_prefill_s=first_pre,
    first_decode_s=first_dec,
    compile_s=max(0.0, first_pre - pre) + max(0.0, first_dec - dec),
    prefill_tok_s=b * p / pre,
    decode_tok_s=b * new_tokens / dec,
    tokens=res.tokens,
  )


def load_hf(path: str, dtype: str, attn: str, device: str = "cpu"):
  import torch
  import transformers

  model = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(
    path, attn_implementation=attn, dtype=getattr(torch, dtype)
  ).eval()
  model = model.to(device)
  model.generation_config.eos_token_id = None  # no stop token: every row runs to max_new_tokens
  return model


def hf_timers(model, prompts: np.ndarray, new_tokens: int, suppress: list[int], pad_id: int):
  """Callables timing HF (run them under torch.inference_mode()): prefill () -> s, generate () -> (s, tokens)."""
  import torch

  b, p = prompts.shape
  device = model.device
  ids = torch.from_numpy(prompts.astype(np.int64)).to(device)
  mask = torch.ones_like(ids)
  sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)  # CUDA calls return before the work

  def prefill():
    sync()
    t0 = time.perf_counter()
    model(input_ids=ids, attention_mask=mask, use_cache=True, logits_to_keep=1)
    sync()
    return time.perf_counter() - t0

  def generate():
    sync()
    t0 = time.perf_counter()
    out = model.generate(
      input_ids=ids,
      attention_mask=mask,
      max_new_tokens=new_tokens,
      min_new_tokens=new_tokens,
      do_sample=False,
      pad_token_id=pad_id,
      suppress_tokens=suppress,
    )
    sync()
    return time.perf_counter() - t0, out[:, p:].cpu().numpy()

  return prefill, generate


def summarize_hf(prompts: np.ndarray, new_tokens: int, pre_runs: list[float], gen: list) -> dict:
  b, p = prompts.shape
  pre = _median(pre_runs)
  gen_s = _median([g[0] for g in gen])
  tokens = gen[-1][1]
  if tokens.shape != (b, new_tokens):
    raise RuntimeError(f"HF batch {b}: generated shape {tokens.shape}, expected {(b, new_tokens)}")
  dec = max(gen_s - pre, 1e-9)
  return dict(
    prefill_s=pre,
    generate_s=gen_s,
    decode_s=dec,
    prefill_runs_s=pre_runs,
    generate_runs_s=[g[0] for g in gen],
    prefill_tok_s=b * p / pre,
    decode_tok_s=b * new_tokens / dec,
    tokens=tokens.tolist(),
  )


def run_batch(sampler, hf, prompts: np.ndarray, new_tokens: int, reps: int, suppress, pad_id) -> dict:
  """Warm-up of each side, then `reps` rounds of (ours, HF prefill, HF generate), interleaved so that both sides
  are timed under the same machine conditions (on a shared machine the speed drifts over minutes)."""
  b = prompts.shape[0]
  ours_once = ours_timer(sampler, prompts, new_tokens)
  first = ours_once()
  compiled = sampler.num_compiles
  if hf is not None:
    import torch

    hf_prefill, hf_generate = hf_timers(hf, prompts, new_tokens, suppress, pad_id)
    mode = torch.inference_mode()
  else:
    mode = contextlib.nullcontext()
  runs, pre_runs, gen_runs = [], [], []
  with mode:
    if hf is not None:
      hf_prefill()
      hf_generate()
    for _ in range(reps):
      runs.append(ours_once())
      if hf is not None:
        pre_runs.append(hf_prefill())
        gen_runs.append(hf_generate())
  if sampler.num_compiles != compiled:
    raise RuntimeError(f"batch {b}: a timed run compiled again ({sampler.signatures})")
  row = dict(batch=b, ours=summarize_ours(prompts, new_tokens, first, runs))
  if hf is not None:
    h = summarize_hf(prompts, new_tokens, pre_runs, gen_runs)
    o = row["ours"]
    # Per round: HF's decode time is that round's generate minus its prefill.
    hf_dec_runs = [max(g[0] - p, 1e-9) for g, p in zip(gen_runs, pre_runs)]
    row.update(
      hf=h,
      prefill_ratio=o["prefill_tok_s"] / h["prefill_tok_s"],
      decode_ratio=o["decode_tok_s"] / h["decode_tok_s"],
      decode_ratio_rounds=[hd / od for hd, od in zip(hf_dec_runs, o["decode_runs_s"])],
    )
  return row


def check_tokens(b: int, ours: list[list[int]], hf: list[list[int]], strict: bool) -> dict:
  """Compares generated tokens row by row; at batch 1 (strict) the first CHECK_FIRST must agree."""
  agree = []
  for o, h in zip(ours, hf):
    n = next((i for i, (x, y) in enumerate(zip(o, h)) if x != y), min(len(o), len(h)))
    agree.append(n)
  n_tok = len(ours[0])
  full = sum(a == n_tok for a in agree)
  k = min(CHECK_FIRST, n_tok)
  if b == 1 and agree[0] < k:
    msg = f"batch 1: ours and HF disagree within the first {k} tokens: ours {ours[0][:k]}, HF {hf[0][:k]}"
    if strict:
      raise AssertionError(msg)
    warnings.warn(msg + " (not fp32: not fatal)", stacklevel=2)
  if full < b:
    warnings.warn(
      f"batch {b}: {b - full}/{b} rows diverge from HF before token {n_tok} (first divergence at token "
      f"{min(agree)}); fp near-ties of a random model are the usual cause",
      stacklevel=2,
    )
  return dict(rows_identical=full, rows=b, first_divergence=min(agree) if full < b else None)


# --------------------------------------------------------------------------------------------------------------
# Roofline (GPU)
# --------------------------------------------------------------------------------------------------------------
def measure_bandwidth(nbytes: int = 2 * 10**9, reps: int = 10) -> float:
  """Device memory bandwidth in bytes/s from a jitted elementwise copy of an `nbytes` array (read + write)."""
  x = jnp.ones((nbytes // 4,), jnp.float32)
  copy = jax.jit(lambda a: a + 1)  # not `a + 0`: XLA may fold that to no copy at all
  jax.block_until_ready(copy(x))
  times = []
  for _ in range(reps):
    t0 = time.perf_counter()
    jax.block_until_ready(copy(x))
    times.append(time.perf_counter() - t0)
  return 2 * x.nbytes / _median(times)


def decode_param_bytes(model: qvl.Qwen25VL, batch: int) -> int:
  """Bytes of parameters one decode step reads: the text decoder and lm_head (the embedding table only through
  a `batch`-row gather unless tied to the lm_head), never the vision tower."""
  total = 0
  for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    names = [str(x) for x in path]
    if names[0] == "visual":
      continue
    a = v.get_value()
    if "embed_tokens" in names and not model.config.tie_word_embeddings:
      total += batch * a.shape[-1] * a.dtype.itemsize
    else:
      total += a.size * a.dtype.itemsize
  return total


def roofline(model: qvl.Qwen25VL, b: int, prompt_len: int, new_tokens: int, bandwidth: float, ours: dict) -> dict:
  t = model.config.text
  item = jnp.dtype(model.dtype).itemsize
  kv_per_token = 2 * t.num_hidden_layers * t.num_key_value_heads * t.head_dim * item * b
  params = decode_param_bytes(model, b)
  steps_bytes = [params + kv_per_token * (prompt_len + s) for s in range(new_tokens)]
  floor_s = sum(steps_bytes) / bandwidth
  floor_tok_s = b * new_tokens / floor_s
  return dict(
    bytes_per_step_first=steps_bytes[0],
    bytes_per_step_last=steps_bytes[-1],
    floor_decode_s=floor_s,
    floor_decode_tok_s=floor_tok_s,
    fraction_of_floor=ours["decode_tok_s"] / floor_tok_s,
  )


# --------------------------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------------------------
def _fmt(x, spec=",.1f") -> str:
  return "-" if x is None else format(x, spec)


def print_table(rows: list[dict], hf_label: str | None, roof: bool) -> None:
  cols = [
    ("batch", 5),
    ("ours prefill tok/s", 18),
    ("HF prefill tok/s", 16),
    ("ratio", 6),
    ("ours decode tok/s", 17),
    ("HF decode tok/s", 15),
    ("ratio", 6),
    ("ours compile s", 14),
  ]
  if roof:
    cols += [("floor decode tok/s", 18), ("of floor", 8)]
  print("  ".join(f"{name:>{w}}" for name, w in cols))
  print("  ".join("-" * w for _, w in cols))
  for r in rows:
    o, h, rf = r["ours"], r.get("hf"), r.get("roofline")
    vals = [
      str(r["batch"]),
      _fmt(o["prefill_tok_s"]),
      _fmt(h and h["prefill_tok_s"]),
      _fmt(r.get("prefill_ratio"), ".2f"),
      _fmt(o["decode_tok_s"]),
      _fmt(h and h["decode_tok_s"]),
      _fmt(r.get("decode_ratio"), ".2f"),
      _fmt(o["compile_s"], ".2f"),
    ]
    if roof:
      vals += [_fmt(rf and rf["floor_decode_tok_s"]), _fmt(rf and rf["fraction_of_floor"], ".1%")]
    print("  ".join(f"{v:>{w}}" for v, (_, w) in zip(vals, cols)))
  print("ratio = ours / HF (> 1: ours faster)." + (f" HF: {hf_label}." if hf_label else " HF skipped."))
  for r in rows:
    if "decode_ratio_rounds" in r:
      rounds = ", ".join(f"{x:.2f}" for x in r["decode_ratio_rounds"])
      print(f"batch {r['batch']}: decode ratio of each interleaved round: {rounds}")


def parse_args(argv=None) -> argparse.Namespace:
  ap = argparse.ArgumentParser(
    prog="python -m deepeyes_jax.perf.sampling", description=__doc__.split("\n\n")[0].strip()
  )
  ap.add_argument("--quick", action="store_true", help="tiny config, batches 1,2, prompt 32, 8 new tokens")
  ap.add_argument("--out", help="write the results as JSON to this file")
  ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="both sides' dtype")
  ap.add_argument("--batches", help=f"comma-separated batch sizes (default {FULL_DEFAULTS['batches']})")
  ap.add_argument("--prompt_len", type=int, help=f"prompt tokens per row (default {FULL_DEFAULTS['prompt_len']})")
  ap.add_argument("--new_tokens", type=int, help=f"generated tokens per row (default {FULL_DEFAULTS['new_tokens']})")
  ap.add_argument("--reps", type=int, help=f"timed repetitions, >= 2 (default {FULL_DEFAULTS['reps']})")
  ap.add_argument("--seed", type=int, default=0, help="weights and prompts seed")
  ap.add_argument("--skip_hf", action="store_true", help="only time ours")
  ap.add_argument("--hf_attn", default="sdpa", choices=["sdpa", "eager"], help="HF attention implementation")
  ap.add_argument("--hf_device", default="cpu", help="torch device of the HF model: cpu (default) or cuda")
  ap.add_argument("--device_roofline", action="store_true", help="GPU only: decode against the bandwidth floor")
  args = ap.parse_args(argv)
  defaults = QUICK_DEFAULTS if args.quick else FULL_DEFAULTS
  for k, v in defaults.items():
    if getattr(args, k) is None:
      setattr(args, k, v)
  args.batches = [int(x) for x in str(args.batches).split(",") if x.strip()]
  if args.reps < 2:
    ap.error("--reps must be >= 2")
  if min(args.batches) < 1 or args.prompt_len < 1 or args.new_tokens < 1:
    ap.error("batches, --prompt_len and --new_tokens must be >= 1")
  return args


def main(argv=None) -> dict:
  args = parse_args(argv)
  cfg = presets.preset("sampling_bench_quick" if args.quick else "sampling_bench")
  dtype = jnp.dtype(args.dtype)
  cores = num_cores()
  backend = jax.default_backend()
  roof = args.device_roofline and backend == "gpu"
  roof_note = None
  if args.device_roofline and not roof:
    roof_note = f"--device_roofline needs a GPU backend (jax.default_backend() is {backend!r}): skipped"
    print(roof_note)

  hf_versions = {}
  if not args.skip_hf:
    import torch
    import transformers

    torch.set_num_threads(cores)
    if args.hf_device.startswith("cuda") and not torch.cuda.is_available():
      raise SystemExit(f"--hf_device {args.hf_device}: torch {torch.__version__} sees no CUDA device")
    hf_versions = dict(
      torch=torch.__version__, transformers=transformers.__version__, torch_threads=cores, hf_device=args.hf_device
    )

  with tempfile.TemporaryDirectory(prefix="bench_qwen25vl_") as ckpt:
    t0 = time.perf_counter()
    qvl.save_pretrained(qvl.init_random(cfg, dtype=jnp.float32, seed=args.seed), ckpt)
    model = qvl.from_pretrained(ckpt, dtype=dtype)
    hf = None if args.skip_hf else load_hf(ckpt, args.dtype, args.hf_attn, args.hf_device)
    setup_s = time.perf_counter() - t0

  n_params = qvl.param_count(model)
  n_vision = sum(int(np.prod(v.shape)) for v in jax.tree.leaves(nnx.state(model.visual, nnx.Param)))
  t = cfg.text
  print(
    f"config: {'quick' if args.quick else 'full'}, {n_params / 1e6:.1f}M params ({(n_params - n_vision) / 1e6:.1f}M "
    f"text, {n_vision / 1e6:.1f}M vision); text {t.num_hidden_layers} x {t.hidden_size}, heads {t.num_attention_heads}"
    f"/{t.num_key_value_heads} KV, head_dim {t.head_dim}, vocab {t.vocab_size}; {args.dtype}"
  )
  print(
    f"prompt {args.prompt_len}, new tokens {args.new_tokens}, batches {args.batches}, reps {args.reps} (median); "
    f"jax {jax.__version__} on {backend} ({jax.devices()[0].device_kind}), {cores} cores"
    + (f"; torch {hf_versions['torch']} ({cores} threads), HF attn {args.hf_attn}" if hf else "")
    + f"; set-up {setup_s:.1f} s"
  )

  bandwidth = measure_bandwidth() if roof else None
  if roof:
    print(f"measured device bandwidth: {bandwidth / 1e9:.0f} GB/s")

  sampler = smp.Sampler(model)
  rng = np.random.default_rng(args.seed)
  suppress = [cfg.image_token_id, cfg.video_token_id]
  rows = []
  for b in args.batches:
    prompts = rng.integers(3, cfg.image_token_id, size=(b, args.prompt_len), dtype=np.int64)
    print(f"batch {b}: ours{' and HF, interleaved' if hf is not None else ''} ...", end="", flush=True)
    t0 = time.perf_counter()
    row = run_batch(sampler, hf, prompts, args.new_tokens, args.reps, suppress, cfg.pad_token_id)
    ours, h = row["ours"], row.get("hf")
    print(f" {time.perf_counter() - t0:.1f} s", end="", flush=True)
    print(flush=True)
    if hf is not None:
      row["token_check"] = check_tokens(b, ours["tokens"], h["tokens"], strict=args.dtype == "float32")
    if roof:
      row["roofline"] = roofline(model, b, args.prompt_len, args.new_tokens, bandwidth, ours)
    rows.append(row)

  print()
  hf_label = (
    f"transformers {hf_versions.get('transformers')} generate, attn={args.hf_attn}, {args.hf_device}" if hf else None
  )
  print_table(rows, hf_label, roof)

  result = dict(
    benchmark="sampling",
    quick=args.quick,
    dtype=args.dtype,
    prompt_len=args.prompt_len,
    new_tokens=args.new_tokens,
    reps=args.reps,
    seed=args.seed,
    config=cfg.to_hf_dict(),
    config_dataclass=dataclasses.asdict(cfg),
    param_count=n_params,
    param_count_text=n_params - n_vision,
    param_count_vision=n_vision,
    versions=dict(jax=jax.__version__, python=platform.python_version(), **hf_versions),
    backend=backend,
    device_kind=jax.devices()[0].device_kind,
    cpu_count=cores,
    hf_attn_implementation=None if hf is None else args.hf_attn,
    device_roofline=dict(requested=args.device_roofline, bandwidth_bytes_s=bandwidth, note=roof_note),
    method=__doc__[__doc__.index("Method") :],
    results=[
      {k: ({kk: vv for kk, vv in v.items() if kk != "tokens"} if k in ("ours", "hf") else v) for k, v in r.items()}
      for r in rows
    ],
  )
  if args.out:
    write_json(args.out, result)
  return result


if __name__ == "__main__":
  main(sys.argv[1:])
