"""Ahead-of-time compilation of one training step for a TPU slice, on any host (no TPU, no weights).

    python -m deepeyes_jax.aot --config configs/deepeyes_7b.py --topology v5p-64 [--json FILE] [--config.a.b=v ...]
    python -m deepeyes_jax.aot --config configs/deepeyes_7b.py:size=3b --topology v5e-256 --functions grad,decode
    python -m deepeyes_jax.aot --config configs/deepeyes_7b.py --topology v5p-64 --layers 2      # quick iteration

libtpu (`pip install -e '.[tpu]'`) describes the slice's chips (`jax.experimental.topologies`); the run's mesh
(config.mesh) is laid over them and every jitted function of one training step is lowered from abstract shapes
(`nnx.eval_shape`: parameters are never materialised, so a 7B or 32B config compiles on a laptop) and compiled by
the real TPU compiler. The functions are the ones the trainer runs, not copies: `rl.train_step.learner_fns` (the
learner's gradient micro-step, optimizer init and apply) and the sampler's (prompt prefill, a crop appended after
a zoom, the decode loop: `sampling.sampler._extend_paged` / `_decode_segment` over the paged KV pool of the
continuous rollout engine, `_extend` / `_decode` over a contiguous cache for `rollout.engine="lockstep"`), with the
argument shardings the trainer gives them.

Per function it prints (and `--json` writes) what the compiler says about one chip: argument / output / temporary
/ code bytes and their peak against the chip's HBM, FLOPs and bytes accessed (XLA's cost analysis of an SPMD
program is per chip: a matmul sharded 4 ways reports a quarter of the global FLOPs), and the roofline time
max(flops / peak FLOP/s, bytes / peak HBM bandwidth). A function the compiler refuses for memory is reported with
the compiler's own figure. Exit status 1 when anything does not fit or fails to compile.

Shapes (all derived from the config; see `StepShapes`):
- learner: `rl.micro_batch_rows` packed rows (padded as the trainer pads them to a multiple of data x fsdp) of
  `rollout.max_total_tokens` rounded up to a power of two >= `rl.min_row_len`; per row one prompt image (as in the
  prefill) plus `rollout.max_images - 1` crops of `--crop_px` px square (`--patches_per_row` overrides);
- prefill: the rollout batch (data.batch_size x rollout.group_size rows in one call, as `run_rollouts` prefills;
  `--rollout_rows` overrides) of `rollout.max_prompt_tokens` tokens (half the capacity when the config has no
  such field), each with one near-square image filling the prompt but for `PROMPT_TEXT_TOKENS` of text, at most
  `rollout.max_pixels`; cache capacity `rollout.max_total_tokens`;
- crop: the same rows, each appending an observation of one `--crop_px` crop plus `OBSERVATION_TEXT_TOKENS`;
- decode: the same rows, a step bucket of the first turn's budget min(max_tokens_per_turn, capacity - prompt);
  XLA's cost analysis counts one pass of the decode while loop, i.e. one token step.
These are the lock-step engine's (`rollout.engine="lockstep"`). The continuous engine (the default) instead has a
pool of `rollout.kv_pages` pages (0: what every slot needs at `max_total_tokens`, the ceiling of a growing pool)
split over data x fsdp; prefill: the first wave's group prompts (one per group and shard, a power of two per
shard); crop: every slot extended at once (the most a segment can end with); decode: every slot, a segment of
`rollout.segment_steps` steps, page tables as wide as a row of `max_total_tokens`.
Every lowering runs under `kernels.platform.compiling_for(mesh)`, as the trainer's calls run under
`platform.scope(mesh)`: code paths follow the slice's platform (TPU Pallas kernels for `attention_impl` pallas /
auto, run per shard of the mesh), not this host's. `mosaic_kernels` counts the Pallas TPU calls in each program.
"""

from __future__ import annotations

from deepeyes_jax import cli_env

if __name__ == "__main__":  # before TensorFlow, jax and libtpu load: they read it when they start
  cli_env.quiet_environment()

import dataclasses
import inspect
import json
import math
import os
import re
import sys
import threading
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from jax.experimental import mesh_utils, topologies
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from deepeyes_jax.kernels import platform
from deepeyes_jax.models import qwen2_5_vl as qvl
from deepeyes_jax.models.qwen2_5_vl import presets
from deepeyes_jax.models.qwen2_5_vl.tiny import tiny_config
from deepeyes_jax.parallel import sharding as shd
from deepeyes_jax.processing import image as improc
from deepeyes_jax.rl.metrics import PEAK_FLOPS, PEAK_HBM_BANDWIDTH
from deepeyes_jax.rl.packing import PackedBatch, micro_batch_num_rows, pack, rows_per_micro_batch
from deepeyes_jax.rl.train_step import batch_shardings, learner_fns, opt_state_shardings
from deepeyes_jax.rl.trainer import learner_config
from deepeyes_jax.run_setup import agent_config, model_options
from deepeyes_jax.sampling import cache as cache_lib
from deepeyes_jax.sampling import paged as paged_lib
from deepeyes_jax.sampling import sampler as sampler_lib

GiB = 1 << 30

FUNCTIONS = ("opt_init", "grad", "opt_apply", "prefill", "crop", "decode")
DESCRIPTIONS = {
  "opt_init": "optimizer init (tx.init)",
  "grad": "learner gradient micro-step (Learner._grad)",
  "opt_apply": "optimizer apply (Learner._apply)",
  "prefill": "sampler extend: prompt prefill",
  "crop": "sampler extend: crop observation",
  "decode": "sampler decode loop",
}


# --------------------------------------------------------------------------------------------------------------
# Chips and slices
# --------------------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Chip:
  """One TPU chip generation: the HBM the compiler lets a program use, and the peaks of the roofline."""

  generation: str
  hbm_bytes: int
  peak_flops: float  # dense bf16 FLOP/s
  hbm_bandwidth: float  # bytes/s


def _chip(gen: str, hbm_gib: float) -> Chip:
  return Chip(gen, int(hbm_gib * GiB), PEAK_FLOPS[gen], PEAK_HBM_BANDWIDTH[gen])


# HBM per chip as libtpu 0.0.42's compiler states it in its out-of-memory message ("exceeds available HBM (95.74G)");
# v4 is compiled as megacore (one device per chip, both TensorCores).
CHIPS = {
  "v4": _chip("v4", 30.75),
  "v5e": _chip("v5e", 15.75),
  "v5p": _chip("v5p", 95.74),
  "v6e": _chip("v6e", 31.25),
}

# Slice name -> libtpu topology. v4 and v5p names count TensorCores (2 per chip), v5e and v6e names count chips.
SLICES = {
  "v4-8": "v4:2x2x1",
  "v4-64": "v4:2x4x4",
  "v5p-8": "v5p:2x2x1",
  "v5p-16": "v5p:2x2x2",
  "v5p-64": "v5p:2x4x4",
  "v5p-128": "v5p:4x4x4",
  "v5e-4": "v5e:2x2",
  "v5e-8": "v5e:2x4",
  "v5e-16": "v5e:4x4",
  "v5e-128": "v5e:8x16",
  "v5e-256": "v5e:16x16",
  "v6e-4": "v6e:2x2",
  "v6e-8": "v6e:2x4",
  "v6e-32": "v6e:4x8",
  "v6e-64": "v6e:8x8",
  "v6e-256": "v6e:16x16",
}
_RAW_TOPOLOGY = re.compile(r"(v4|v5e|v5p|v6e):(\d+(?:x\d+){1,2})")


@dataclasses.dataclass(frozen=True)
class Slice:
  name: str  # as given: "v5p-64" or a raw topology string
  topology: str  # libtpu's: "v5p:2x4x4"
  chip: Chip
  num_chips: int


def parse_slice(name: str) -> Slice:
  """A slice name from `SLICES` or a raw topology string "GEN:AxB[xC]"; ValueError listing the known names."""
  topology = SLICES.get(name, name)
  m = _RAW_TOPOLOGY.fullmatch(topology)
  if m is None:
    raise ValueError(
      f"unknown topology {name!r}: use a slice name ({', '.join(SLICES)}) or a libtpu topology string "
      f"GEN:AxB[xC] with GEN in {', '.join(CHIPS)} (e.g. v5p:2x2x1)"
    )
  return Slice(name, topology, CHIPS[m.group(1)], math.prod(int(x) for x in m.group(2).split("x")))


def topology_devices(s: Slice) -> list:
  """The slice's devices, one per chip, from libtpu's topology description (no TPU needed)."""
  kw = {"chip_config_name": "megacore"} if s.chip.generation == "v4" else {}
  devices = list(topologies.get_topology_desc(s.topology, "tpu", **kw).devices)
  if len(devices) != s.num_chips:
    raise ValueError(f"topology {s.topology} gave {len(devices)} devices, expected {s.num_chips} chips")
  return devices


def slice_mesh(mesh_cfg, devices: Sequence) -> Mesh:
  """The run's (data, fsdp, tensor) mesh over the slice's devices, in the physical order `mesh_utils` picks."""
  shape = [int(mesh_cfg.data), int(mesh_cfg.fsdp), int(mesh_cfg.tensor)]
  n = len(devices)
  described = f"config.mesh data={shape[0]} fsdp={shape[1]} tensor={shape[2]}"
  if shape.count(-1) > 1 or any(s == 0 or s < -1 for s in shape):
    raise ValueError(f"{described}: each axis must be >= 1, with at most one -1 (the remaining chips)")
  if -1 in shape:
    rest = math.prod(s for s in shape if s != -1)
    if n % rest:
      raise ValueError(f"{described} does not fit the slice's {n} chips: {rest} does not divide {n}")
    shape[shape.index(-1)] = n // rest
  if math.prod(shape) != n:
    raise ValueError(f"{described} = {math.prod(shape)} chips, but the slice has {n}")
  try:
    ordered = mesh_utils.create_device_mesh(shape, devices)
  except (ValueError, NotImplementedError, AssertionError):  # no physical mapping known for this shape
    ordered = np.asarray(devices).reshape(shape)
  return shd.make_mesh(*shape, devices=list(ordered.flat))


# --------------------------------------------------------------------------------------------------------------
# Compiler messages
# --------------------------------------------------------------------------------------------------------------
_UNITS = {"": 1, "B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40, "P": 1 << 50}
_SIZE = r"([\d.]+)\s*([KMGTP]?)(?:i?B)?"
_OOM_PATTERNS = (
  # "... the total memory required for HLO temporaries (24.00G) exceeds available HBM (15.75G)."
  re.compile(r"\(" + _SIZE + r"\)\s*exceeds available HBM\s*\(" + _SIZE + r"\)"),
  re.compile(_SIZE + r"\s+exceeds available HBM\s*\(" + _SIZE + r"\)"),
  # "Ran out of memory in memory space hbm. Used 20.50G of 15.75G hbm."
  re.compile(r"Used\s+" + _SIZE + r"\s+of\s+" + _SIZE + r"\s+hbm", re.IGNORECASE),
)


def _bytes(number: str, unit: str) -> int:
  return int(round(float(number) * _UNITS[unit.upper()]))


def parse_oom(message: str) -> tuple[int, int] | None:
  """(bytes required, bytes available) per chip from the TPU compiler's out-of-memory error, else None."""
  if "RESOURCE_EXHAUSTED" not in message and "memory" not in message.lower():
    return None
  for pattern in _OOM_PATTERNS:
    m = pattern.search(message)
    if m:
      return _bytes(m.group(1), m.group(2)), _bytes(m.group(3), m.group(4))
  return None


# --------------------------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------------------------
def _tiny(kw: dict) -> qvl.Qwen25VLConfig:
  names = inspect.signature(tiny_config).parameters
  defaults = {"vocab_size": 768}
  return tiny_config(**{**defaults, **{k: v for k, v in kw.items() if k in names}})


def model_config(config: ml_collections.ConfigDict, model: str | None = None) -> tuple[qvl.Qwen25VLConfig, str]:
  """The Qwen2.5-VL config a run of `config` trains, and where it came from.

  `model` (the --model flag) wins: a preset name (presets.py) or an HF directory / config.json. Otherwise as the trainer
  resolves it: `model.checkpoint`'s config.json when it exists here, the tiny model made by code when the
  checkpoint is empty and `model.tiny` is set, else the preset `model.size` (7B when the config has none).
  """

  def from_path(path: str) -> qvl.Qwen25VLConfig:
    return qvl.Qwen25VLConfig.from_json_file(os.path.dirname(path) if path.endswith(".json") else path)

  if model:
    if model in presets.PRESETS:
      return presets.preset(model), f"preset {model}"
    return from_path(model), model
  ckpt = config.model.get("checkpoint")
  if ckpt and os.path.exists(os.path.join(ckpt, "config.json")):
    return from_path(ckpt), ckpt
  tiny = config.model.get("tiny")
  if not ckpt and tiny:
    return _tiny(tiny.to_dict()), "config.model.tiny"
  size = config.model.get("size", "7b")
  return presets.preset(size), f"preset {size}"


def with_layers(cfg: qvl.Qwen25VLConfig, layers: int | None, vision_layers: int | None) -> qvl.Qwen25VLConfig:
  """`cfg` with fewer decoder layers / vision blocks (quick compiles; the last kept block does full attention)."""
  if layers:
    cfg = cfg.replace(text=dataclasses.replace(cfg.text, num_hidden_layers=layers))
  if vision_layers:
    full = tuple(i for i in cfg.vision.fullatt_block_indexes if i < vision_layers) or (vision_layers - 1,)
    cfg = cfg.replace(vision=dataclasses.replace(cfg.vision, depth=vision_layers, fullatt_block_indexes=full))
  return cfg


def abstract_state(
  cfg: qvl.Qwen25VLConfig, dtype, attention_impl: str, mesh: Mesh, param_dtype=None, remat="none", scan_layers=False
):
  """(graphdef, state) of the model with ShapeDtypeStruct leaves carrying the parameters' NamedShardings (as
  `from_pretrained` places them), and the parameter count. Nothing is allocated."""
  model = qvl.abstract_model(cfg, dtype=dtype, param_dtype=param_dtype).set_attention_impl(attention_impl)
  graphdef, state = nnx.split(model.set_remat(remat, scan_layers))
  n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state))

  def place(v):
    return v.replace(jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=shd.variable_sharding(v, mesh)))

  return graphdef, jax.tree.map(place, state, is_leaf=lambda x: isinstance(x, nnx.Variable)), n_params


# --------------------------------------------------------------------------------------------------------------
# Shapes of one step
# --------------------------------------------------------------------------------------------------------------
PROMPT_TEXT_TOKENS = 512  # system prompt (DeepEyes' is ~375 tokens) + question, beside the prompt image
OBSERVATION_TEXT_TOKENS = 64  # the text around a crop in a tool observation


def image_grid(tokens: int, merge: int = 2) -> tuple[int, int, int]:
  """A near-square patch grid (t, h, w) of about `tokens` merged tokens (h, w multiples of `merge`)."""
  gh = max(1, math.isqrt(max(1, tokens)))
  gw = max(1, tokens // gh)
  return 1, gh * merge, gw * merge


def crop_grid(side_px: int, min_pixels: int, max_pixels: int) -> tuple[int, int, int]:
  """The patch grid of a square crop of `side_px` after `smart_resize` (the rollout's preprocessing)."""
  h, w = improc.smart_resize(side_px, side_px, min_pixels=min_pixels, max_pixels=max_pixels)
  return 1, h // improc.PATCH_SIZE, w // improc.PATCH_SIZE


@dataclasses.dataclass(frozen=True)
class StepShapes:
  """The shapes one training step of a config compiles at (see the module docstring for the assumptions)."""

  row_len: int  # packed learner row
  micro_rows: int  # rows per learner micro-batch (after the trainer's padding)
  learner_grids: tuple[tuple[int, int, int], ...]  # image grids of one learner row
  learner_patches: int  # patches per row (the row layout), bucketed as `pack` does
  rollout_rows: int  # rows the sampler runs at once (rollout.max_concurrent_rows, else the whole rollout batch)
  rollout_chunks: int  # sampler calls per step: the rollout batch / rollout_rows
  total_rows: int  # trajectories per step: data.batch_size x rollout.group_size
  capacity: int  # KV cache slots per row
  prompt_tokens: int  # prefill token bucket
  prompt_grid: tuple[int, int, int]
  prefill_patches: int  # patches per row of the prompt image, bucketed as `Sampler.extend` does
  crop_tokens: int  # crop-observation token bucket
  crop_grid: tuple[int, int, int]
  crop_patches: int  # per row
  decode_steps: int  # decode step bucket (the continuous engine: a segment's)
  # The continuous engine (rollout.engine): decode slots and a paged KV pool, both split over data x fsdp.
  engine: str = "lockstep"
  slots: int = 0  # decode slots (rollout.max_concurrent_rows rounded up to whole shards)
  prefill_rows: int = 0  # group prompts prefilled in one call: the first wave's, a power of two per shard
  crop_rows: int = 0  # rows extended in one call at most: every slot's
  page_size: int = 0
  pool_pages: int = 0  # rollout.kv_pages, else what the slots need at max_total_tokens each (a pool's ceiling)
  table_width: int = 0  # page-table width of the longest row (max_total_tokens), a power of two

  def describe(self) -> dict[str, str]:
    g = lambda grid: "x".join(map(str, grid))  # noqa: E731
    images = ", ".join(g(x) for x in dict.fromkeys(self.learner_grids)) or "none"
    if self.engine == "continuous":
      pool = f"pool {self.pool_pages} pages x {self.page_size}"
      return {
        "grad": f"{self.micro_rows} rows x {self.row_len} tokens, {len(self.learner_grids)} images/row "
        f"(grids {images}), {self.learner_patches} patches/row",
        "prefill": f"{self.prefill_rows} group prompts x {self.prompt_tokens} tokens, image {g(self.prompt_grid)}, "
        f"{self.prefill_patches} patches/row, {pool}",
        "crop": f"{self.crop_rows} rows x {self.crop_tokens} tokens, crop {g(self.crop_grid)}/row, "
        f"{self.crop_patches} patches/row, {pool}",
        "decode": f"{self.slots} slots, segment of {self.decode_steps} steps, {pool}, "
        f"page tables of {self.table_width}",
      }
    return {
      "grad": f"{self.micro_rows} rows x {self.row_len} tokens, {len(self.learner_grids)} images/row "
      f"(grids {images}), {self.learner_patches} patches/row",
      "prefill": f"{self.rollout_rows} rows x {self.prompt_tokens} tokens, image {g(self.prompt_grid)}/row, "
      f"{self.prefill_patches} patches/row, cache {self.capacity}",
      "crop": f"{self.rollout_rows} rows x {self.crop_tokens} tokens, crop {g(self.crop_grid)}/row, "
      f"{self.crop_patches} patches/row, cache {self.capacity}",
      "decode": f"{self.rollout_rows} rows, {self.decode_steps} steps bucket, cache {self.capacity}",
    }


def _sampler_default(name: str) -> int:
  """A `Sampler` bucket minimum as the trainer's `Sampler(model, mesh=mesh)` has it."""
  return inspect.signature(sampler_lib.Sampler.__init__).parameters[name].default


def step_shapes(
  config: ml_collections.ConfigDict,
  model_cfg: qvl.Qwen25VLConfig,
  mesh: Mesh,
  *,
  patches_per_row: int | None = None,
  crop_px: int = 448,
  rollout_rows: int | None = None,
) -> StepShapes:
  r, rl = config.rollout, config.rl
  bucket = sampler_lib.bucket
  vision = model_cfg.vision
  merge = vision.spatial_merge_size
  factor = vision.patch_size * merge
  capacity = r.max_total_tokens
  prompt = r.get("max_prompt_tokens", None) or capacity // 2
  prompt = min(prompt, capacity - 1)
  image_tokens = min(r.max_pixels // factor**2, prompt - min(PROMPT_TEXT_TOKENS, prompt // 4))
  p_grid = image_grid(image_tokens, merge)
  c_grid = crop_grid(crop_px, r.min_pixels, r.max_pixels)
  per_image = math.prod
  min_patches = inspect.signature(pack).parameters["min_patch_bucket"].default
  if patches_per_row is None:  # the prompt image and every crop the rollout allows
    grids = (p_grid,) + (c_grid,) * max(0, r.max_images - 1)
  else:  # --patches_per_row: one image of about that many patches (0: text only)
    grids = (image_grid(patches_per_row // merge**2, merge),) if patches_per_row else ()
  row_patches = sum(map(per_image, grids))
  per = rows_per_micro_batch(rl.micro_batch_rows, mesh)
  micro_rows = micro_batch_num_rows(per, per, mesh)
  total_rows = config.data.batch_size * r.group_size
  concurrent = r.get("max_concurrent_rows", 0)
  if concurrent:  # whole groups, as run_rollouts chunks them
    concurrent = max(1, concurrent // r.group_size) * r.group_size
  rows = rollout_rows or min(total_rows, concurrent or total_rows)
  min_tok, min_patch = _sampler_default("min_token_bucket"), _sampler_default("min_patch_bucket")
  crop_text = min(OBSERVATION_TEXT_TOKENS, capacity // 8)
  agent = agent_config(config)
  paged_shapes = {}
  if agent.engine == "continuous":
    shards = math.prod(mesh.shape[a] for a in ("data", "fsdp"))
    slots = -(-min(total_rows, agent.max_concurrent_rows or total_rows) // shards) * shards
    per_shard = slots // shards
    page = agent.page_size
    pool = agent.kv_pages or slots * -(-capacity // page)
    paged_shapes = dict(
      engine="continuous",
      slots=slots,
      prefill_rows=shards * bucket(-(-per_shard // r.group_size), 1),
      crop_rows=shards * bucket(per_shard, 1),
      page_size=page,
      pool_pages=-(-pool // shards) * shards,
      table_width=bucket(-(-(capacity + 1) // page), 1),
    )
  return StepShapes(
    row_len=bucket(capacity, rl.min_row_len),
    micro_rows=micro_rows,
    learner_grids=grids,
    learner_patches=bucket(row_patches, min_patches) if row_patches else 0,
    rollout_rows=rows,
    rollout_chunks=-(-total_rows // rows),
    total_rows=total_rows,
    capacity=capacity,
    prompt_tokens=bucket(prompt, min_tok),
    prompt_grid=p_grid,
    prefill_patches=bucket(per_image(p_grid), min_patch),
    crop_tokens=bucket(per_image(c_grid) // merge**2 + crop_text, min_tok),
    crop_grid=c_grid,
    crop_patches=bucket(per_image(c_grid), min_patch),
    decode_steps=(
      bucket(agent.segment_steps, 1)
      if agent.engine == "continuous"
      else bucket(min(r.max_tokens_per_turn, capacity - prompt), _sampler_default("min_step_bucket"))
    ),
    **paged_shapes,
  )


def _sds(shape, dtype, sharding) -> jax.ShapeDtypeStruct:
  return jax.ShapeDtypeStruct(tuple(shape), dtype, sharding=sharding)


def abstract_plan(grids: Sequence[tuple[int, int, int]], n_patches: int, vision, sharding, rows: int):
  """The row layout's `VisionPlan` ((rows, ...) arrays) of rows with images among `grids`, each row padded to
  `n_patches`, as ShapeDtypeStructs: the static window / image spans are those of the real plan (maxima over the
  grids), the index arrays never exist."""
  plan = qvl.make_vision_plan(np.asarray(grids), vision)
  units = n_patches // vision.merge_unit
  sizes = {"window_index": (units,), "reverse_index": (units,), "pos_hw": (n_patches, 2)}
  return dataclasses.replace(
    plan,
    **{
      f.name: _sds((rows, *sizes.get(f.name, (n_patches,))), jnp.int32, sharding)
      for f in dataclasses.fields(plan)
      if not f.metadata.get("static")
    },
  )


def abstract_batch(shapes: StepShapes, model_cfg: qvl.Qwen25VLConfig, mesh: Mesh) -> PackedBatch:
  """A learner micro-batch of ShapeDtypeStructs with the shardings `Learner.place` gives it."""
  r, length = shapes.micro_rows, shapes.row_len
  i32, f32 = jnp.int32, jnp.float32
  shapes_tree = PackedBatch(
    tokens=jax.ShapeDtypeStruct((r, length), i32),
    segment_ids=jax.ShapeDtypeStruct((r, length), i32),
    positions=jax.ShapeDtypeStruct((r, length), i32),
    position_ids=jax.ShapeDtypeStruct((3, r, length), i32),
    loss_mask=jax.ShapeDtypeStruct((r, length), f32),
    old_logprobs=jax.ShapeDtypeStruct((r, length), f32),
    sampler_logprobs=jax.ShapeDtypeStruct((r, length), f32),
    advantages=jax.ShapeDtypeStruct((r, length), f32),
    pixel_values=None,
    plan=None,
  )
  if shapes.learner_patches:
    shapes_tree.pixel_values = jax.ShapeDtypeStruct((r, shapes.learner_patches, model_cfg.vision.patch_dim), f32)
    shapes_tree.plan = abstract_plan(shapes.learner_grids, shapes.learner_patches, model_cfg.vision, None, r)
  shardings = batch_shardings(shapes_tree, mesh)
  return jax.tree.map(lambda x, s: _sds(x.shape, x.dtype, s), shapes_tree, shardings)


# --------------------------------------------------------------------------------------------------------------
# Compiling
# --------------------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Result:
  """What the compiler said about one function, per chip."""

  name: str
  description: str
  shapes: str = ""
  status: str = "ok"  # "ok" | "oom" (refused for memory) | "error" | "skipped"
  fits: bool = False
  argument_bytes: int = 0
  output_bytes: int = 0
  temp_bytes: int = 0
  code_bytes: int = 0
  alias_bytes: int = 0
  peak_bytes_per_chip: int = 0
  flops: float = 0.0
  bytes_accessed: float = 0.0
  roofline_s: float = 0.0
  compile_s: float = 0.0
  mosaic_kernels: int = 0  # Pallas TPU (Mosaic) calls in the compiled program: the attention kernels
  collectives: int = 0  # cross-chip collectives in the program text (`collective_traffic`)
  collective_bytes: int = 0  # their result bytes per chip; a loop body's collectives count once
  resident_bytes: int = 0  # per chip, arrays that stay in HBM during the call without being its arguments
  error: str = ""
  note: str = ""
  compiled: Any = dataclasses.field(default=None, repr=False)

  def to_json(self) -> dict:
    return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "compiled"}


class _Heartbeat:
  """Prints 'still compiling NAME (Ns)' every `every` seconds while a compile runs."""

  def __init__(self, name: str, t0: float, every: float = 30.0):
    self.name, self.t0, self.every = name, t0, every
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._run, daemon=True)

  def _run(self):
    while not self._stop.wait(self.every):
      print(f"  ... still compiling {self.name} ({time.perf_counter() - self.t0:.0f} s)", flush=True)

  def __enter__(self):
    self._thread.start()
    return self

  def __exit__(self, *exc):
    self._stop.set()
    self._thread.join()


def _cost(compiled) -> dict:
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):  # older JAX: one dict per computation
    cost = cost[0] if cost else {}
  return dict(cost or {})


def compile_function(result: Result, jitted: Callable, args: Sequence, mesh: Mesh, chip: Chip) -> Result:
  """Lowers `jitted(*args)` for the mesh's platform and compiles it; fills `result` (never raises)."""
  t0 = time.perf_counter()
  print(f"[{result.name}] {result.description}: {result.shapes}", flush=True)
  try:
    with _Heartbeat(result.name, t0), platform.compiling_for(mesh):
      lowered = jitted.lower(*args)
      print(f"  lowered in {time.perf_counter() - t0:.1f} s; compiling", flush=True)
      compiled = lowered.compile()
  except Exception as e:  # noqa: BLE001 -- every failure is reported per function, the others still compile
    result.compile_s = time.perf_counter() - t0
    message = str(e)
    oom = parse_oom(message)
    if oom is not None:
      result.status, result.fits = "oom", False
      result.peak_bytes_per_chip = oom[0]
      result.note = f"compiler: {oom[0] / GiB:.2f} GiB needed, {oom[1] / GiB:.2f} GiB available"
    else:
      result.status = "error"
    result.error = f"{type(e).__name__}: {message.strip()[:4000]}"
    print(f"  {result.status.upper()} after {result.compile_s:.1f} s: {result.error.splitlines()[0][:300]}", flush=True)
    return result
  result.compile_s = time.perf_counter() - t0
  result.compiled = compiled
  # A computation whose sharded inputs are all unused is placed on the default device (this host's CPU): its
  # figures would describe the wrong machine.
  platforms = {d.platform for sh in jax.tree.leaves(compiled.output_shardings) for d in sh.device_set}
  if platforms - {"tpu"}:
    result.status = "error"
    result.error = f"compiled for {sorted(platforms)}, not for the slice: its arguments do not pin it to the mesh"
    print(f"  ERROR: {result.error}", flush=True)
    return result
  text = compiled.as_text()
  result.mosaic_kernels = text.count('custom_call_target="tpu_custom_call"')
  result.collectives, result.collective_bytes = collective_traffic(text)
  mem = compiled.memory_analysis()
  result.argument_bytes = int(mem.argument_size_in_bytes)
  result.output_bytes = int(mem.output_size_in_bytes)
  result.temp_bytes = int(mem.temp_size_in_bytes)
  result.code_bytes = int(mem.generated_code_size_in_bytes)
  result.alias_bytes = int(mem.alias_size_in_bytes)
  # As the compiler counts a program's footprint: donated arguments that are reused as outputs count once.
  result.peak_bytes_per_chip = (
    result.argument_bytes + result.output_bytes + result.temp_bytes + result.code_bytes - result.alias_bytes
  )
  result.fits = result.peak_bytes_per_chip <= chip.hbm_bytes
  cost = _cost(compiled)
  result.flops = float(cost.get("flops", 0.0))
  result.bytes_accessed = float(cost.get("bytes accessed", 0.0))
  result.roofline_s = max(result.flops / chip.peak_flops, result.bytes_accessed / chip.hbm_bandwidth)
  print(
    f"  compiled in {result.compile_s:.1f} s: peak {result.peak_bytes_per_chip / GiB:.2f} GiB/chip "
    f"({'fits' if result.fits else 'DOES NOT FIT'}), {result.flops / 1e12:.3f} TFLOP/chip",
    flush=True,
  )
  return result


_DTYPE_BYTES = {
  "pred": 1,
  "s8": 1,
  "u8": 1,
  "s16": 2,
  "u16": 2,
  "bf16": 2,
  "f16": 2,
  "s32": 4,
  "u32": 4,
  "f32": 4,
  "s64": 8,
  "u64": 8,
  "f64": 8,
}
_COLLECTIVE = re.compile(
  r"=\s*(?P<type>\(.*?\)|\w+\[[\d,]*\](?:\{[^}]*\})?)\s+"
  r"(?P<op>all-gather|all-reduce|reduce-scatter|all-to-all|collective-permute)(?P<start>-start)?\("
)
_SHAPE = re.compile(r"(\w+)\[([\d,]*)\]")


def collective_traffic(hlo_text: str) -> tuple[int, int]:
  """(count, bytes) of the cross-chip collectives in a compiled SPMD program's text: all-gather, all-reduce,
  reduce-scatter, all-to-all and collective-permute (async `-start` forms counted once, by their largest array). Bytes
  are each op's result on one chip, a measure of what the chip receives. Static: an op inside a loop body counts
  once, so a decode program's figure is per token step, and a scanned layer stack's is per layer."""
  count = total = 0
  for m in _COLLECTIVE.finditer(re.sub(r"/\*.*?\*/", "", hlo_text)):  # XLA writes /*index=5*/ into long tuples
    kind = m.group("type")
    if m.group("start") and m.group("op") != "all-reduce":
      # all-gather-start / collective-permute-start / ...: (operands, results, context...): the results' element.
      parts = _top_level(kind)
      kind = parts[1] if len(parts) > 1 else kind
    count += 1
    total += sum(
      math.prod(int(d) for d in dims.split(",") if d) * _DTYPE_BYTES.get(dtype, 4)
      for dtype, dims in _SHAPE.findall(kind)
    )
  return count, total


def _top_level(tuple_text: str) -> list[str]:
  """The top-level elements of an HLO tuple type "(a, (b, c), d)"."""
  inner, parts, depth, start = tuple_text.strip()[1:-1], [], 0, 0
  for i, ch in enumerate(inner):
    depth += {"(": 1, "[": 1, "{": 1, ")": -1, "]": -1, "}": -1}.get(ch, 0)
    if ch == "," and depth == 0:
      parts.append(inner[start:i])
      start = i + 1
  return parts + [inner[start:]]


def chip_bytes(tree, shardings=None) -> int:
  """Bytes per chip of a tree of (abstract) arrays: each leaf's shard under its sharding (or `shardings`)."""
  leaves = jax.tree.leaves(tree)
  shards = jax.tree.leaves(shardings) if shardings is not None else [x.sharding for x in leaves]
  return sum(int(np.prod(sh.shard_shape(x.shape))) * jnp.dtype(x.dtype).itemsize for x, sh in zip(leaves, shards))


def _row_images(rows: int, grid, n_patches: int, vision, mesh) -> tuple:
  """(pixel_values, plan) of one image per row in the row layout, sharded with the rows (as the sampler puts them)."""
  rows_sharding = NamedSharding(mesh, P(shd.logical_to_spec(("batch",), (rows,), mesh)[0]))
  pixel_values = _sds((rows, n_patches, vision.patch_dim), jnp.float32, rows_sharding)
  return pixel_values, abstract_plan((grid,), n_patches, vision, rows_sharding, rows)


def _token_inputs(rows: int, n_tokens: int, rep) -> tuple:
  """tokens (rows, n), counts (rows,), M-RoPE positions (3, rows, n): host arrays (numpy in the sampler), which
  enter the jitted call uncommitted, i.e. replicated over the mesh."""
  i32 = jnp.int32
  return _sds((rows, n_tokens), i32, rep), _sds((rows,), i32, rep), _sds((3, rows, n_tokens), i32, rep)


def _replicated(mesh):
  return NamedSharding(mesh, P())


def compile_step(
  config: ml_collections.ConfigDict,
  slice_: Slice,
  *,
  functions: Sequence[str] = FUNCTIONS,
  model: str | None = None,
  layers: int | None = None,
  vision_layers: int | None = None,
  patches_per_row: int | None = None,
  crop_px: int = 448,
  rollout_rows: int | None = None,
) -> dict:
  """Compiles `functions` of one training step of `config` for `slice_`. Returns the report (see `--json`)."""
  unknown = [f for f in functions if f not in FUNCTIONS]
  if unknown:
    raise ValueError(f"unknown function(s) {unknown}; known: {', '.join(FUNCTIONS)}")
  devices = topology_devices(slice_)
  mesh = slice_mesh(config.mesh, devices)
  base_cfg, source = model_config(config, model)
  model_cfg = with_layers(base_cfg, layers, vision_layers)
  opts = model_options(config)
  dtype = opts["dtype"]
  graphdef, state, n_params = abstract_state(
    model_cfg,
    dtype,
    config.model.attention_impl,
    mesh,
    param_dtype=opts["param_dtype"],
    remat=opts["remat"],
    scan_layers=opts["scan_layers"],
  )
  shapes = step_shapes(
    config, model_cfg, mesh, patches_per_row=patches_per_row, crop_px=crop_px, rollout_rows=rollout_rows
  )
  chip = slice_.chip
  rep = _replicated(mesh)
  described = shapes.describe()
  t = model_cfg.text
  print(
    f"{slice_.name} ({slice_.topology}): {slice_.num_chips} chips, mesh {dict(mesh.shape)}, "
    f"{chip.hbm_bytes / GiB:.2f} GiB HBM/chip\nmodel {source}: {t.num_hidden_layers} decoder layers"
    f"{' (--layers)' if layers else ''}, vision depth {model_cfg.vision.depth}, {n_params / 1e9:.3f}B parameters "
    f"({opts['param_dtype'].name}, compute {dtype.name}), attention {config.model.attention_impl}, remat "
    f"{opts['remat']}{', scanned layers' if opts['scan_layers'] else ''}",
    flush=True,
  )
  results: dict[str, Result] = {}
  wanted = set(functions)

  def run(name: str, jitted, args, shapes_text: str = "") -> Result:
    res = compile_function(Result(name, DESCRIPTIONS[name], shapes_text), jitted, args, mesh, chip)
    # What the trainer holds in HBM beside the call's arguments: during a gradient micro-step the AdamW moments and
    # the gradients summed so far; during the rollout the learner's parameters and moments (the sampler's copy is
    # an argument; `Sampler.release` frees it before the learner step).
    res.resident_bytes = resident.get(name, 0)
    if res.status == "ok":
      res.fits = res.peak_bytes_per_chip + res.resident_bytes <= chip.hbm_bytes
    results[name] = res
    return res

  # --- learner ---------------------------------------------------------------------------------------------
  fns = learner_fns(graphdef, state, learner_config(config))
  opt_bytes = chip_bytes(jax.eval_shape(fns.init, state), opt_state_shardings(fns.tx, state))
  param_bytes = chip_bytes(state)
  resident = {"grad": opt_bytes + param_bytes, "prefill": opt_bytes + param_bytes}
  resident["crop"] = resident["decode"] = resident["prefill"]
  grad = None
  if "opt_init" in wanted:
    run("opt_init", fns.init, (state,), f"{n_params / 1e9:.3f}B parameters")
  if "grad" in wanted:
    batch = abstract_batch(shapes, model_cfg, mesh)
    grad = run("grad", fns.grad, (state, batch, _sds((), jnp.float32, rep)), described["grad"])
  if "opt_apply" in wanted:
    # The optimizer state as `fns.init` lays it out (each moment sharded as its parameter).
    like = lambda tree, shardings: jax.tree.map(lambda x, s: _sds(x.shape, x.dtype, s), tree, shardings)  # noqa: E731
    opt_state = like(jax.eval_shape(fns.init, state), opt_state_shardings(fns.tx, state))
    # The summed gradients keep the gradient step's output shardings (jnp.add of equally sharded arrays); without
    # a compiled gradient step, the parameters' shardings.
    grads = state if grad is None or grad.compiled is None else like(state, grad.compiled.output_shardings[0])
    run("opt_apply", fns.apply, (state, opt_state, grads, _sds((), jnp.float32, rep)), "state, opt state, gradients")

  # --- sampler ---------------------------------------------------------------------------------------------
  # The sampler's copy of the weights (`sampler.sampling_layout`): compute dtype, tensor-parallel only.
  layout = config.rollout.get("weight_layout", "tensor_parallel")
  sampler_shardings = sampler_lib.sampling_shardings(state, mesh, layout)
  floating = lambda x: jnp.issubdtype(x.dtype, jnp.floating)  # noqa: E731
  sampler_state = jax.tree.map(
    lambda v, sh: v.replace(_sds(v.shape, dtype if floating(v) else v.dtype, sh)),
    state,
    sampler_shardings,
    is_leaf=lambda x: isinstance(x, nnx.Variable),
  )
  overrides = {"layers_override": layers, "vision_layers_override": vision_layers}
  if shapes.engine == "continuous":
    _compile_paged(run, wanted, shapes, described, graphdef, sampler_state, model_cfg, config, mesh, dtype)
    return _report(slice_, mesh, source, base_cfg, model_cfg, n_params, state, opts, config, shapes, results, overrides)
  b, cap = shapes.rollout_rows, shapes.capacity
  cache_shardings = cache_lib.cache_shardings(model_cfg, b, cap, mesh)
  kv = (b, t.num_key_value_heads, cap, t.head_dim)
  cache = cache_lib.KVCache(
    k=tuple(_sds(kv, dtype, s) for s in cache_shardings.k),
    v=tuple(_sds(kv, dtype, s) for s in cache_shardings.v),
    lengths=_sds((b,), jnp.int32, cache_shardings.lengths),
    next_pos=_sds((b,), jnp.int32, cache_shardings.next_pos),
  )

  def extend_args(n_tokens: int, grid, n_patches: int):
    new_next = _sds((b,), jnp.int32, rep)
    images = _row_images(b, grid, n_patches, model_cfg.vision, mesh)
    return (graphdef, cache_shardings, sampler_state, cache, *_token_inputs(b, n_tokens, rep), new_next, *images)

  prefill = None
  if "prefill" in wanted:
    prefill_args = extend_args(shapes.prompt_tokens, shapes.prompt_grid, shapes.prefill_patches)
    prefill = run("prefill", sampler_lib._extend, prefill_args, described["prefill"])
  if "crop" in wanted:
    run(
      "crop",
      sampler_lib._extend,
      extend_args(shapes.crop_tokens, shapes.crop_grid, shapes.crop_patches),
      described["crop"],
    )
  if "decode" in wanted:
    logits_sharding = (
      prefill.compiled.output_shardings[1]
      if prefill is not None and prefill.compiled is not None
      else shd.logical_to_sharding(("batch", None), (b, t.vocab_size), mesh)
    )
    params = agent_config(config).sampling
    steps = shapes.decode_steps
    keys = jax.eval_shape(lambda: sampler_lib.row_keys(0, b))
    i32 = jnp.int32
    args = (
      graphdef,
      cache_shardings,
      params,
      steps,
      False,
      sampler_state,
      cache,
      _sds((b, t.vocab_size), jnp.float32, logits_sharding),
      _sds(keys.shape, keys.dtype, rep),
      _sds((b,), i32, rep),
      _sds((2,), i32, rep),
      _sds((2,), i32, rep),
      _sds((b, steps), i32, rep),
    )
    res = run("decode", sampler_lib._decode, args, described["decode"])
    if res.status == "ok":
      res.note = "cost analysis: one pass of the while loop (one token step)"
  return _report(slice_, mesh, source, base_cfg, model_cfg, n_params, state, opts, config, shapes, results, overrides)


def _compile_paged(run, wanted, shapes: StepShapes, described, graphdef, sampler_state, model_cfg, config, mesh, dtype):
  """The continuous engine's functions (`Sampler.extend_paged` / `decode_segment`) over the paged pool."""
  t = model_cfg.text
  i32 = jnp.int32
  rep = _replicated(mesh)
  pool_shardings = paged_lib.pool_shardings(model_cfg, shapes.pool_pages, shapes.page_size, mesh)
  pool_shape = (shapes.pool_pages, shapes.page_size, 2 * t.num_key_value_heads, t.head_dim)
  pool = paged_lib.PagedKV(pools=tuple(_sds(pool_shape, dtype, s) for s in pool_shardings.pools))

  def extend_args(rows: int, n_tokens: int, grid, n_patches: int, width: int):
    page_table, lengths = _sds((rows, width), i32, rep), _sds((rows,), i32, rep)
    images = _row_images(rows, grid, n_patches, model_cfg.vision, mesh)
    return (
      graphdef,
      pool_shardings,
      sampler_state,
      pool,
      *_token_inputs(rows, n_tokens, rep),
      page_table,
      lengths,
      *images,
    )

  bucket, page = sampler_lib.bucket, shapes.page_size
  if "prefill" in wanted:
    width = bucket(-(-shapes.prompt_tokens // page), 1)
    args = extend_args(shapes.prefill_rows, shapes.prompt_tokens, shapes.prompt_grid, shapes.prefill_patches, width)
    run("prefill", sampler_lib._extend_paged, args, described["prefill"])
  if "crop" in wanted:
    width = bucket(-(-(shapes.capacity + shapes.crop_tokens) // page), 1)
    args = extend_args(shapes.crop_rows, shapes.crop_tokens, shapes.crop_grid, shapes.crop_patches, width)
    run("crop", sampler_lib._extend_paged, args, described["crop"])
  if "decode" in wanted:
    s, steps = shapes.slots, shapes.decode_steps
    keys = jax.eval_shape(lambda: sampler_lib.row_keys(0, s))
    args = (
      graphdef,
      pool_shardings,
      agent_config(config).sampling,
      steps,
      sampler_state,
      pool,
      _sds((s, t.vocab_size), jnp.float32, shd.logical_to_sharding(("batch", None), (s, t.vocab_size), mesh)),
      _sds(keys.shape, keys.dtype, rep),
      _sds((s, shapes.table_width), i32, rep),
      _sds((s,), i32, rep),
      _sds((s,), i32, rep),
      _sds((s,), i32, rep),
      _sds((2,), i32, rep),
      _sds((2,), i32, rep),
      _sds((s, steps), i32, rep),
      _sds((), i32, rep),
    )
    res = run("decode", sampler_lib._decode_segment, args, described["decode"])
    if res.status == "ok":
      res.note = "cost analysis: one pass of the while loop (one token step)"


def _report(slice_, mesh, source, base_cfg, model_cfg, n_params, state, opts, config, shapes, results, overrides=None):
  """The `--json` report of `compile_step`."""
  t, chip = model_cfg.text, slice_.chip
  return {
    "topology": slice_.name,
    "group_size": config.rollout.group_size,
    "topology_string": slice_.topology,
    "chips": slice_.num_chips,
    "generation": chip.generation,
    "mesh": {k: int(v) for k, v in mesh.shape.items()},
    "hbm_bytes_per_chip": chip.hbm_bytes,
    "peak_flops_per_chip": chip.peak_flops,
    "hbm_bandwidth_per_chip": chip.hbm_bandwidth,
    "cost_analysis": "per chip",
    "model": {
      "source": source,
      "decoder_layers": t.num_hidden_layers,
      "decoder_layers_full": base_cfg.text.num_hidden_layers,
      "vision_depth": model_cfg.vision.depth,
      "parameters": n_params,
      **flop_counts(state, model_cfg),
      "dtype": opts["dtype"].name,
      "param_dtype": opts["param_dtype"].name,
      "remat": opts["remat"],
      "scan_layers": opts["scan_layers"],
      "attention_impl": config.model.attention_impl,
      **(overrides or {}),
    },
    "shapes": dataclasses.asdict(shapes),
    "functions": [results[name].to_json() for name in FUNCTIONS if name in results],
  }


# --------------------------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------------------------
def _gib(n: float) -> str:
  return f"{n / GiB:.2f}"


def format_table(report: dict) -> str:
  """The per-function table (bytes in GiB per chip; FLOPs and bytes accessed per chip, as XLA reports them)."""
  m = report["model"]
  layers = f"{m['decoder_layers']} of {m['decoder_layers_full']} decoder layers" + (
    " (--layers: a reduced model)" if m["layers_override"] else ""
  )
  head = (
    f"{report['topology']} ({report['topology_string']}): {report['chips']} chips, mesh {report['mesh']}, HBM "
    f"{_gib(report['hbm_bytes_per_chip'])} GiB/chip; {m['source']}, {layers}, vision depth {m['vision_depth']}, "
    f"{m['parameters'] / 1e9:.3f}B parameters ({_precision(m)}), attention {m['attention_impl']}\n"
    "All figures PER CHIP (XLA's memory and cost analyses of an SPMD program are per chip). GiB; peak = arguments"
    " + outputs + temporaries + code - aliased (donated); resident = what the trainer keeps in HBM beside the"
    " arguments (AdamW moments, summed gradients, the learner's parameters during the rollout); %HBM and fits count"
    " peak + resident; roofline = max(FLOPs / peak FLOP/s, bytes / HBM B/s)."
  )
  cols = (
    "function",
    "args",
    "out",
    "temp",
    "code",
    "alias",
    "peak",
    "resid.",
    "%HBM",
    "fits",
    "TFLOP",
    "GB acc.",
    "coll. GB",
    "roofline",
    "compile",
  )
  rows = []
  for f in report["functions"]:
    failed = f["status"] in ("error", "skipped")
    peak = f["peak_bytes_per_chip"]
    rows.append(
      (
        f["name"],
        *(
          ("-",) * 5
          if f["status"] != "ok"
          else tuple(_gib(f[k]) for k in ("argument_bytes", "output_bytes", "temp_bytes", "code_bytes", "alias_bytes"))
        ),
        "-" if failed else _gib(peak) + (" (OOM)" if f["status"] == "oom" else ""),
        _gib(f.get("resident_bytes", 0)),
        "-" if failed else f"{100 * (peak + f.get('resident_bytes', 0)) / report['hbm_bytes_per_chip']:.0f}%",
        "ERROR" if failed else ("yes" if f["fits"] else "NO"),
        "-" if f["status"] != "ok" else f"{f['flops'] / 1e12:.3f}",
        "-" if f["status"] != "ok" else f"{f['bytes_accessed'] / 1e9:.2f}",
        "-" if f["status"] != "ok" else f"{f.get('collective_bytes', 0) / 1e9:.2f}",
        "-" if f["status"] != "ok" else _seconds(f["roofline_s"]),
        f"{f['compile_s']:.0f} s",
      )
    )
  widths = [max(len(str(x)) for x in col) for col in zip(cols, *rows)]

  def line(r):
    return "  ".join(str(x).rjust(w) if i else str(x).ljust(w) for i, (x, w) in enumerate(zip(r, widths)))

  out = [head, line(cols), line(["-" * w for w in widths])] + [line(r) for r in rows]
  for f in report["functions"]:
    out.append(f"  {f['name']}: {f['shapes']}" + (f"; {f['note']}" if f["note"] else ""))
    if f["error"] and f["status"] != "oom":
      out.append(f"    {f['error'].splitlines()[0][:500]}")
  return "\n".join(out)


def markdown_table(report: dict) -> str:
  """The report as a Markdown table (for docs): per function and chip, GiB, TFLOP, GB accessed, roofline."""
  m = report["model"]
  lines = [
    f"`{report.get('command', '')}`: {report['topology']} ({report['chips']} chips, mesh "
    f"{report['mesh']}, {_gib(report['hbm_bytes_per_chip'])} GiB HBM per chip), {m['source']}, "
    f"{m['decoder_layers']} decoder layers, {m['parameters'] / 1e9:.3f}B parameters ({_precision(m)}), attention "
    f"{m['attention_impl']}. Per chip; compiled, not run on hardware.",
    "",
    "| function | shapes | peak GiB | resident GiB | % HBM | fits | TFLOP | GB accessed | roofline | "
    "collectives (GB) | Mosaic kernels |",
    "|---|---|---|---|---|---|---|---|---|---|---|",
  ]
  for f in report["functions"]:
    ok = f["status"] == "ok"
    if f["status"] == "error":
      peak, pct, fits = "-", "-", "compile error"
    else:
      peak = _gib(f["peak_bytes_per_chip"]) + ("" if ok else " (compiler)")
      held = f["peak_bytes_per_chip"] + f.get("resident_bytes", 0)
      pct = f"{100 * held / report['hbm_bytes_per_chip']:.0f}%"
      fits = "yes" if f["fits"] else "**no**"
    cost = (
      f"{f['flops'] / 1e12:.3f} | {f['bytes_accessed'] / 1e9:.2f} | {_seconds(f['roofline_s'])} | "
      f"{f.get('collectives', 0)} ({f.get('collective_bytes', 0) / 1e9:.2f})"
    )
    lines.append(
      f"| {f['name']} | {f['shapes']} | {peak} | {_gib(f.get('resident_bytes', 0))} | {pct} | {fits} | "
      f"{cost if ok else '- | - | - | -'} | "
      f"{f.get('mosaic_kernels', 0) if ok else '-'} |"
    )
  if "projection" in report:
    lines += ["", projection_text(report["projection"]) + "."]
  return "\n".join(lines)


def _precision(m: dict) -> str:
  """E.g. `float32 parameters, bfloat16 compute, remat full, scanned layers` (older reports: the one dtype)."""
  out = f"{m.get('param_dtype', m['dtype'])} parameters, {m['dtype']} compute"
  if "remat" in m:
    out += f", remat {m['remat']}" + (", scanned layers" if m.get("scan_layers") else "")
  return out


def _seconds(s: float) -> str:
  return f"{s * 1e3:.2f} ms" if s < 1 else f"{s:.2f} s"


@dataclasses.dataclass(frozen=True)
class StepAssumptions:
  """What a step's projected time assumes beyond the compiled shapes (the compiler cannot know trajectory lengths).

  tokens_per_trajectory: prompt + response, packed into learner rows; turns: assistant turns per trajectory (each
  turn after the first appends a crop); decode_steps_per_turn: token steps of one decode call (the lock-step engine
  decodes until the chunk's longest turn ends); slot_utilisation: the continuous engine's share of slot-steps that
  generate a token (a slot idles while its row waits for the rest of its segment; measured on CPU by
  `python -m deepeyes_jax.perf.rollout`).
  """

  tokens_per_trajectory: int = 6000
  turns: int = 3
  decode_steps_per_turn: int = 1024
  image_tokens: int = 2048  # the prompt image's tokens (4 patches each), at most the compiled prompt image's
  # The continuous engine: generated tokens / (slots x decode steps), `RolloutStats.slot_utilisation`.
  slot_utilisation: float = 0.8


def flop_counts(state, cfg: qvl.Qwen25VLConfig) -> dict:
  """What `project_step` needs of the model: matmul parameters of the text decoder (the lm_head included, the
  embedding lookup not, unless tied) and of the vision tower, and the attention shapes."""
  n = {"text": 0, "vision": 0}
  for path, x in jax.tree_util.tree_leaves_with_path(state):
    keys = [getattr(k, "key", getattr(k, "name", "")) for k in path]
    size = int(np.prod(x.shape))
    if keys[0] == "visual":
      n["vision"] += size
    elif "embed_tokens" not in keys or cfg.tie_word_embeddings:
      n["text"] += size
  v = cfg.vision
  window = (v.window_size // v.patch_size) ** 2
  return {
    "text_matmul_params": n["text"],
    "lm_head_params": cfg.text.vocab_size * cfg.text.hidden_size,
    "vision_params": n["vision"],
    "hidden": cfg.text.num_attention_heads * cfg.text.head_dim,
    "vision_hidden": v.hidden_size,
    "vision_full_blocks": len(v.fullatt_block_indexes),
    "vision_window_patches": window,
  }


def _vision_flops(patches: float, m: dict) -> float:
  """Forward FLOPs of the vision tower on one image of `patches` patches: matmuls + window / full attention."""
  d, full = m["vision_hidden"], m["vision_full_blocks"]
  window = m["vision_window_patches"]
  return 2 * m["vision_params"] * patches + 4 * d * patches * ((m["vision_depth"] - full) * window + full * patches)


def project_step(report: dict, assumptions: StepAssumptions = StepAssumptions()) -> dict | None:
  """Seconds of one training step, a roofline lower bound (no host work, no judge, no padding):

  - compute-bound parts from the model's FLOPs at the slices' peak: the learner's forward + backward (+ the
    recomputed forward under `remat`) of every trajectory, the prefills and crop extends of every rollout row.
    XLA's cost analysis counts a loop body once (a scanned layer stack, the chunked logits), so the compiled
    FLOPs of those programs undercount and are not used here;
  - bandwidth-bound parts from the compiled programs: a decode step (one pass of its loop is one token step) x
    steps x turns x rollout chunks, and the optimizer apply.
  None when a function it needs did not compile or fit.
  """
  f = {x["name"]: x for x in report["functions"]}
  if any(n not in f or f[n]["status"] != "ok" or not f[n]["fits"] for n in ("grad", "opt_apply", "decode")):
    return None
  sh, m, a = report["shapes"], report["model"], assumptions
  peak = report["chips"] * report["peak_flops_per_chip"]
  trajectories = sh.get("total_rows", sh["rollout_rows"] * sh["rollout_chunks"])
  t = a.tokens_per_trajectory
  text = m["text_matmul_params"]

  def text_fwd(n, ctx, head=True):  # n tokens attending to ctx keys each; the lm_head on every token or none
    params = text if head else text - m.get("lm_head_params", 0)
    return 2 * params * n + 4 * m["decoder_layers"] * m["hidden"] * n * ctx

  prompt_patches = 4 * min(a.image_tokens, math.prod(sh["prompt_grid"]) // 4)
  crop_patches = math.prod(sh["crop_grid"])
  prompt_tokens = min(t, prompt_patches // 4 + PROMPT_TEXT_TOKENS)
  crop_tokens = crop_patches // 4 + OBSERVATION_TEXT_TOKENS
  # A causal sequence of T tokens attends to T / 2 keys on average.
  traj_fwd = text_fwd(t, t / 2) + _vision_flops(prompt_patches, m) + (a.turns - 1) * _vision_flops(crop_patches, m)
  passes = 4 if m.get("remat", "none") != "none" else 3  # forward, backward (2x), recomputed forward
  learner_flops = trajectories * passes * traj_fwd
  continuous = sh.get("engine") == "continuous"
  # Extends compute logits at each row's last token only. The continuous engine prefills a prompt once per group.
  prompts = trajectories / report.get("group_size", 1) if continuous else trajectories
  rollout_flops = prompts * (text_fwd(prompt_tokens, prompt_tokens / 2, head=False) + _vision_flops(prompt_patches, m))
  rollout_flops += (
    trajectories * (a.turns - 1) * (text_fwd(crop_tokens, t / 2, head=False) + _vision_flops(crop_patches, m))
  )
  if continuous:  # every slot generates a token per step, but for idle slot-steps
    generated = max(0, t - prompt_tokens - (a.turns - 1) * crop_tokens)
    decode_steps = trajectories * generated / (sh["slots"] * a.slot_utilisation)
  else:  # a decode call per turn per chunk, as long as the chunk's longest turn
    decode_steps = sh["rollout_chunks"] * a.turns * a.decode_steps_per_turn
  decode_s = decode_steps * f["decode"]["roofline_s"]
  rows = math.ceil(trajectories * t / sh["row_len"])
  rollout = rollout_flops / peak + decode_s
  learner = learner_flops / peak + f["opt_apply"]["roofline_s"]
  return {
    "assumptions": dataclasses.asdict(a),
    "trajectories": trajectories,
    "learner_rows": rows,
    "learner_micro_steps": math.ceil(rows / sh["micro_rows"]),
    "rollout_chunks": sh["rollout_chunks"],
    "engine": sh.get("engine", "lockstep"),
    "decode_steps": decode_steps,
    "learner_tflop": learner_flops / 1e12,
    "rollout_prefill_crop_tflop": rollout_flops / 1e12,
    "decode_s": decode_s,
    "rollout_s": rollout,
    "learner_s": learner,
    "step_s": rollout + learner,
  }


def projection_text(p: dict | None) -> str:
  if p is None:
    return "projected step time: - (a function it needs did not compile or fit)"
  a = p["assumptions"]
  return (
    f"projected step time (roofline, lower bound): {p['step_s']:.0f} s = rollout {p['rollout_s']:.0f} s "
    f"(prefills and crops {p['rollout_prefill_crop_tflop'] / 1e3:.0f} PFLOP; decode {p['decode_s']:.0f} s: "
    + (
      f"{p['decode_steps']:.0f} steps of every slot at {a['slot_utilisation']:.0%} utilisation"
      if p.get("engine") == "continuous"
      else f"{p['rollout_chunks']} chunks x {a['turns']} turns x {a['decode_steps_per_turn']} steps"
    )
    + ") + learner "
    f"{p['learner_s']:.0f} s ({p['learner_tflop'] / 1e3:.0f} PFLOP: {p['trajectories']} trajectories x "
    f"{a['tokens_per_trajectory']} tokens, {a['turns']} turns, in {p['learner_micro_steps']} micro-steps)"
  )


def failed(report: dict) -> bool:
  return any(not f["fits"] or f["status"] != "ok" for f in report["functions"])


# --------------------------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------------------------
def _define_flags() -> None:
  """The command-line flags, defined only when this module runs as a program: importing it defines none, so
  several CLI modules can live in one process (the tests import them)."""
  from absl import flags
  from ml_collections import config_flags

  global _CONFIG, _FLAGS
  _CONFIG = config_flags.DEFINE_config_file("config", None, "a configs/*.py file (optionally :variant)")
  flags.DEFINE_string("topology", None, f"slice name ({', '.join(SLICES)}) or a libtpu topology such as v5p:2x2x1")
  flags.DEFINE_string("json", None, "write the report as JSON to this file")
  flags.DEFINE_string("markdown", None, "write the table as Markdown to this file (docs/tpu_7b.md's tables)")
  flags.DEFINE_list("functions", list(FUNCTIONS), f"subset to compile, comma-separated: {','.join(FUNCTIONS)}")
  flags.DEFINE_integer("layers", None, "compile with this many decoder layers (quick iteration; labelled)")
  flags.DEFINE_integer("vision_layers", None, "compile with this many vision blocks (quick iteration; labelled)")
  flags.DEFINE_string(
    "model",
    None,
    f"model shape: a preset ({', '.join(presets.names())}) or an HF dir/config.json; "
    "default from the config (model.checkpoint, model.tiny, model.size)",
  )
  flags.DEFINE_integer("patches_per_row", None, "image patches per learner row (default: prompt image + crops)")
  flags.DEFINE_integer("crop_px", 448, "side in pixels of the square crop of a zoom (before smart_resize)")
  flags.DEFINE_integer("rollout_rows", None, "sampler rows (default data.batch_size x rollout.group_size)")
  defaults = StepAssumptions()
  flags.DEFINE_integer("tokens_per_trajectory", defaults.tokens_per_trajectory, "projection: tokens per trajectory")
  flags.DEFINE_integer("turns_per_trajectory", defaults.turns, "projection: assistant turns per trajectory")
  flags.DEFINE_integer("decode_steps_per_turn", defaults.decode_steps_per_turn, "projection: steps per decode call")
  flags.DEFINE_integer("image_tokens", defaults.image_tokens, "projection: tokens of the prompt image")
  flags.DEFINE_float("slot_utilisation", defaults.slot_utilisation, "projection: continuous engine slot utilisation")
  flags.mark_flags_as_required(["config", "topology"])
  _FLAGS = flags.FLAGS


def command_line(args: Sequence[str]) -> str:
  """The command that compiled a report, without where its output went (--json / --markdown and their values)."""
  kept, skip_next = [], False
  for a in args:
    if skip_next:
      skip_next = False
    elif a in ("--json", "--markdown"):
      skip_next = True
    elif not a.startswith(("--json=", "--markdown=")):
      kept.append(a)
  return " ".join(["python -m deepeyes_jax.aot", *kept])


def main(argv) -> None:
  from deepeyes_jax.run_setup import quiet_frameworks

  del argv
  quiet_frameworks()
  f = _FLAGS
  try:
    slice_ = parse_slice(f.topology)
    report = compile_step(
      _CONFIG.value,
      slice_,
      functions=[x.strip() for x in f.functions if x.strip()],
      model=f.model,
      layers=f.layers,
      vision_layers=f.vision_layers,
      patches_per_row=f.patches_per_row,
      crop_px=f.crop_px,
      rollout_rows=f.rollout_rows,
    )
  except ValueError as e:  # a bad topology / mesh / function name: said before anything compiles
    sys.exit(f"aot: {e}")
  report["config"] = f["config"].config_filename if hasattr(f["config"], "config_filename") else ""
  report["command"] = command_line(sys.argv[1:])
  report["projection"] = project_step(
    report,
    StepAssumptions(
      f.tokens_per_trajectory, f.turns_per_trajectory, f.decode_steps_per_turn, f.image_tokens, f.slot_utilisation
    ),
  )
  print(format_table(report), flush=True)
  print(projection_text(report["projection"]), flush=True)
  for path, text in ((f.json, lambda: json.dumps(report, indent=2)), (f.markdown, lambda: markdown_table(report))):
    if path:
      with open(path, "w") as fh:
        fh.write(text() + "\n")
      print(f"wrote {path}", flush=True)
  sys.exit(1 if failed(report) else 0)


if __name__ == "__main__":
  from absl import app

  from deepeyes_jax.run_setup import parse_flags

  _define_flags()
  app.run(main, flags_parser=parse_flags)
