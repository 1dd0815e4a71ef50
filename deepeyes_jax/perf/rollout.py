"""Multi-turn rollout throughput: the continuous engine (paged KV pool, decode slots) against the lock-step one.

    python -m deepeyes_jax.perf.rollout --out FILE.json     # full: 4 tasks x G=8, text 2 x 256, ~5 min
    python -m deepeyes_jax.perf.rollout --quick              # tiny config, 4 tasks x G=4 (a smoke run)
    python -m deepeyes_jax.perf.rollout --slots 16 --segment_release 0.5 --layers 4 --tasks 8

Set-up. A small Qwen2.5-VL-shaped model and the tiny tokenizer (534 ids) written by
`models.qwen2_5_vl.tiny.build_tiny_checkpoint` into a temporary directory (the preset "rollout_bench": text
`--layers` (2) x 256, 4 heads / 2 KV heads, head_dim 64, a 2-block vision tower 64 wide; quick: the preset
"rollout_bench_quick", 2 x 64; random normal(0.02) weights, seed 0) and
read back with `qvl.from_pretrained(dir, float32)` (no downloads). Two
layers, not four, keep the full run at ~5 min on the 2-core machine: both engines' costs scale with the layers.

Workload (seeded, the same for both engines). N tasks (random-noise images, each side drawn in [160, 640] px,
resized into a small pixel budget, `--max_pixels`), G samples each. Every row's turns are scripted
(`run_rollouts(scripted_turns=...)`: forced tokens; the model still runs on and scores every token, so the work
is that of sampled turns of the same lengths): 0-3 zoom-in calls with random boxes (so crops of varied sizes),
then an answer, each turn `<think>` + filler words + `</think>` + the tool call (or answer) + `<|im_end|>`, in the
formats of tests/test_rollout_engine.py. The filler length of each turn is heavy-tailed: lognormal (median
`--think_median` tokens, sigma `--think_sigma`) capped at `--think_cap`: most turns are short, a few are long,
which is what makes lock-step decoding wait. Trajectories are ~700-1,900 tokens (a ~600-token prompt: the DeepEyes
system prompt under the tiny tokenizer, and the image) against a cache capacity (`max_total_tokens`) of 4,096,
as in the real recipe (a 28,672-token capacity, ~6,000-token trajectories).

Engines (`AgentConfig.engine`): old = "lockstep" with max_concurrent_rows=0, what callers ran before: every row
in one contiguous cache of rows x max_total_tokens, each turn decoded by all rows in lock-step (a turn lasts as long
as its longest row), every row's prompt prefilled. New = "continuous": `--slots` decode slots over a paged pool
(`--page_size` tokens a page) that grows on demand, one prompt prefill per group, decode segments of at most
`--segment_steps` steps that end once a `--segment_release` fraction of the rows in flight ended their turn.

Method. One warm-up run of each engine (it compiles everything the timed runs need; a timed run that compiles
again is counted in `recompiled` in the JSON and warned about), then `--rounds` rounds, each running both engines
once, the order alternating (round 1: old then new, round 2: new then old, ...), so that both see the same machine
conditions (the speed of a shared machine drifts over minutes). Each run is one `run_rollouts` call, wall-clock to
the returned trajectories (host work included: tokenising, cropping, image preprocessing, page bookkeeping).
Reported per engine, medians over the rounds: wall s, trajectories/s, generated tokens/s (token_steps / wall),
slot utilisation (token_steps / slot_steps: the fraction of the row-steps computed that produced a token; idle
slots count), KV bytes (old: the contiguous cache; new: the pool allocated at its largest, and the most pages rows
held at once), prompt tokens prefilled, observation tokens extended, decode segments (old: one per turn), compile
s = warm-up run - median run. Ratios: trajectories/s new / old (median of the per-round ratios), peak KV bytes old
/ new (allocated), prefill tokens old / new.

Check: the trajectories of the two engines (token ids, action masks, stop reasons, and the log-probs to 1e-5)
must be identical, else AssertionError.

Defaults of the new engine, from single runs of the new engine on the full workload (2-core CPU, a busy machine;
median of 2 timed runs each): `--slots` 8 (14.5 s) against 4 (12.5 s), 12 (19.8 s), 16 (24.3 s) and 32 (= all
rows, 48.9 s): on a CPU a decode step costs about linearly in its slots, so idle and waiting slots are pure loss
and fewer slots win; 8 is near the best and still batches (4 was faster by ~15%, within this machine's noise).
`--segment_steps` 64 against 32 (18.4 s) and 128 (16.7 s); `--segment_release` 0.25 against 0.0 (one row: 17.0 s)
and 0.5 (19.5 s); `--page_size` 16 against 32 (at 16 slots: 24.3 vs 27.2 s).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import os
import platform
import statistics
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from deepeyes_jax.agent import prompts
from deepeyes_jax.agent.rollout import AgentConfig, RolloutStats, Task, run_rollouts
from deepeyes_jax.models import qwen2_5_vl as qvl
from deepeyes_jax.models.qwen2_5_vl import presets
from deepeyes_jax.models.qwen2_5_vl.tiny import build_tiny_checkpoint
from deepeyes_jax.perf import write_json
from deepeyes_jax.processing.tokenizer import load_tokenizer
from deepeyes_jax.sampling import rules
from deepeyes_jax.sampling.sampler import Sampler

ZOOM = (
  "<think>{think}</think>\n<tool_call>\n"
  '{{"name": "image_zoom_in_tool", "arguments": {{"bbox_2d": {box}}}}}\n</tool_call><|im_end|>'
)
ANSWER = "<think>{think}</think> <answer>{answer}</answer><|im_end|>"
FILLER_WORDS = (
  "the object near left edge looks small so I should zoom in to check colour and letter of sign maybe it is red "
  "blue or green"
).split()
TOKENS_PER_WORD = 2.0  # of the filler words under the tiny tokenizer (measured: 1.99)

# The workload of a full and a --quick run: tasks x group rows, timed rounds, per-row token budget and image size,
# and the log-normal length of a "think" turn (median, sigma, cap in tokens).
_DEFAULT_FIELDS = ("tasks", "group", "rounds", "max_total_tokens", "max_pixels")
_DEFAULT_FIELDS += ("think_median", "think_sigma", "think_cap")
FULL_DEFAULTS = dict(zip(_DEFAULT_FIELDS, (4, 8, 3, 4096, 64 * 28 * 28, 32, 1.2, 640)))
QUICK_DEFAULTS = dict(zip(_DEFAULT_FIELDS, (4, 4, 2, 2048, 48 * 28 * 28, 16, 1.0, 192)))
MIN_PIXELS = 4 * 28 * 28


def num_cores() -> int:
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:  # not on Linux
    return os.cpu_count() or 1


# --------------------------------------------------------------------------------------------------------------
# Model and tokenizer
# --------------------------------------------------------------------------------------------------------------
def build_agent(quick: bool, seed: int, layers: int = 2):
  """(sampler, tokenizer, config, param count): a random model of the preset "rollout_bench" (text `layers` x 256
  wide, 4 heads / 2 KV heads, head_dim 64, a 2-block vision tower 64 wide) or "rollout_bench_quick" (2 x 64), with
  the tiny tokenizer (`tiny.build_tiny_checkpoint`), saved and loaded through a temporary directory."""
  config = presets.preset("rollout_bench_quick" if quick else "rollout_bench")
  if not quick:
    config = config.replace(text=dataclasses.replace(config.text, num_hidden_layers=layers))
  with tempfile.TemporaryDirectory(prefix="bench_rollout_") as d:
    cfg = build_tiny_checkpoint(d, config=config, seed=seed)
    model = qvl.from_pretrained(d, dtype=jnp.float32)
    tok = load_tokenizer(d)
  return Sampler(model), tok, cfg, qvl.param_count(model)


# --------------------------------------------------------------------------------------------------------------
# Workload
# --------------------------------------------------------------------------------------------------------------
def _filler(rng: np.random.Generator, tokens: int) -> str:
  return " ".join(rng.choice(FILLER_WORDS, size=max(1, round(tokens / TOKENS_PER_WORD))))


def _box(rng: np.random.Generator, w: int, h: int) -> list[int]:
  """A valid zoom box (sides >= 40 px) of random size and place."""
  bw, bh = int(rng.integers(40, w + 1)), int(rng.integers(40, h + 1))
  x, y = int(rng.integers(0, w - bw + 1)), int(rng.integers(0, h - bh + 1))
  return [x, y, x + bw, y + bh]


def workload(args, seed: int) -> tuple[list[Task], list[list[str]], list[int]]:
  """Tasks, one script per row (task-major, G rows a task), and every turn's drawn filler length (tokens)."""
  rng = np.random.default_rng(seed)
  tasks, scripts, lengths = [], [], []
  for t in range(args.tasks):
    w, h = (int(x) for x in rng.integers(160, 641, size=2))
    image = Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))
    tasks.append(Task(task_id=f"t{t}", image=image, user_text="What letter is on the sign?" + prompts.USER_SUFFIX))
    for _ in range(args.group):
      n_zoom = int(rng.integers(0, 4))
      think = np.minimum(rng.lognormal(np.log(args.think_median), args.think_sigma, n_zoom + 1), args.think_cap)
      think = [max(1, int(x)) for x in think]
      lengths += think
      turns = [ZOOM.format(think=_filler(rng, n), box=_box(rng, w, h)) for n in think[:-1]]
      turns.append(ANSWER.format(think=_filler(rng, think[-1]), answer="ABCD"[int(rng.integers(4))]))
      scripts.append(turns)
  return tasks, scripts, lengths


# --------------------------------------------------------------------------------------------------------------
# Runs
# --------------------------------------------------------------------------------------------------------------
def engine_configs(args) -> dict[str, AgentConfig]:
  base = AgentConfig(
    sampling=rules.SamplingParams(temperature=1.0),
    max_turns=5,
    max_tokens_per_turn=1024,
    max_total_tokens=args.max_total_tokens,
    max_images=5,
    min_pixels=MIN_PIXELS,
    max_pixels=args.max_pixels,
  )
  return dict(
    old=dataclasses.replace(base, engine="lockstep", max_concurrent_rows=0),
    new=dataclasses.replace(
      base,
      engine="continuous",
      max_concurrent_rows=args.slots,
      page_size=args.page_size,
      segment_steps=args.segment_steps,
      segment_release=args.segment_release,
    ),
  )


def run_once(sampler, tok, tasks, scripts, group: int, config: AgentConfig, seed: int):
  """(wall s, trajectories, stats, compilations it added)."""
  stats = RolloutStats()
  compiles = sampler.num_compiles
  t0 = time.perf_counter()
  trajs = run_rollouts(
    sampler, tok, tasks, group_size=group, config=config, seed=seed, scripted_turns=scripts, stats=stats
  )
  wall = time.perf_counter() - t0
  return wall, trajs, stats, sampler.num_compiles - compiles


def check_same(old, new) -> dict:
  """Asserts the engines' trajectories are identical (token ids, action masks, stop reasons; log-probs to 1e-5)."""
  assert [t.uid for t in old] == [t.uid for t in new], "the engines returned different rows"
  worst = 0.0
  for a, b in zip(old, new):
    assert np.array_equal(a.token_ids, b.token_ids), f"{a.uid}: token ids differ between the engines"
    assert np.array_equal(a.action_mask, b.action_mask), f"{a.uid}: action masks differ between the engines"
    assert a.stop_reason == b.stop_reason, f"{a.uid}: stop reason {a.stop_reason!r} (old) vs {b.stop_reason!r} (new)"
    worst = max(worst, float(np.max(np.abs(a.logprobs - b.logprobs), initial=0.0)))
  assert worst <= 1e-5, f"log-probs differ between the engines by up to {worst:.2e}"
  return dict(identical=True, rows=len(old), max_logprob_diff=worst)


def _median(xs) -> float:
  return float(statistics.median(xs))


def summarize(runs: list[tuple], warmup: tuple, trajs) -> dict:
  """Medians over the timed runs of one engine; stats come from the last run (the same in every run)."""
  walls = [r[0] for r in runs]
  stats = runs[-1][2]
  wall = _median(walls)
  return dict(
    wall_s=wall,
    wall_runs_s=walls,
    trajectories=len(trajs),
    trajectories_per_s=len(trajs) / wall,
    generated_tokens_per_s=stats.token_steps / wall,
    slot_utilisation=stats.slot_utilisation,
    kv_bytes=stats.kv_bytes,
    kv_peak_used_bytes=stats.kv_peak_used_bytes,
    prefill_tokens=stats.prefill_tokens,
    extend_tokens=stats.extend_tokens,
    token_steps=stats.token_steps,
    slot_steps=stats.slot_steps,
    segments=stats.segments,
    restarts=stats.restarts,
    pool_grows=stats.pool_grows,
    warmup_s=warmup[0],
    compile_s=max(0.0, warmup[0] - wall),
    compilations_warmup=warmup[3],
    recompiled=sum(r[3] for r in runs),
    stop_reasons={s: sum(t.stop_reason == s for t in trajs) for s in sorted({t.stop_reason for t in trajs})},
  )


# --------------------------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------------------------
def _mib(x: int) -> str:
  return f"{x / 2**20:,.1f}"


def print_table(res: dict) -> None:
  old, new = res["old"], res["new"]
  # (label, format, key of the new / old column or None)
  rows = [
    ("wall s", lambda e: f"{e['wall_s']:.2f}", "wall_s"),
    ("trajectories/s", lambda e: f"{e['trajectories_per_s']:.3f}", "trajectories_per_s"),
    ("generated tok/s", lambda e: f"{e['generated_tokens_per_s']:,.0f}", "generated_tokens_per_s"),
    ("slot utilisation", lambda e: f"{e['slot_utilisation']:.1%}", None),
    ("KV allocated MiB", lambda e: _mib(e["kv_bytes"]), "kv_bytes"),
    ("KV peak used MiB", lambda e: _mib(e["kv_peak_used_bytes"]), "kv_peak_used_bytes"),
    ("prefill tokens", lambda e: f"{e['prefill_tokens']:,}", "prefill_tokens"),
    ("extend tokens", lambda e: f"{e['extend_tokens']:,}", None),
    ("generated tokens", lambda e: f"{e['token_steps']:,}", None),
    ("decode segments", lambda e: f"{e['segments']:,}", None),
    ("warm-up s", lambda e: f"{e['warmup_s']:.1f}", None),
    ("compile s (warm-up - median)", lambda e: f"{e['compile_s']:.1f}", None),
  ]
  print(f"| | old (lockstep, all rows) | new (continuous, {res['workload']['slots']} slots) | new / old (medians) |")
  print("|---|---|---|---|")
  for name, fmt, key in rows:
    ratio = "" if key is None else f"{new[key] / old[key]:.3g}"
    print(f"| {name} | {fmt(old)} | {fmt(new)} | {ratio} |")
  print()
  rounds = ", ".join(f"{x:.2f}" for x in res["trajectories_per_s_ratio_rounds"])
  print(
    f"trajectories/s new / old: {res['trajectories_per_s_ratio']:.2f} (rounds: {rounds}); peak KV bytes old / new "
    f"(allocated): {res['peak_kv_bytes_ratio']:.2f} (old / new peak used: {res['peak_kv_used_ratio']:.2f}); "
    f"prefill tokens old / new: {res['prefill_tokens_ratio']:.2f}"
  )


def parse_args(argv=None) -> argparse.Namespace:
  ap = argparse.ArgumentParser(prog="python -m deepeyes_jax.perf.rollout", description=__doc__.split("\n\n")[0].strip())
  ap.add_argument("--quick", action="store_true", help="tiny config, 4 tasks x G=4, short turns (a smoke run)")
  ap.add_argument("--out", help="write the results as JSON to this file")
  ap.add_argument("--rounds", type=int, help="timed rounds of both engines (default 3; quick 2)")
  ap.add_argument("--tasks", type=int, help="tasks (default 4; quick 4)")
  ap.add_argument("--group", type=int, help="samples per task, G (default 8; quick 4)")
  ap.add_argument("--slots", type=int, default=8, help="decode slots of the new engine (max_concurrent_rows)")
  ap.add_argument("--page_size", type=int, default=16, help="tokens per KV page of the new engine")
  ap.add_argument("--segment_steps", type=int, default=64, help="decode steps per segment at most (new engine)")
  ap.add_argument("--segment_release", type=float, default=0.25, help="fraction of rows that ends a segment")
  ap.add_argument("--max_total_tokens", type=int, help="cache capacity per row (default 4096; quick 2048)")
  ap.add_argument("--max_pixels", type=int, help="pixel budget of images and crops (default 64*28*28)")
  ap.add_argument("--think_median", type=float, help="median filler tokens per turn (default 32; quick 16)")
  ap.add_argument("--think_sigma", type=float, help="lognormal sigma of the filler length (default 1.2)")
  ap.add_argument("--think_cap", type=int, help="most filler tokens in a turn (default 640; quick 192)")
  ap.add_argument("--layers", type=int, default=2, help="text decoder layers of the full config")
  ap.add_argument("--seed", type=int, default=0, help="weights, workload and sampling seed")
  args = ap.parse_args(argv)
  defaults = QUICK_DEFAULTS if args.quick else FULL_DEFAULTS
  for k, v in defaults.items():
    if getattr(args, k) is None:
      setattr(args, k, v)
  if args.rounds < 1 or args.tasks < 1 or args.group < 1 or args.slots < 0:
    ap.error("--rounds, --tasks, --group must be >= 1 and --slots >= 0")
  return args


def main(argv=None) -> dict:
  args = parse_args(argv)
  t0 = time.perf_counter()
  sampler, tok, cfg, n_params = build_agent(args.quick, args.seed, args.layers)
  tasks, scripts, think = workload(args, args.seed)
  setup_s = time.perf_counter() - t0
  configs = engine_configs(args)
  b = args.tasks * args.group
  t = cfg.text
  print(
    f"config: {'quick' if args.quick else 'full'}, {n_params / 1e6:.2f}M params; text {t.num_hidden_layers} x "
    f"{t.hidden_size}, heads {t.num_attention_heads}/{t.num_key_value_heads} KV, head_dim {t.head_dim}, vocab "
    f"{t.vocab_size}; fp32; jax {jax.__version__} on {jax.default_backend()}, {num_cores()} cores; set-up "
    f"{setup_s:.1f} s"
  )
  print(
    f"workload: {args.tasks} tasks x G={args.group} = {b} rows, {sum(len(s) for s in scripts)} scripted turns "
    f"({sum(len(s) - 1 for s in scripts)} zooms); filler tokens per turn: median {np.median(think):.0f}, "
    f"p90 {np.percentile(think, 90):.0f}, max {max(think)}; max_total_tokens {args.max_total_tokens}"
  )
  print(
    f"new engine: {args.slots} slots, page {args.page_size}, segment_steps {args.segment_steps}, segment_release "
    f"{args.segment_release}; {args.rounds} interleaved round(s) after a warm-up of each"
  )

  def once(name):
    return run_once(sampler, tok, tasks, scripts, args.group, configs[name], args.seed)

  warm, trajs = {}, {}
  for name in ("old", "new"):
    wall, trajs[name], stats, compiles = once(name)
    warm[name] = (wall, trajs[name], stats, compiles)
    print(f"warm-up {name}: {wall:.1f} s ({compiles} compilations)", flush=True)
  check = check_same(trajs["old"], trajs["new"])
  print(
    f"check: the two engines' {check['rows']} trajectories are identical (token ids, action masks, stop reasons; "
    f"log-probs differ by at most {check['max_logprob_diff']:.1e})"
  )

  runs = {"old": [], "new": []}
  for k in range(args.rounds):
    order = ("old", "new") if k % 2 == 0 else ("new", "old")
    for name in order:
      wall, out, stats, compiles = once(name)
      runs[name].append((wall, None, stats, compiles))
      check_same(trajs["old"], out)
    print(
      f"round {k + 1}: old {runs['old'][-1][0]:.2f} s, new {runs['new'][-1][0]:.2f} s ({' then '.join(order)})",
      flush=True,
    )

  old = summarize(runs["old"], warm["old"], trajs["old"])
  new = summarize(runs["new"], warm["new"], trajs["new"])
  per_round = [o[0] / n[0] for o, n in zip(runs["old"], runs["new"])]  # (b / new wall) / (b / old wall)
  lengths = [len(x.token_ids) for x in trajs["old"]]
  result = dict(
    benchmark="rollout",
    quick=args.quick,
    date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    machine=dict(
      platform=platform.platform(),
      processor=platform.processor(),
      cpu_count=num_cores(),
      python=platform.python_version(),
      jax=jax.__version__,
      backend=jax.default_backend(),
      device_kind=jax.devices()[0].device_kind,
    ),
    model=dict(config=dataclasses.asdict(cfg), param_count=n_params, dtype="float32"),
    workload=dict(
      tasks=args.tasks,
      group=args.group,
      rows=b,
      rounds=args.rounds,
      seed=args.seed,
      max_total_tokens=args.max_total_tokens,
      min_pixels=MIN_PIXELS,
      max_pixels=args.max_pixels,
      think_median=args.think_median,
      think_sigma=args.think_sigma,
      think_cap=args.think_cap,
      think_tokens_drawn=think,
      scripted_turns=sum(len(s) for s in scripts),
      zooms=sum(len(s) - 1 for s in scripts),
      trajectory_tokens=dict(min=min(lengths), median=float(np.median(lengths)), max=max(lengths)),
      slots=args.slots,
      page_size=args.page_size,
      segment_steps=args.segment_steps,
      segment_release=args.segment_release,
    ),
    engines=dict(
      old={k: v for k, v in dataclasses.asdict(configs["old"]).items() if k != "sampling"},
      new={k: v for k, v in dataclasses.asdict(configs["new"]).items() if k != "sampling"},
    ),
    check=check,
    old=old,
    new=new,
    trajectories_per_s_ratio=_median(per_round),
    trajectories_per_s_ratio_rounds=per_round,
    peak_kv_bytes_ratio=old["kv_bytes"] / new["kv_bytes"],
    peak_kv_used_ratio=old["kv_peak_used_bytes"] / new["kv_peak_used_bytes"],
    prefill_tokens_ratio=old["prefill_tokens"] / new["prefill_tokens"],
    method=__doc__[__doc__.index("Method") :],
  )
  print()
  print_table(result)
  if old["recompiled"] or new["recompiled"]:
    print(f"warning: timed runs compiled again (old {old['recompiled']}, new {new['recompiled']})")
  if args.out:
    write_json(args.out, result)
  return result


if __name__ == "__main__":
  main(sys.argv[1:])
