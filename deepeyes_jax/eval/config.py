"""The shared evaluation config; ``configs/eval_*.py`` set the benchmark and its defaults on top of it.

``validate(config)`` checks an evaluation config before anything loads (``evaluate.run`` calls it first); the checks
of the blocks a training config shares (``rollout``, ``mesh``, the judge, the model's dtype and attention) are here
too, the lowest layer both reach (``rl/train_config.validate`` uses them).
"""

from __future__ import annotations

import jax.numpy as jnp
import ml_collections

from deepeyes_jax.agent.protocol import FRAMES
from deepeyes_jax.agent.rollout import ENGINES
from deepeyes_jax.config_args import parse_arg
from deepeyes_jax.config_check import Problems
from deepeyes_jax.data.benchmarks import BENCHMARKS
from deepeyes_jax.kernels.attention import resolve_impl
from deepeyes_jax.processing import image as improc

# The variants every eval config accepts (`configs/eval_*.py:size=tiny,no_tool=1`), with their defaults.
VARIANT_SPEC = dict(size="full", no_tool=False)


# The inference-time rollout budget: the evaluation configs and the flags of `infer` / `select`
# (`run_setup.RolloutFlags`) start from it. Training configs set their own (configs/deepeyes_7b.py).
ROLLOUT_DEFAULTS = {"max_turns": 5, "max_tokens_per_turn": 2048, "max_total_tokens": 16384}


def base_config(benchmark: str) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.benchmark = benchmark  # vstar | hrbench_4k | hrbench_8k | pope | deepeyes
  c.data_path = ml_collections.config_dict.placeholder(str)  # release dir / TSV / question file(s) / parquet
  c.image_dir = ""  # POPE only: the COCO val2014 images
  c.out_dir = ""  # default: eval_runs/<benchmark>[_notool][_unshuffled]
  c.limit = 0  # evaluate only the first N items (0 = all)

  c.checkpoint = ml_collections.config_dict.placeholder(str)  # HF directory: config.json + safetensors + tokenizer
  c.tokenizer = ml_collections.config_dict.placeholder(str)  # default: checkpoint
  c.dtype = "bfloat16"
  # "auto": Pallas flash kernels on GPU/TPU. The XLA reference materialises (T x S) fp32 scores: a 4.6k-token V*
  # prompt x 16 rows x 28 heads is ~38 GB per layer, and the vision tower's full-attention layers are N^2 in patches.
  c.attention_impl = "auto"

  c.seed = 0
  c.shuffle_options = True  # False reproduces the original evaluation (V*: the correct option is always A)
  c.num_samples = 1  # k > 1: avg@k and pass@k (needs rollout.temperature > 0)
  c.no_tool = False  # baseline: plain Qwen prompt, one turn, no zoom tool
  c.batch_size = 16  # items per rollout batch; rows in the KV cache = batch_size * num_samples
  c.save_trajectories = True

  c.rollout = ml_collections.ConfigDict()  # field names as in configs/deepeyes_7b.py (run_setup.agent_config)
  c.rollout.max_turns = ROLLOUT_DEFAULTS["max_turns"]
  c.rollout.max_tokens_per_turn = ROLLOUT_DEFAULTS["max_tokens_per_turn"]
  c.rollout.max_total_tokens = ROLLOUT_DEFAULTS["max_total_tokens"]
  c.rollout.max_images = 5
  c.rollout.temperature = 0.0  # greedy
  c.rollout.top_p = 1.0
  c.rollout.top_k = 0
  c.rollout.coordinate_frame = "original"
  c.rollout.min_pixels = improc.MIN_PIXELS
  c.rollout.max_pixels = improc.MAX_PIXELS
  c.rollout.engine = "continuous"  # paged KV pool + continuous batching | "lockstep" (the reference engine)
  c.rollout.max_concurrent_rows = 0  # decode slots (rows in flight at once); 0 = the whole batch
  c.rollout.page_size = 64  # tokens per KV page
  c.rollout.kv_pages = 0  # KV pool pages; 0 = grow on demand (doubling), > 0 = fixed (rows wait or restart)
  c.rollout.segment_steps = 128  # decode steps per segment at most
  c.rollout.segment_release = 0.25  # a segment also ends once this fraction of the rows in flight ended a turn

  c.reward = ml_collections.ConfigDict()  # the judge, as in training (run_setup.make_judge)
  c.reward.use_judge = True  # asked only when the rule cannot decide; needs judge_url or $DEEPEYES_JUDGE_URL
  c.reward.judge_url = ml_collections.config_dict.placeholder(str)
  c.reward.judge_model = ""
  c.reward.judge_workers = 16

  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = 1
  c.mesh.fsdp = -1
  c.mesh.tensor = 1
  return c


def apply_variant(
  c: ml_collections.ConfigDict, arg: str | ml_collections.ConfigDict | None
) -> ml_collections.ConfigDict:
  """``:size=tiny`` (CPU tests: small images, short turns, float32; ``size=full``, the default, changes nothing) and
  ``:no_tool=1``. ``arg``: the config's argument, or what `parse_arg` made of it with `VARIANT_SPEC`'s keys (a config
  with keys of its own parses them all at once)."""
  args = arg if isinstance(arg, ml_collections.ConfigDict) else parse_arg(arg, **VARIANT_SPEC)
  if args.size not in ("full", "tiny"):
    raise ValueError(f"config argument size must be 'full' or 'tiny', got {args.size!r}")
  if args.no_tool:
    c.no_tool = True
  if args.size == "tiny":
    c.dtype = "float32"
    c.batch_size = 2
    c.rollout.max_turns = 3
    c.rollout.max_tokens_per_turn = 16
    c.rollout.max_total_tokens = 1024
    c.rollout.min_pixels = 4 * 28 * 28
    c.rollout.max_pixels = 48 * 28 * 28
    c.rollout.page_size = 16
    c.rollout.segment_steps = 16
    c.reward.use_judge = False
  return c


# ----------------------------------------------------------------------------------------------------------------
# Validation


def check_rollout(p: Problems, rollout: ml_collections.ConfigDict) -> None:
  """The ``rollout`` block (``run_setup.agent_config`` reads it): budgets, sampling, pixels, the engine's sizes;
  ``group_size`` and ``max_prompt_tokens`` when present (training configs)."""
  r = rollout
  ok = {}
  for name in ("max_turns", "max_tokens_per_turn", "max_total_tokens", "max_images", "page_size", "segment_steps"):
    ok[name] = p.number(f"rollout.{name}", r.get(name, 1), ge=1, integer=True)
  for name in ("max_concurrent_rows", "kv_pages", "top_k"):
    p.number(f"rollout.{name}", r.get(name, 0), ge=0, integer=True)
  prompt, budget = r.get("max_prompt_tokens"), r.max_total_tokens  # max_prompt_tokens: training configs (AOT)
  if prompt is not None and p.number("rollout.max_prompt_tokens", prompt, ge=1, integer=True):
    fits = not ok["max_total_tokens"] or prompt <= budget
    p.check("rollout.max_prompt_tokens", prompt, fits, f"<= rollout.max_total_tokens ({budget})")
  if "group_size" in r and p.number("rollout.group_size", r.group_size, ge=1, integer=True) and r.group_size < 2:
    p.warn("rollout.group_size", r.group_size, "a group of one has advantage 0 (GRPO needs >= 2 to learn anything)")
  p.number("rollout.temperature", r.temperature, ge=0)
  p.number("rollout.top_p", r.top_p, gt=0, le=1)
  p.number("rollout.segment_release", r.get("segment_release", 0.25), ge=0, le=1)
  p.choice("rollout.coordinate_frame", r.coordinate_frame, FRAMES)
  p.choice("rollout.engine", r.get("engine", ENGINES[0]), ENGINES)
  low_ok = p.number("rollout.min_pixels", r.min_pixels, ge=1, integer=True)
  if p.number("rollout.max_pixels", r.max_pixels, ge=1, integer=True) and low_ok:
    p.check("rollout.min_pixels", r.min_pixels, r.min_pixels <= r.max_pixels, f"<= rollout.max_pixels ({r.max_pixels})")


def check_mesh(p: Problems, mesh: ml_collections.ConfigDict) -> None:
  """``mesh.data / fsdp / tensor``: each >= 1 or -1 (the remaining devices), at most one -1. Whether the product
  matches the devices is checked when the mesh is made (``run_setup.make_mesh``), before anything loads."""
  sizes = {name: mesh.get(name, 1) for name in ("data", "fsdp", "tensor")}
  for name, v in sizes.items():
    p.number(f"mesh.{name}", v, ge=1, integer=True, also=(-1,), note="the remaining devices")
  if list(sizes.values()).count(-1) > 1:
    p.add("mesh", sizes, "at most one axis of -1")


def check_model_numerics(p: Problems, field: str, dtype, attention_impl, *, param_dtype=None) -> None:
  """A compute dtype (and parameter dtype) that is a floating type, and a known attention implementation."""
  for name, value in ((f"{field}dtype", dtype), (f"{field}param_dtype", param_dtype)):
    if value is None or (value == "" and name.endswith("param_dtype")):  # "" = the compute dtype
      continue
    try:
      ok = jnp.issubdtype(jnp.dtype(value), jnp.floating)
    except TypeError:
      ok = False
    p.check(name, value, ok, "a floating dtype name (bfloat16, float16, float32)")
  p.run(f"{field}attention_impl", attention_impl, lambda: attention_impl == "auto" or resolve_impl(attention_impl))


def check_judge(p: Problems, reward: ml_collections.ConfigDict) -> None:
  p.number("reward.judge_workers", reward.judge_workers, ge=1, integer=True)


def validate(config: ml_collections.ConfigDict) -> list[str]:
  """Checks an evaluation config (``configs/eval_*.py``) before anything loads: every field with a domain, the
  paths the run needs. Raises ``config_check.ConfigError`` (a ValueError) listing every problem, each naming the
  field, its value and what is allowed; returns the warnings (also logged)."""
  p = Problems()
  p.choice("benchmark", config.benchmark, BENCHMARKS)
  p.check("checkpoint", config.checkpoint, bool(config.checkpoint), "set: an HF checkpoint directory")
  p.check("data_path", config.data_path, bool(config.data_path), "set: the benchmark's files")
  if config.benchmark == "pope":
    p.check("image_dir", config.image_dir, bool(config.image_dir), "set for POPE: the COCO val2014 images")
  p.number("limit", config.limit, ge=0, integer=True)
  p.number("seed", config.seed, ge=0, lt=2**32, integer=True)
  p.number("batch_size", config.batch_size, ge=1, integer=True)
  if p.number("num_samples", config.num_samples, ge=1, integer=True) and config.num_samples > 1:
    p.check("num_samples", config.num_samples, config.rollout.temperature > 0, "1 with rollout.temperature=0 (greedy)")
  check_model_numerics(p, "", config.dtype, config.attention_impl)
  check_rollout(p, config.rollout)
  check_judge(p, config.reward)
  check_mesh(p, config.mesh)
  return p.raise_if_any(f"evaluation config ({config.benchmark})")
