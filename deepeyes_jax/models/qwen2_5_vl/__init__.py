"""Qwen2.5-VL in Flax NNX.

from deepeyes_jax.models import qwen2_5_vl as qvl
model = qvl.from_pretrained(hf_dir, dtype=jnp.float32)
logits = model(input_ids, attention_mask=mask, pixel_values=pv, image_grid_thw=grid)   # (B, S, vocab)
qvl.save_pretrained(model, out_dir)
"""

from deepeyes_jax.models.qwen2_5_vl.config import ConfigError, Qwen25VLConfig, TextConfig, VisionConfig
from deepeyes_jax.models.qwen2_5_vl.model import Qwen25VL, abstract_model, init_random, param_count, prepare_inputs
from deepeyes_jax.models.qwen2_5_vl.rope import get_rope_index, positions_for_tokens
from deepeyes_jax.models.qwen2_5_vl.vision import VisionPlan, make_row_plans, make_vision_plan, row_patches
from deepeyes_jax.models.qwen2_5_vl.weights import CheckpointError, from_pretrained, key_map, save_pretrained
