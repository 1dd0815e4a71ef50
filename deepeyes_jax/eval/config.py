"""The shared evaluation config; ``configs/eval_*.py`` set the benchmark and its defaults on top of it."""

from __future__ import annotations

import ml_collections

from deepeyes_jax.config_args import parse_arg
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
