"""Checkpoint loading/saving: both key layouts, sharded index, tied/untied lm_head, streaming, clear errors."""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import transformers
from conftest import hf_logits, image_block, make_hf_model, random_pixels, rel_err, tiny_config
from flax import nnx
from safetensors.numpy import load_file, save_file

from deepeyes_jax.models import qwen2_5_vl as qvl
from deepeyes_jax.models.qwen2_5_vl import weights as W
from deepeyes_jax.parallel import sharding as shd

GRIDS = [(1, 6, 8)]
IDS = np.array([[5, 6] + image_block(GRIDS[0]) + [7, 8]])
MASK = np.ones_like(IDS)
PV = random_pixels(GRIDS, seed=7)


def _ours(model):
  return np.asarray(model(IDS, attention_mask=MASK, pixel_values=PV, image_grid_thw=np.array(GRIDS)))


def _perturbed_random_model(cfg, seed=0):
  """A model whose weights originate here (not from transformers), norms randomised too."""
  model = qvl.init_random(cfg, seed=seed)
  state = nnx.state(model, nnx.Param)
  leaves, treedef = jax.tree.flatten(state)
  keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
  leaves = [x + 0.3 * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)]
  nnx.update(model, jax.tree.unflatten(treedef, leaves))
  return model


@pytest.mark.parametrize("tied", [False, True])
def test_save_pretrained_round_trips_through_transformers(tmp_path, tied):
  cfg = tiny_config(tie_word_embeddings=tied)
  model = _perturbed_random_model(cfg)
  qvl.save_pretrained(model, tmp_path)
  keys = load_file(tmp_path / "model.safetensors").keys()
  assert ("lm_head.weight" in keys) == (not tied)
  ref = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(tmp_path, attn_implementation="eager")
  assert ref.config.tie_word_embeddings == tied
  assert rel_err(_ours(model), hf_logits(ref.eval(), IDS, MASK, PV, GRIDS)) <= 1e-5
  # and back into ours
  assert rel_err(_ours(qvl.from_pretrained(tmp_path, dtype=jnp.float32)), _ours(model)) <= 1e-6


def test_sharded_checkpoint_with_index(tmp_path, jax_model):
  qvl.save_pretrained(jax_model, tmp_path, max_shard_bytes=100_000)
  index = json.loads((tmp_path / W.SAFE_INDEX).read_text())
  files = sorted(set(index["weight_map"].values()))
  assert len(files) >= 3 and not (tmp_path / W.SAFE_SINGLE).exists()
  assert set(index["weight_map"]) == set(W.key_map(jax_model.config))
  loaded = qvl.from_pretrained(tmp_path, dtype=jnp.float32)
  np.testing.assert_array_equal(_ours(loaded), _ours(jax_model))
  ref = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(tmp_path, attn_implementation="eager")
  assert rel_err(_ours(loaded), hf_logits(ref.eval(), IDS, MASK, PV, GRIDS)) <= 1e-5


def test_transformers5_in_memory_key_layout(tmp_path, hf_checkpoint, jax_model):
  src = hf_checkpoint[0]
  tensors = load_file(os.path.join(src, "model.safetensors"))
  renamed = {}
  for k, v in tensors.items():
    if k.startswith("visual."):
      k = "model." + k
    elif k.startswith("model."):
      k = "model.language_model." + k[len("model.") :]
    renamed[k] = v
  assert any(k.startswith("model.language_model.layers.") for k in renamed)
  save_file(renamed, tmp_path / "model.safetensors")
  shutil.copy(os.path.join(src, "config.json"), tmp_path / "config.json")
  np.testing.assert_array_equal(_ours(qvl.from_pretrained(tmp_path, dtype=jnp.float32)), _ours(jax_model))


def test_flat_hub_config_form_loads(tmp_path, hf_checkpoint, jax_model):
  """The hub's flat config.json (text fields top level, rope_scaling, in_chans) describes the same model."""
  cfg = jax_model.config
  nested = cfg.to_hf_dict()
  flat = {k: v for k, v in nested.items() if k != "text_config"}
  text = dict(nested["text_config"])
  rope = text.pop("rope_parameters")
  flat.update(
    text, rope_theta=rope["rope_theta"], rope_scaling={"type": "mrope", "mrope_section": rope["mrope_section"]}
  )
  flat["vision_config"] = dict(nested["vision_config"])
  flat["vision_config"]["in_chans"] = flat["vision_config"].pop("in_channels")
  flat["model_type"] = "qwen2_5_vl"
  (tmp_path / "config.json").write_text(json.dumps(flat))
  shutil.copy(os.path.join(hf_checkpoint[0], "model.safetensors"), tmp_path / "model.safetensors")
  assert qvl.Qwen25VLConfig.from_json_file(tmp_path) == cfg
  np.testing.assert_array_equal(_ours(qvl.from_pretrained(tmp_path, dtype=jnp.float32)), _ours(jax_model))


def test_tied_checkpoint_from_transformers(tmp_path):
  cfg = tiny_config(tie_word_embeddings=True)
  ref = make_hf_model(cfg, seed=3)
  ref.save_pretrained(tmp_path)
  model = qvl.from_pretrained(tmp_path, dtype=jnp.float32)
  assert model.lm_head is None
  assert rel_err(_ours(model), hf_logits(ref, IDS, MASK, PV, GRIDS)) <= 1e-5


def _corrupt(tmp_path, hf_checkpoint, edit):
  src = hf_checkpoint[0]
  tensors = load_file(os.path.join(src, "model.safetensors"))
  edit(tensors)
  save_file(tensors, tmp_path / "model.safetensors")
  shutil.copy(os.path.join(src, "config.json"), tmp_path / "config.json")
  return tmp_path


def test_unknown_tensor_is_named(tmp_path, hf_checkpoint):
  path = _corrupt(
    tmp_path, hf_checkpoint, lambda t: t.update({"model.layers.9.mlp.up_proj.weight": np.zeros((3, 4), np.float32)})
  )
  with pytest.raises(W.CheckpointError, match=r"model\.layers\.9\.mlp\.up_proj\.weight.*\(3, 4\)"):
    qvl.from_pretrained(path)


def test_missing_tensor_is_named(tmp_path, hf_checkpoint):
  path = _corrupt(tmp_path, hf_checkpoint, lambda t: t.pop("visual.blocks.2.attn.qkv.weight"))
  with pytest.raises(W.CheckpointError, match=r"missing.*visual\.blocks\.2\.attn\.qkv\.weight"):
    qvl.from_pretrained(path)


def test_misshaped_tensor_names_key_and_shapes(tmp_path, hf_checkpoint):
  def edit(t):
    t["model.layers.1.self_attn.k_proj.weight"] = np.zeros((16, 64), np.float32)

  path = _corrupt(tmp_path, hf_checkpoint, edit)
  with pytest.raises(W.CheckpointError, match=r"k_proj\.weight.*\(16, 64\).*\(32, 64\)"):
    qvl.from_pretrained(path)


def test_missing_files_give_clear_errors(tmp_path, hf_checkpoint):
  with pytest.raises(qvl.ConfigError, match="config.json"):
    qvl.from_pretrained(tmp_path)
  shutil.copy(os.path.join(hf_checkpoint[0], "config.json"), tmp_path / "config.json")
  with pytest.raises(W.CheckpointError, match="model.safetensors"):
    qvl.from_pretrained(tmp_path)


def test_loading_streams_only_the_shards_each_device_needs(monkeypatch, hf_checkpoint, jax_model):
  """With a (2, 2, 2) mesh a sharded weight is read slice by slice: no read covers the whole tensor."""
  reads: dict[str, list[int]] = {}
  real_open = W.safe_open

  class Recorder:
    def __init__(self, *a, **k):
      self.f = real_open(*a, **k)

    def __enter__(self):
      self.f.__enter__()
      return self

    def __exit__(self, *exc):
      return self.f.__exit__(*exc)

    def keys(self):
      return self.f.keys()

    def get_slice(self, key):
      sl = self.f.get_slice(key)

      class S:
        def get_shape(self):
          return sl.get_shape()

        def __getitem__(self, idx):
          out = sl[idx]
          reads.setdefault(key, []).append(int(np.asarray(out).size))
          return out

      return S()

  monkeypatch.setattr(W, "safe_open", Recorder)
  mesh = shd.make_mesh(2, 2, 2)
  model = qvl.from_pretrained(hf_checkpoint[0], dtype=jnp.float32, mesh=mesh)
  key = "model.layers.0.mlp.gate_proj.weight"  # (96, 64): sharded over fsdp (64) and tensor (96)
  assert max(reads[key]) == 96 * 64 // 4
  weight = model.language_model.layers[0].mlp.gate_proj.weight.get_value()  # (out, in) = (mlp, embed)
  assert weight.sharding.spec == jax.sharding.PartitionSpec("tensor", "fsdp")
  np.testing.assert_array_equal(
    np.asarray(weight), np.asarray(jax_model.language_model.layers[0].mlp.gate_proj.weight.get_value())
  )
