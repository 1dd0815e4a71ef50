"""Named model presets (models/qwen2_5_vl/presets.py): the real shapes match the hub, every preset is a valid
transformers config, lookups name the known presets, and the tools resolve them."""

import jax.numpy as jnp
import pytest
import transformers
from test_config import HUB_3B, HUB_7B

from deepeyes_jax import aot
from deepeyes_jax.models import qwen2_5_vl as qvl
from deepeyes_jax.models.qwen2_5_vl import presets
from deepeyes_jax.models.qwen2_5_vl.tiny import build_tiny_checkpoint, tiny_config
from deepeyes_jax.processing import tiny_tokenizer as toklib


@pytest.mark.parametrize("name,hub", [("3b", HUB_3B), ("7b", HUB_7B)])
def test_real_presets_are_the_hub_configs(name, hub):
  assert presets.preset(name) == qvl.Qwen25VLConfig.from_hf_dict(hub)


def test_32b_shape():
  cfg = presets.preset("32b")
  t, v = cfg.text, cfg.vision
  shape = (t.hidden_size, t.intermediate_size, t.num_hidden_layers, t.num_attention_heads, t.num_key_value_heads)
  assert shape == (5120, 27648, 64, 40, 8)
  assert (v.intermediate_size, v.out_hidden_size, t.vocab_size, cfg.tie_word_embeddings) == (3456, 5120, 152064, False)
  assert qvl.param_count(qvl.abstract_model(cfg, dtype=jnp.bfloat16)) == 33_452_718_336


@pytest.mark.parametrize("name", presets.names())
def test_every_preset_is_a_valid_transformers_config(name):
  cfg = presets.preset(name)
  assert qvl.Qwen25VLConfig.from_hf_dict(transformers.Qwen2_5_VLConfig(**cfg.to_hf_dict()).to_dict()) == cfg


def test_small_presets_keep_their_shapes():
  # tests/conftest.py's model: several windows per image, one full-attention block, ids 250-253.
  test = presets.preset("test")
  assert (test.text.hidden_size, test.text.num_hidden_layers, test.text.vocab_size) == (64, 2, 256)
  assert (test.vision.depth, test.vision.window_size, test.vision.fullatt_block_indexes) == (3, 56, (1,))
  assert (test.image_token_id, test.vision_end_token_id) == (250, 253)
  # The embedded default's model: configs/synthetic.py's model.tiny, what the trainer and the AOT tool build.
  assert presets.preset("tiny") == tiny_config(vocab_size=768) == aot.model_config(_synthetic_config())[0]
  assert presets.preset("smoke").text.vocab_size == 151936 and presets.preset("smoke").tie_word_embeddings
  ids = toklib.added_token_ids(toklib.DEFAULT_VOCAB_SIZE)
  for name in ("quickstart", "rollout_bench", "rollout_bench_quick"):  # the tiny tokenizer's layout
    assert presets.preset(name).image_token_id == ids["<|image_pad|>"], name


def _synthetic_config():
  import importlib.util
  import os

  path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "synthetic.py")
  spec = importlib.util.spec_from_file_location("synthetic", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def test_unknown_preset_names_the_known_ones():
  with pytest.raises(KeyError, match=r"unknown model preset '7B'; registered: .*32b, 3b, 7b.*did you mean '7b'"):
    presets.preset("7B")
  with pytest.raises(ValueError, match="unknown model preset"):  # also a ValueError: names come from configs/flags
    presets.preset("huge")


def test_aot_resolves_every_preset_by_name():
  for name in presets.names():
    cfg, source = aot.model_config(None, name)
    assert cfg == presets.preset(name) and source == f"preset {name}"


def test_any_preset_as_a_tiny_tokenizer_checkpoint(tmp_path):
  """build_tiny_checkpoint(config=preset) writes the shape with the tiny tokenizer's vocabulary and ids."""
  cfg = build_tiny_checkpoint(tmp_path, config=presets.preset("test"), vocab_size=300)
  assert cfg.text.vocab_size == 300 + toklib.NUM_ADDED_TOKENS
  assert cfg.image_token_id == toklib.added_token_ids(300)["<|image_pad|>"]
  assert cfg.vision == presets.preset("test").vision and cfg.text.hidden_size == 64
  assert qvl.Qwen25VLConfig.from_json_file(tmp_path) == cfg
  with pytest.raises(ValueError, match="not both"):
    build_tiny_checkpoint(tmp_path / "x", config=cfg, hidden_size=32)
