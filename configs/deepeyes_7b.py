"""The published DeepEyes recipe (docs/reference.md, section "RL recipe"), with variants.

    python -m deepeyes_jax.train --config configs/deepeyes_7b.py --workdir DIR \
        --config.model.checkpoint=/ckpt/Qwen2.5-VL-7B-Instruct --config.data.train=/data/deepeyes/*.parquet
    python -m deepeyes_jax.train --config configs/deepeyes_7b.py:size=3b ...
    python -m deepeyes_jax.train --config configs/deepeyes_7b.py:size=tiny ...   # CPU smoke run (tests use it)
    python -m deepeyes_jax.train --config configs/deepeyes_7b.py:algo=dapo ...   # or gspo, grpo_tis (docs/training.md)

7B: GRPO (std-normalised group advantages, eps 1e-6), no KL, no entropy bonus, PPO clip 0.2/0.2, dual-clip 3,
token-mean loss; AdamW lr 1e-6 constant, weight decay 0.01, grad-norm clip 1.0; 256 prompts x 16 rollouts and ONE
optimizer step per rollout batch; temperature 1.0, top_p 1.0; at most 5 assistant turns, 10240 tokens per turn,
prompt <= 8192 and response <= 20480 tokens; ~80 steps. The judge is an OpenAI-compatible endpoint
(DEEPEYES_JUDGE_URL / DEEPEYES_JUDGE_MODEL / DEEPEYES_JUDGE_API_KEY).
"""

import ml_collections

from deepeyes_jax.config_args import parse_arg

# The `arg` values of get_config: documented in docs/config_reference.md (python -m deepeyes_jax.config_reference).
VARIANTS = ("size=3b", "size=32b", "size=tiny", "algo=gspo", "algo=dapo", "algo=grpo_tis")
ALGORITHMS = ("grpo", "gspo", "dapo", "grpo_tis")  # `algo=`: set_algorithm


def set_algorithm(c: ml_collections.ConfigDict, algo: str) -> None:
  """The `rl` fields of a named algorithm (docs/training.md, "RL algorithms"), over the recipe's GRPO:

  gspo: sequence-level ratio and clipping (clip 3e-4 / 4e-4 as in the paper, sequence-mean aggregation);
  dapo: clip-higher (0.2 / 0.28, no dual clip), dynamic sampling (3 rounds at most), token-mean loss, overlong
  shaping over the last fifth of the response budget; grpo_tis: GRPO + token-level truncated importance sampling
  against the sampler (C = 2). The last three recompute the old policy's log-probs (rl.old_logprobs="recompute"):
  their ratios need pi_old apart from the sampler's log-probs."""
  if algo not in ALGORITHMS:
    raise ValueError(f"algo must be one of {', '.join(ALGORITHMS)}; got {algo!r}")
  rl = c.rl
  if algo != "grpo":
    rl.old_logprobs = "recompute"
  if algo == "gspo":
    rl.policy_loss, rl.aggregation = "gspo", "seq_mean"
    rl.clip_low, rl.clip_high, rl.dual_clip = 3e-4, 4e-4, 0.0
  elif algo == "dapo":
    rl.clip_low, rl.clip_high, rl.dual_clip = 0.2, 0.28, 0.0
    rl.aggregation = "token_mean"
    rl.dynamic_sampling, rl.dynamic_sampling_max_rounds = True, 3
    rl.overlong_buffer = (c.rollout.max_total_tokens - c.rollout.max_prompt_tokens) // 5
  elif algo == "grpo_tis":
    rl.rollout_correction, rl.rollout_correction_threshold = "token_tis", 2.0


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  args = parse_arg(arg, size="7b", algo="grpo")
  size = args.size
  if size not in ("tiny", "3b", "7b", "32b"):
    raise ValueError(f"size must be one of tiny, 3b, 7b, 32b; got {size!r}")
  c = ml_collections.ConfigDict()
  c.seed = 0  # every random choice derives from (seed, step, row)
  c.total_steps = 80  # optimizer steps (= rollout batches with the defaults)
  c.train_vision = True  # False: the vision tower gets no gradient and no update

  c.model = ml_collections.ConfigDict()
  c.model.checkpoint = ml_collections.config_dict.placeholder(str)  # HF directory: config.json + safetensors
  c.model.tokenizer = ml_collections.config_dict.placeholder(str)  # default: model.checkpoint
  c.model.dtype = "bfloat16"  # compute dtype (activations, KV cache, the sampler's weights)
  c.model.param_dtype = "float32"  # stored parameters, gradients and AdamW moments: lr 1e-6 steps survive rounding
  c.model.remat = "full"  # per-layer rematerialisation in the learner: "none" | "full" | "dots" (docs/tpu_7b.md)
  c.model.scan_layers = True  # one lax.scan per stack of layers: compile time independent of depth
  c.model.attention_impl = "auto"  # "auto" (Pallas on GPU and TPU, XLA on CPU) | "xla" | "pallas" | "cudnn"
  c.model.size = size  # Qwen2.5-VL shape `python -m deepeyes_jax.aot` compiles when model.checkpoint is unset

  c.data = ml_collections.ConfigDict()
  c.data.train = ""  # comma-separated parquet / JSONL paths or globs (DeepEyes-Datasets-47k format)
  c.data.batch_size = 256  # prompts per step (per process: divided by the process count)
  c.data.shuffle = True  # seeded shuffle; the iterator state is checkpointed
  c.data.num_epochs = ml_collections.config_dict.placeholder(int)  # None = repeat forever

  c.rollout = ml_collections.ConfigDict()
  c.rollout.group_size = 16  # rollouts per prompt (the GRPO group)
  c.rollout.max_turns = 5  # assistant turns per trajectory (5 = at most 4 zooms)
  c.rollout.max_tokens_per_turn = 10240  # a turn cut by this limit ends the trajectory
  c.rollout.max_total_tokens = 8192 + 20480  # prompt + response
  c.rollout.max_prompt_tokens = 8192  # prompt budget, image included: sizes the AOT prefill (rollouts do not cut)
  c.rollout.max_images = 5  # original + crops
  c.rollout.engine = "continuous"  # paged KV pool + continuous batching | "lockstep" (the reference engine)
  c.rollout.max_concurrent_rows = 512  # decode slots (rows in flight at once); 0 = all rows
  c.rollout.page_size = 128  # tokens per KV page
  # 512 slots x 96 pages of 128 tokens: 12,288 tokens a row on average, twice a typical DeepEyes trajectory (a row
  # may still grow to max_total_tokens while others are shorter). Fixed: one pool shape, a known HBM footprint.
  c.rollout.kv_pages = 49152  # KV pool pages (docs/tpu_7b.md); 0 = grow on demand (doubling)
  c.rollout.segment_steps = 256  # decode steps per segment at most (then finished turns are served)
  c.rollout.segment_release = 0.25  # a segment also ends once this fraction of the rows in flight ended a turn
  c.rollout.weight_layout = "tensor_parallel"  # sampler's weights: compute dtype, tensor-sharded only | "learner"
  c.rollout.temperature = 1.0  # sampling temperature of the rollouts
  c.rollout.top_p = 1.0  # nucleus mass (1.0 = off)
  c.rollout.top_k = 0  # 0 = off
  c.rollout.coordinate_frame = "original"  # "original" (DeepEyes: boxes in original-image pixels) | "resized"
  c.rollout.min_pixels = 4 * 28 * 28  # smart_resize bounds of the image and the crops (qwen_vl_utils defaults)
  c.rollout.max_pixels = 16384 * 28 * 28

  c.rl = ml_collections.ConfigDict()
  c.rl.advantage = "grpo"  # "grpo" | "dr_grpo" | "rloo" (registry in deepeyes_jax/rl/grpo.py)
  c.rl.adv_eps = 1e-6  # GRPO: (R - mean) / (std + adv_eps)
  c.rl.drop_zero_variance = False  # drop groups whose rewards are all equal (zero advantage)
  c.rl.policy_loss = "ppo_clip"  # policy-loss registry name (deepeyes_jax/rl/grpo.py)
  c.rl.clip_low = 0.2  # PPO ratio clip below 1
  c.rl.clip_high = 0.2  # PPO ratio clip above 1
  c.rl.dual_clip = 3.0  # 0 = off
  c.rl.aggregation = "token_mean"  # "token_mean" | "seq_mean" over the action tokens
  c.rl.kl_coef = 0.0  # k3 KL to a frozen reference (0 = off, as DeepEyes)
  c.rl.entropy_coef = 0.0  # entropy bonus (0 = off, as DeepEyes)
  c.rl.ppo_epochs = 1  # passes over each rollout batch
  c.rl.num_minibatches = 1  # optimizer steps per epoch
  c.rl.old_logprobs = "sampler"  # "sampler" | "recompute"
  c.rl.min_row_len = 1024  # packing rows are a power of two >= the longest trajectory
  c.rl.micro_batch_rows = 8  # packed rows per micro-batch (gradients accumulate over micro-batches)
  c.rl.logits_chunk = 512  # tokens per chunk of the vocabulary projection (bounds logits memory)
  # RL algorithms of 2025-26 (docs/training.md, "RL algorithms"; `algo=` variants set them together).
  c.rl.rollout_correction = "none"  # "none" | "token_tis" | "seq_tis" | "token_mis" | "seq_mis" (sampler vs learner)
  c.rl.rollout_correction_threshold = 2.0  # C: TIS truncates rho = pi_old / mu at C; MIS keeps [1/C, C]
  c.rl.dynamic_sampling = False  # DAPO: drop groups without reward variance, sample more prompts to refill
  c.rl.dynamic_sampling_max_rounds = 3  # rollout rounds per step at most (the first included)
  c.rl.overlong_buffer = 0  # DAPO: tokens before the response budget where a soft length penalty ramps in; 0 = off
  c.rl.overlong_penalty = 1.0  # the penalty at the budget
  c.rl.over_turn_masking = False  # Mini-o3: rows the turn / image / length limits cut are left out of the loss
  c.rl.off_policy_steps = 0  # 1: step n+1's rollouts run (stale weights) while step n's update runs; 0 = on-policy
  c.rl.sampler_devices = 0  # k>0: the sampler's own devices (last k/P of each process); off-policy on pods needs it

  c.optim = ml_collections.ConfigDict()
  c.optim.learning_rate = 1e-6  # AdamW, constant after the warm-up
  c.optim.warmup_steps = 0  # linear warm-up from 0
  c.optim.weight_decay = 0.01
  c.optim.b1 = 0.9
  c.optim.b2 = 0.999
  c.optim.grad_clip = 1.0  # global gradient-norm clip

  c.reward = ml_collections.ConfigDict()
  c.reward.judge_url = ml_collections.config_dict.placeholder(str)  # default: $DEEPEYES_JUDGE_URL; None = rules only
  c.reward.judge_model = ""  # "" = $DEEPEYES_JUDGE_MODEL, else the first model the endpoint lists
  c.reward.judge_workers = 32  # concurrent judge requests
  c.reward.plugins = ""  # comma-separated modules to import: they register reward functions by data_source name

  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = 1  # mesh (data, fsdp, tensor); -1 = the remaining devices
  c.mesh.fsdp = -1  # all devices: FSDP over parameters, optimizer state and rows
  c.mesh.tensor = 1  # tensor parallelism over heads / MLP

  c.checkpoint = ml_collections.ConfigDict()
  c.checkpoint.every_steps = 5  # steps between checkpoints
  c.checkpoint.max_to_keep = 3  # keep the last N checkpoints
  c.checkpoint.keep_period = ml_collections.config_dict.placeholder(int)  # also keep every K-th step
  c.checkpoint.async_save = True  # write checkpoints in the background

  c.log = ml_collections.ConfigDict()
  c.log.save_trajectories_every = 5  # steps between trajectory dumps to workdir/rollouts (0 = never)
  c.log.num_saved_trajectories = 16  # trajectories per dump
  c.log.tool_collapse_fraction = 0.25  # warn when tool calls / trajectory fall below this share of their peak; 0 = off

  if size == "3b":
    c.mesh.fsdp, c.mesh.tensor = -1, 1
  elif size == "32b":
    c.mesh.fsdp, c.mesh.tensor = -1, 4
    c.rl.micro_batch_rows = 2
  elif size == "tiny":
    # A CPU smoke run: a tiny checkpoint and a few prompts (set model.checkpoint and data.train).
    c.total_steps = 2
    c.model.dtype = "float32"
    c.data.batch_size = 2
    c.rollout.group_size = 2
    c.rollout.max_tokens_per_turn = 24
    c.rollout.max_total_tokens = 1536
    c.rollout.max_prompt_tokens = 512
    c.rollout.max_turns = 3
    c.rollout.max_pixels = 48 * 28 * 28
    c.rollout.max_concurrent_rows = 0
    c.rollout.page_size = 16
    c.rollout.kv_pages = 0
    c.rollout.segment_steps = 16
    c.rl.min_row_len = 256
    c.rl.micro_batch_rows = 2
    c.rl.logits_chunk = 128
    c.optim.learning_rate = 1e-4
    c.checkpoint.every_steps = 1
    c.checkpoint.async_save = True
    c.log.save_trajectories_every = 1
    c.log.num_saved_trajectories = 2
  set_algorithm(c, args.algo)
  return c
