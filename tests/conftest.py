"""Shared test set-up: 8 simulated CPU devices, tiny random Qwen2.5-VL checkpoints saved by transformers."""

import os

# Must happen before jax is imported anywhere: sharding tests need 8 devices on one CPU.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import dataclasses  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from deepeyes_jax.models import qwen2_5_vl as qvl  # noqa: E402
from deepeyes_jax.models.qwen2_5_vl.presets import preset  # noqa: E402

# Token ids of the test preset's vocabulary (250-253).
_TEST = preset("test")
IMAGE, VIDEO = _TEST.image_token_id, _TEST.video_token_id
VSTART, VEND = _TEST.vision_start_token_id, _TEST.vision_end_token_id


def tiny_config(**overrides) -> qvl.Qwen25VLConfig:
  """The "test" preset (presets.py): a tiny config exercising every code path: GQA, several windows per image, a
  full-attention block."""
  return dataclasses.replace(preset("test"), **overrides)


def make_hf_model(config: qvl.Qwen25VLConfig, seed: int = 0, dtype="float32"):
  """A transformers Qwen2_5_VLForConditionalGeneration with random weights AND random norm weights."""
  import torch
  import transformers

  torch.manual_seed(seed)
  hf_cfg = transformers.Qwen2_5_VLConfig(**config.to_hf_dict())
  model = transformers.Qwen2_5_VLForConditionalGeneration(hf_cfg).eval()
  model.config._attn_implementation = "eager"
  model.model.visual.config._attn_implementation = "eager"
  model.model.language_model.config._attn_implementation = "eager"
  with torch.no_grad():
    for name, p in model.named_parameters():
      if (
        name.endswith("norm1.weight")
        or name.endswith("norm2.weight")
        or "layernorm" in name
        or name.endswith("norm.weight")
        or "ln_q" in name
      ):
        p.copy_(1.0 + 0.5 * torch.randn_like(p))  # unit norms hide cast-order and placement mistakes
  return model.to(getattr(torch, dtype))


@pytest.fixture(scope="session")
def hf_checkpoint(tmp_path_factory):
  """(directory, torch model) of a tiny untied checkpoint written by transformers' save_pretrained."""
  cfg = tiny_config()
  model = make_hf_model(cfg)
  path = tmp_path_factory.mktemp("hf_tiny")
  model.save_pretrained(path)
  return path, model


@pytest.fixture(scope="session")
def jax_model(hf_checkpoint):
  import jax.numpy as jnp

  return qvl.from_pretrained(hf_checkpoint[0], dtype=jnp.float32)


def image_block(grid) -> list[int]:
  t, h, w = grid
  return [VSTART] + [IMAGE] * (t * h * w // 4) + [VEND]


def random_pixels(grids, seed=0) -> np.ndarray:
  n = int(sum(np.prod(g) for g in grids))
  return np.random.default_rng(seed).standard_normal((n, 1176)).astype(np.float32)


def hf_logits(model, ids, mask, pixel_values=None, grids=None):
  """Reference logits from transformers; passes mm_token_type_ids, without which it silently uses 1D positions."""
  import torch

  kw = {}
  if pixel_values is not None:
    kw = dict(
      pixel_values=torch.tensor(pixel_values),
      image_grid_thw=torch.tensor(np.asarray(grids)),
      mm_token_type_ids=torch.tensor((np.asarray(ids) == IMAGE).astype(np.int64)),
    )
  with torch.no_grad():
    out = model(input_ids=torch.tensor(np.asarray(ids)), attention_mask=torch.tensor(np.asarray(mask)), **kw)
  return out.logits.float().numpy()


def rel_err(a, b, mask=None) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  if mask is not None:
    a, b = a[np.asarray(mask).astype(bool)], b[np.asarray(mask).astype(bool)]
  return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.fixture(scope="session")
def tiny_vlm(tmp_path_factory):
  """A tiny HF checkpoint + tokenizer directory whose config uses the tokenizer's special-token ids."""
  path = tmp_path_factory.mktemp("tiny_vlm")
  from deepeyes_jax.models.qwen2_5_vl.tiny import with_tiny_tokenizer
  from deepeyes_jax.processing import tiny_tokenizer as toklib

  toklib.build_tiny_tokenizer(path, 512)
  cfg = with_tiny_tokenizer(tiny_config(), 512)
  hf = make_hf_model(cfg, seed=11)
  hf.save_pretrained(path)
  return path, hf, cfg
