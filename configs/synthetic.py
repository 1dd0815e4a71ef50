"""The embedded default: learn to zoom on a synthetic fine-grained task, end to end on a laptop CPU.

    python -m deepeyes_jax.train --config configs/synthetic.py --workdir /tmp/deepeyes_synthetic
    python -m deepeyes_jax.train --config configs/synthetic.py:variant=ci --workdir DIR     # ~2 min smoke run
    python -m deepeyes_jax.train --config configs/synthetic.py:algo=dapo --workdir DIR      # or gspo, grpo_tis

Nothing is downloaded: a tiny Qwen2.5-VL (~1.25M parameters) and its byte-level BPE tokenizer are made by code in
WORKDIR/base_model and loaded through the real HF loader; scenes are drawn on the fly (`data/synthetic.py`: "What
colour are the checks in the top left cell?" -- a checkerboard of a colour and its complement that is a flat gray in
the 168 px global view and plain in a zoomed crop).

Phases (one step counter, one checkpoint directory):
1. warm start, steps [0, warmstart.steps): behaviour cloning of a scripted demonstrator that zooms on the target
   cell and reads the crop in `zoom_fraction` of the questions and otherwise answers at once from the global view
   (plus no-tool questions and two exercises: write the box of a named cell, read a crop). It teaches the format,
   where to look and how to read a crop (`skills/*` probes), but, like a base model that rarely chooses its tool,
   the imitation policy prefers answering directly, so greedy decoding does not zoom.
2. GRPO, the DeepEyes recipe at toy scale: the same rollout engine, the DeepEyes reward (0.8 acc + 0.2 fmt +
   1.2 tool, the conditional tool bonus), std-normalised group advantages, PPO clip with dual clip, no KL.
   Outcome reward alone teaches the model that looking closer pays.
Then a held-out evaluation (greedy, with and without the tool) of the warm-start and final checkpoints ->
WORKDIR/final_eval.json, and WORKDIR/report.html + report.png. Measured (seed 0, 2-core CPU, 13-17 min): 22% -> 100%
with the tool, 14.5% without (chance 16.7%); docs/synthetic.md.
"""

import importlib.util
import os

import ml_collections

from deepeyes_jax.config_args import parse_arg

# The recipe's config, loaded by path (config files are not a package).
_spec = importlib.util.spec_from_file_location("deepeyes_7b", os.path.join(os.path.dirname(__file__), "deepeyes_7b.py"))
deepeyes_7b = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(deepeyes_7b)

VARIANTS = ("variant=ci", "algo=gspo", "algo=dapo", "algo=grpo_tis")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  args = parse_arg(arg, variant="default", algo="grpo")
  variant = args.variant
  if variant not in ("default", "ci"):
    raise ValueError(f"variant must be 'default' or 'ci', got {variant!r}")
  c = deepeyes_7b.get_config("size=7b")  # the recipe's structure; every knob that differs is set below
  c.seed = 0
  c.total_steps = 120 + 40  # warm start + GRPO

  c.model.checkpoint = ""  # empty: make the tiny model below in WORKDIR/base_model
  c.model.dtype = "float32"
  c.model.param_dtype = ""  # "" = dtype (configs/deepeyes_7b.py keeps float32 masters for bfloat16 compute)
  c.model.remat = "none"  # per-layer rematerialisation: "none" | "full" | "dots"; the tiny model needs none
  c.model.scan_layers = False  # True: one lax.scan per stack of layers (compile time independent of depth)
  c.model.size = "tiny"  # the shape class; the AOT tool, like the trainer, builds model.tiny below
  c.model.tiny = ml_collections.ConfigDict()
  c.model.tiny.vocab_size = 768  # regular BPE tokens (+22 Qwen added tokens)
  c.model.tiny.corpus = "synthetic"  # train the BPE merges on the task's texts too
  c.model.tiny.hidden_size = 128
  c.model.tiny.num_layers = 4
  c.model.tiny.num_heads = 4
  c.model.tiny.num_kv_heads = 2
  c.model.tiny.vision_hidden_size = 64
  c.model.tiny.vision_depth = 2
  c.model.tiny.vision_heads = 2
  c.model.tiny.init = "fan_in"  # kernels normal(1/sqrt(fan_in)): attention starts sharp enough to learn in minutes

  c.synthetic = ml_collections.ConfigDict()
  c.synthetic.num_records = 1_000_000  # scenes per split (drawn on demand; effectively never repeated)
  c.synthetic.scene = ml_collections.ConfigDict()  # data.synthetic.SceneConfig fields
  c.synthetic.scene.min_size = 1344  # the global view (168 px) is an 8-9x downscale
  c.synthetic.scene.max_size = 1536
  c.synthetic.scene.grid = 3  # 3 x 3 cells, each 2 x 2 vision tokens of the 168 px global view
  c.synthetic.scene.min_objects = 3
  c.synthetic.scene.max_objects = 5
  c.synthetic.scene.detail = "checks"  # the answer: the colour of a checkerboard (6 colours, each with its complement)
  c.synthetic.scene.texture_unit = 0.35  # tile side: 3 original px, 0.35 px of the global view, ~3 px of a crop
  c.synthetic.scene.plate_scale = 0.5  # plate side / cell
  c.synthetic.scene.target_by = "cell"  # "What colour are the checks in the top left cell?"
  c.synthetic.scene.zoom_inset = 1 / 3  # the demonstrator zooms on the central third of the cell
  c.synthetic.scene.background = "cells"  # position code: one muted R level per column, B level per row
  c.synthetic.scene.system_prompt = "short"  # "deepeyes": the byte-exact DeepEyes system prompt (~375 more tokens)

  c.data.train = "synthetic:train"
  c.data.batch_size = 4  # prompts per GRPO step (x group_size rollouts)

  c.warmstart = ml_collections.ConfigDict()
  c.warmstart.steps = 120
  c.warmstart.batch_size = 32
  c.warmstart.demonstrator = "synthetic"
  c.warmstart.zoom_fraction = 0.42  # of the tool questions: < 0.5, so the imitation policy's mode is "answer now"
  c.warmstart.no_tool_fraction = 0.1  # questions asked without the tool (the prompt of the no-tool evaluation)
  c.warmstart.ground_fraction = 0.15  # exercise: "Where is the top left cell?" -> the demonstrator's bbox_2d
  c.warmstart.read_fraction = 0.2  # perception exercise: the demonstrator's crop -> its answer (the checks' colour)
  c.warmstart.probe_every = 20  # skills/{ground,read,zoom}: teacher-forced content accuracy on held-out scenes
  c.warmstart.probe_questions = 32
  c.warmstart.learning_rate = 2e-3
  c.warmstart.warmup_steps = 10
  c.warmstart.weight_decay = 0.0

  c.rollout.group_size = 8
  c.rollout.max_turns = 3
  c.rollout.max_tokens_per_turn = 64
  c.rollout.max_total_tokens = 512
  c.rollout.max_prompt_tokens = 256  # short system prompt + question + the 36 tokens of the global view
  c.rollout.max_images = 3
  c.rollout.engine = "continuous"  # paged KV pool + continuous batching | "lockstep" (the reference engine)
  c.rollout.max_concurrent_rows = 0  # decode slots (rows in flight at once); 0 = all rows
  c.rollout.page_size = 16  # tokens per KV page
  c.rollout.kv_pages = 0  # KV pool pages; 0 = grow on demand (doubling), > 0 = fixed (rows wait or restart)
  c.rollout.segment_steps = 32  # decode steps per segment at most (then finished turns are served)
  c.rollout.segment_release = 0.25  # a segment also ends once this fraction of the rows in flight ended a turn
  c.rollout.weight_layout = "tensor_parallel"  # sampler's weights: compute dtype, tensor-sharded only | "learner"
  c.rollout.coordinate_frame = "resized"  # boxes in the 168 x 168 frame the model sees (data/synthetic.py)
  c.rollout.min_pixels = 4 * 28 * 28
  c.rollout.max_pixels = 170 * 170  # = data.synthetic.GLOBAL_MAX_PIXELS: 6 x 6 vision tokens

  c.rl.min_row_len = 512  # packing rows (trajectories are <= rollout.max_total_tokens = 512)
  c.rl.micro_batch_rows = 16
  c.rl.logits_chunk = 512
  c.optim.learning_rate = 2e-4  # tiny model from scratch: far above the 7B's 1e-6
  c.optim.weight_decay = 0.0

  c.eval = ml_collections.ConfigDict()
  c.eval.data = "synthetic:test"
  c.eval.num_questions = 200
  c.eval.batch_size = 100

  c.mesh.fsdp = 1  # one CPU device
  c.checkpoint.every_steps = 50
  c.checkpoint.max_to_keep = 2
  c.log.save_trajectories_every = 10
  c.log.num_saved_trajectories = 8
  c.log.report = True
  c.log.report_trajectories = 6

  if variant == "ci":  # every stage, a few steps each (the CI test; it does not assert learning)
    c.total_steps = 4 + 2
    c.warmstart.steps = 4
    c.warmstart.batch_size = 4
    c.warmstart.warmup_steps = 1
    c.warmstart.probe_every = 2
    c.warmstart.probe_questions = 2
    c.data.batch_size = 2
    c.rollout.group_size = 2
    c.rollout.max_tokens_per_turn = 48
    c.eval.num_questions = 4
    c.eval.batch_size = 4
    c.log.save_trajectories_every = 1
    c.log.report_trajectories = 2
  deepeyes_7b.set_algorithm(c, args.algo)  # over this config's rollout limits (DAPO's overlong buffer)
  return c
