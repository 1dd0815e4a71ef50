"""Smoke-run Qwen2.5-VL: load a checkpoint through the real loader and run one image+text forward.

    python -m deepeyes_jax.models.qwen2_5_vl                       # embedded tiny random model, no downloads
    python -m deepeyes_jax.models.qwen2_5_vl --preset tiny         # a random model of any preset (presets.py)
    python -m deepeyes_jax.models.qwen2_5_vl --checkpoint DIR --image PATH --dtype bfloat16 --mesh 1,1,8

Prints the config, parameter count, load / compile / run times and the top next-token ids.
"""

from __future__ import annotations

import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from PIL import Image

from deepeyes_jax.models import qwen2_5_vl as qvl
from deepeyes_jax.models.qwen2_5_vl import presets
from deepeyes_jax.parallel import sharding as shd
from deepeyes_jax.processing import image as improc

_CKPT = flags.DEFINE_string("checkpoint", None, "HF Qwen2.5-VL directory; default: a random model of --preset")
_PRESET = flags.DEFINE_enum(
  "preset", "smoke", presets.names(), "model preset (presets.py) of the random model written when --checkpoint is unset"
)
_IMAGE = flags.DEFINE_string("image", None, "image file; default: a generated test pattern")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "parameter and compute dtype")
_MESH = flags.DEFINE_string("mesh", None, "data,fsdp,tensor mesh shape, e.g. 1,2,4 (default: one device)")
_MAX_PIXELS = flags.DEFINE_integer("max_pixels", 256 * 28 * 28, "max_pixels for the image processor")


def test_pattern(size=(448, 336)) -> Image.Image:
  y, x = np.mgrid[0 : size[1], 0 : size[0]]
  rgb = np.stack([(x * 255 // size[0]), (y * 255 // size[1]), ((x // 28 + y // 28) % 2) * 255], -1)
  return Image.fromarray(rgb.astype(np.uint8))


def main(argv):
  del argv
  dtype = jnp.dtype(_DTYPE.value)
  ckpt = _CKPT.value
  if ckpt is None:
    ckpt = tempfile.mkdtemp(prefix="qwen25vl_tiny_")
    print(f"writing a random checkpoint of the {_PRESET.value!r} preset to {ckpt}")
    qvl.save_pretrained(qvl.init_random(presets.preset(_PRESET.value), dtype=dtype), ckpt)
  mesh = shd.make_mesh(*(int(x) for x in _MESH.value.split(","))) if _MESH.value else None

  t = time.perf_counter()
  model = qvl.from_pretrained(ckpt, dtype=dtype, mesh=mesh)
  load_s = time.perf_counter() - t
  cfg = model.config
  print(
    f"loaded {ckpt}: {qvl.param_count(model) / 1e6:.1f}M params, text {cfg.text.num_hidden_layers}x"
    f"{cfg.text.hidden_size}, vision {cfg.vision.depth}x{cfg.vision.hidden_size}, {dtype}, {load_s:.1f} s"
  )

  img = improc.load_image(_IMAGE.value) if _IMAGE.value else test_pattern()
  pv, grid = improc.preprocess(img, max_pixels=_MAX_PIXELS.value)
  n_img = improc.num_image_tokens(grid)
  ids = np.array(
    [[cfg.vision_start_token_id] + [cfg.image_token_id] * n_img + [cfg.vision_end_token_id] + [40, 41, 42]]
  )
  print(f"image {img.size[0]}x{img.size[1]} -> grid {grid.tolist()} -> {n_img} image tokens, sequence {ids.shape[1]}")

  for label in ("compile + run", "run"):
    t = time.perf_counter()
    logits = jax.block_until_ready(model(ids, pixel_values=pv, image_grid_thw=grid[None]))
    print(f"{label}: {time.perf_counter() - t:.2f} s")
  top = np.argsort(-np.asarray(logits[0, -1]))[:5]
  print(f"logits {logits.shape}, finite: {bool(jnp.isfinite(logits).all())}, top-5 next token ids: {top.tolist()}")


if __name__ == "__main__":
  app.run(main)
