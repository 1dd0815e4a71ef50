"""Qwen2.5-VL configuration, read from an HF `config.json`.

Two layouts exist on disk and both are accepted:
- the flat hub form (`Qwen/Qwen2.5-VL-7B-Instruct`): text fields at the top level, `rope_theta` and
  `rope_scaling` (with `mrope_section`) at the top level, vision fields under `vision_config` (`in_chans`);
- the nested transformers-5 form (what `save_pretrained` writes today): text fields under `text_config` with
  `rope_parameters = {rope_theta, mrope_section, ...}`, vision under `vision_config` (`in_channels`).

transformers' class defaults differ from the real checkpoints (e.g. vision hidden 3584 vs 1280), so every
field that matters must come from the file; only fields the real checkpoints omit fall back to their values.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any


class ConfigError(ValueError):
  """A config.json that cannot describe a Qwen2.5-VL model."""


@dataclasses.dataclass(frozen=True)
class VisionConfig:
  depth: int = 32
  hidden_size: int = 1280
  intermediate_size: int = 3420
  num_heads: int = 16
  in_channels: int = 3
  patch_size: int = 14
  temporal_patch_size: int = 2
  spatial_merge_size: int = 2
  window_size: int = 112
  out_hidden_size: int = 3584
  fullatt_block_indexes: tuple[int, ...] = (7, 15, 23, 31)
  rope_theta: float = 10000.0
  rms_norm_eps: float = 1e-6  # fixed in the reference implementation, not read from the file
  tokens_per_second: int = 2

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_heads

  @property
  def patch_dim(self) -> int:
    """Length of one flattened patch row: C * T * P * P (1176 for the real models)."""
    return self.in_channels * self.temporal_patch_size * self.patch_size**2

  @property
  def merge_unit(self) -> int:
    return self.spatial_merge_size**2


@dataclasses.dataclass(frozen=True)
class TextConfig:
  vocab_size: int = 152064
  hidden_size: int = 3584
  intermediate_size: int = 18944
  num_hidden_layers: int = 28
  num_attention_heads: int = 28
  num_key_value_heads: int = 4
  rms_norm_eps: float = 1e-6
  rope_theta: float = 1000000.0
  mrope_section: tuple[int, int, int] = (16, 24, 24)
  max_position_embeddings: int = 128000

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_attention_heads


@dataclasses.dataclass(frozen=True)
class Qwen25VLConfig:
  text: TextConfig = dataclasses.field(default_factory=TextConfig)
  vision: VisionConfig = dataclasses.field(default_factory=VisionConfig)
  tie_word_embeddings: bool = False
  image_token_id: int = 151655
  video_token_id: int = 151656
  vision_start_token_id: int = 151652
  vision_end_token_id: int = 151653
  bos_token_id: int | None = 151643
  eos_token_id: int | list[int] | None = 151645
  pad_token_id: int | None = None

  def __post_init__(self):
    _validate(self)

  # --- reading -------------------------------------------------------------------------------------------
  @classmethod
  def from_hf_dict(cls, d: dict[str, Any], source: str = "<dict>") -> "Qwen25VLConfig":
    """Builds the config from a parsed HF config.json (flat hub form or nested transformers-5 form)."""
    if d.get("model_type") not in (None, "qwen2_5_vl"):
      raise ConfigError(f"{source}: model_type is {d.get('model_type')!r}, expected 'qwen2_5_vl'")
    text_d = dict(d.get("text_config") or {})
    # Flat hub form: text fields live at the top level. Nested fields win where both exist.
    for k, v in d.items():
      if k not in ("text_config", "vision_config"):
        text_d.setdefault(k, v)
    vis_d = dict(d.get("vision_config") or {})
    if not vis_d:
      raise ConfigError(f"{source}: no 'vision_config' section")

    rope = dict(text_d.get("rope_parameters") or text_d.get("rope_scaling") or {})
    rope_theta = rope.get("rope_theta", text_d.get("rope_theta", 1000000.0))
    mrope = rope.get("mrope_section")
    if mrope is None:
      raise ConfigError(f"{source}: no mrope_section in rope_scaling / rope_parameters")

    def need(dd, key, where):
      if key not in dd:
        raise ConfigError(f"{source}: missing field {where}{key!r}")
      return dd[key]

    text = TextConfig(
      vocab_size=int(need(text_d, "vocab_size", "")),
      hidden_size=int(need(text_d, "hidden_size", "")),
      intermediate_size=int(need(text_d, "intermediate_size", "")),
      num_hidden_layers=int(need(text_d, "num_hidden_layers", "")),
      num_attention_heads=int(need(text_d, "num_attention_heads", "")),
      num_key_value_heads=int(text_d.get("num_key_value_heads") or text_d["num_attention_heads"]),
      rms_norm_eps=float(text_d.get("rms_norm_eps", 1e-6)),
      rope_theta=float(rope_theta),
      mrope_section=tuple(int(x) for x in mrope),
      max_position_embeddings=int(text_d.get("max_position_embeddings", 128000)),
    )
    vrope = vis_d.get("rope_parameters") or {}
    vision = VisionConfig(
      depth=int(need(vis_d, "depth", "vision_config.")),
      hidden_size=int(need(vis_d, "hidden_size", "vision_config.")),
      intermediate_size=int(need(vis_d, "intermediate_size", "vision_config.")),
      num_heads=int(need(vis_d, "num_heads", "vision_config.")),
      in_channels=int(vis_d.get("in_channels", vis_d.get("in_chans", 3))),
      patch_size=int(vis_d.get("patch_size", 14)),
      temporal_patch_size=int(vis_d.get("temporal_patch_size", 2)),
      spatial_merge_size=int(vis_d.get("spatial_merge_size", 2)),
      window_size=int(vis_d.get("window_size", 112)),
      out_hidden_size=int(need(vis_d, "out_hidden_size", "vision_config.")),
      fullatt_block_indexes=tuple(int(x) for x in vis_d.get("fullatt_block_indexes", (7, 15, 23, 31))),
      rope_theta=float(vrope.get("rope_theta", 10000.0)),
      tokens_per_second=int(vis_d.get("tokens_per_second", 2)),
    )
    tie = d.get("tie_word_embeddings")
    if tie is None:
      tie = text_d.get("tie_word_embeddings", False)
    return cls(
      text=text,
      vision=vision,
      tie_word_embeddings=bool(tie),
      image_token_id=int(d.get("image_token_id", 151655)),
      video_token_id=int(d.get("video_token_id", 151656)),
      vision_start_token_id=int(d.get("vision_start_token_id", 151652)),
      vision_end_token_id=int(d.get("vision_end_token_id", 151653)),
      bos_token_id=text_d.get("bos_token_id", 151643),
      eos_token_id=text_d.get("eos_token_id", 151645),
      pad_token_id=text_d.get("pad_token_id"),
    )

  @classmethod
  def from_json_file(cls, path: str | os.PathLike) -> "Qwen25VLConfig":
    path = os.fspath(path)
    if os.path.isdir(path):
      path = os.path.join(path, "config.json")
    try:
      with open(path) as f:
        d = json.load(f)
    except FileNotFoundError:
      raise ConfigError(f"{path}: no such file (a Qwen2.5-VL checkpoint directory needs config.json)") from None
    except json.JSONDecodeError as e:
      raise ConfigError(f"{path}: not valid JSON: {e}") from None
    return cls.from_hf_dict(d, source=path)

  # --- writing -------------------------------------------------------------------------------------------
  def to_hf_dict(self) -> dict[str, Any]:
    """The nested transformers-5 form, loadable by `transformers.Qwen2_5_VLConfig`."""
    t, v = self.text, self.vision
    return {
      "architectures": ["Qwen2_5_VLForConditionalGeneration"],
      "model_type": "qwen2_5_vl",
      "image_token_id": self.image_token_id,
      "video_token_id": self.video_token_id,
      "vision_start_token_id": self.vision_start_token_id,
      "vision_end_token_id": self.vision_end_token_id,
      "tie_word_embeddings": self.tie_word_embeddings,
      "text_config": {
        "model_type": "qwen2_5_vl_text",
        "vocab_size": t.vocab_size,
        "hidden_size": t.hidden_size,
        "intermediate_size": t.intermediate_size,
        "num_hidden_layers": t.num_hidden_layers,
        "num_attention_heads": t.num_attention_heads,
        "num_key_value_heads": t.num_key_value_heads,
        "hidden_act": "silu",
        "rms_norm_eps": t.rms_norm_eps,
        "max_position_embeddings": t.max_position_embeddings,
        "rope_parameters": {
          "rope_type": "default",
          "rope_theta": t.rope_theta,
          "mrope_section": list(t.mrope_section),
        },
        "bos_token_id": self.bos_token_id,
        "eos_token_id": self.eos_token_id,
        "pad_token_id": self.pad_token_id,
        "tie_word_embeddings": self.tie_word_embeddings,
      },
      "vision_config": {
        "model_type": "qwen2_5_vl_vision",
        "depth": v.depth,
        "hidden_size": v.hidden_size,
        "intermediate_size": v.intermediate_size,
        "num_heads": v.num_heads,
        "in_channels": v.in_channels,
        "patch_size": v.patch_size,
        "temporal_patch_size": v.temporal_patch_size,
        "spatial_merge_size": v.spatial_merge_size,
        "window_size": v.window_size,
        "out_hidden_size": v.out_hidden_size,
        "fullatt_block_indexes": list(v.fullatt_block_indexes),
        "hidden_act": "silu",
        "tokens_per_second": v.tokens_per_second,
        "rope_parameters": {"rope_type": "axial", "rope_theta": v.rope_theta},
      },
    }

  def replace(self, **kw) -> "Qwen25VLConfig":
    return dataclasses.replace(self, **kw)


def _validate(c: Qwen25VLConfig) -> None:
  t, v = c.text, c.vision
  if t.hidden_size % t.num_attention_heads:
    raise ConfigError(f"hidden_size {t.hidden_size} not divisible by num_attention_heads {t.num_attention_heads}")
  if t.num_attention_heads % t.num_key_value_heads:
    raise ConfigError(
      f"num_attention_heads {t.num_attention_heads} not divisible by num_key_value_heads {t.num_key_value_heads}"
    )
  if sum(t.mrope_section) * 2 != t.head_dim:
    raise ConfigError(f"sum(mrope_section) {list(t.mrope_section)} must equal head_dim/2 = {t.head_dim // 2}")
  if v.hidden_size % v.num_heads or v.head_dim % 4:
    raise ConfigError(f"vision head_dim {v.hidden_size}/{v.num_heads} must be an integer divisible by 4")
  if v.out_hidden_size != t.hidden_size:
    raise ConfigError(f"vision out_hidden_size {v.out_hidden_size} != text hidden_size {t.hidden_size}")
  factor = v.patch_size * v.spatial_merge_size
  if v.window_size < factor or v.window_size % factor:
    raise ConfigError(f"vision window_size {v.window_size} must be a positive multiple of {factor}")
  for name in ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id"):
    tok = getattr(c, name)
    if not 0 <= tok < t.vocab_size:
      raise ConfigError(f"{name} {tok} outside the vocabulary [0, {t.vocab_size})")
