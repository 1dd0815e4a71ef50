"""Config parsing (hub flat form, transformers-5 nested form) and the real models' parameter counts."""

import json

import jax.numpy as jnp
import pytest
import transformers
from conftest import tiny_config

from deepeyes_jax.models import qwen2_5_vl as qvl

# The hub config.json of Qwen/Qwen2.5-VL-3B-Instruct (flat form), model fields as in docs/reference.md ("Model").
HUB_3B = {
  "architectures": ["Qwen2_5_VLForConditionalGeneration"],
  "model_type": "qwen2_5_vl",
  "attention_dropout": 0.0,
  "bos_token_id": 151643,
  "eos_token_id": 151645,
  "vision_start_token_id": 151652,
  "vision_end_token_id": 151653,
  "vision_token_id": 151654,
  "image_token_id": 151655,
  "video_token_id": 151656,
  "hidden_act": "silu",
  "hidden_size": 2048,
  "initializer_range": 0.02,
  "intermediate_size": 11008,
  "max_position_embeddings": 128000,
  "max_window_layers": 70,
  "num_attention_heads": 16,
  "num_hidden_layers": 36,
  "num_key_value_heads": 2,
  "rms_norm_eps": 1e-06,
  "rope_theta": 1000000.0,
  "sliding_window": 32768,
  "tie_word_embeddings": True,
  "torch_dtype": "bfloat16",
  "transformers_version": "4.41.2",
  "use_cache": True,
  "use_sliding_window": False,
  "vision_config": {
    "depth": 32,
    "hidden_act": "silu",
    "hidden_size": 1280,
    "intermediate_size": 3420,
    "num_heads": 16,
    "in_chans": 3,
    "out_hidden_size": 2048,
    "patch_size": 14,
    "spatial_merge_size": 2,
    "spatial_patch_size": 14,
    "window_size": 112,
    "fullatt_block_indexes": [7, 15, 23, 31],
    "tokens_per_second": 2,
    "temporal_patch_size": 2,
  },
  "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
  "vocab_size": 151936,
}
HUB_7B = dict(
  HUB_3B,
  hidden_size=3584,
  intermediate_size=18944,
  num_hidden_layers=28,
  num_attention_heads=28,
  num_key_value_heads=4,
  vocab_size=152064,
  tie_word_embeddings=False,
  vision_config=dict(HUB_3B["vision_config"], out_hidden_size=3584),
)


@pytest.mark.parametrize("hub,count", [(HUB_3B, 3_754_622_976), (HUB_7B, 8_292_166_656)])
def test_real_configs_build_abstractly_with_exact_param_counts(hub, count):
  cfg = qvl.Qwen25VLConfig.from_hf_dict(hub)
  model = qvl.abstract_model(cfg, dtype=jnp.bfloat16)  # nnx.eval_shape: no memory
  assert qvl.param_count(model) == count
  assert cfg.text.mrope_section == (16, 24, 24) and cfg.vision.in_channels == 3
  assert cfg.tie_word_embeddings == hub["tie_word_embeddings"]


@pytest.mark.parametrize("hub", [HUB_3B, HUB_7B])
def test_flat_and_nested_forms_agree_with_transformers(hub):
  ours = qvl.Qwen25VLConfig.from_hf_dict(hub)
  nested = transformers.Qwen2_5_VLConfig(**hub).to_dict()  # transformers folds the flat form into sub-configs
  assert qvl.Qwen25VLConfig.from_hf_dict(nested) == ours
  assert qvl.Qwen25VLConfig.from_hf_dict(ours.to_hf_dict()) == ours


def test_from_json_file(tmp_path):
  (tmp_path / "config.json").write_text(json.dumps(HUB_7B))
  assert qvl.Qwen25VLConfig.from_json_file(tmp_path).text.num_hidden_layers == 28


@pytest.mark.parametrize(
  "edit,match",
  [
    (lambda d: d.update(model_type="llama"), "model_type"),
    (lambda d: d.pop("vocab_size"), "vocab_size"),
    (lambda d: d.pop("rope_scaling"), "mrope_section"),
    (lambda d: d.update(rope_scaling={"mrope_section": [16, 24, 23]}), "head_dim/2"),
    (lambda d: d["vision_config"].update(out_hidden_size=999), "out_hidden_size"),
    (lambda d: d["vision_config"].update(window_size=100), "window_size"),
    (lambda d: d.update(image_token_id=10**6), "image_token_id"),
  ],
)
def test_bad_configs_are_named(edit, match):
  d = json.loads(json.dumps(HUB_7B))
  edit(d)
  with pytest.raises(qvl.ConfigError, match=match):
    qvl.Qwen25VLConfig.from_hf_dict(d)


def test_bad_json_file_is_named(tmp_path):
  (tmp_path / "config.json").write_text("{not json")
  with pytest.raises(qvl.ConfigError, match="config.json"):
    qvl.Qwen25VLConfig.from_json_file(tmp_path)


def test_tiny_config_is_valid_for_transformers():
  cfg = tiny_config()
  hf = transformers.Qwen2_5_VLConfig(**cfg.to_hf_dict())
  assert hf.text_config.rope_parameters["mrope_section"] == [2, 3, 3]
  assert hf.vision_config.window_size == 56
