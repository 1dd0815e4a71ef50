"""Parity with transformers' Qwen2_5_VLForConditionalGeneration (PyTorch, eager, fp32, random norm weights)."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import IMAGE, hf_logits, image_block, random_pixels, rel_err

from deepeyes_jax.models import qwen2_5_vl as qvl

TOL = 1e-5


def test_one_image_grid_not_filling_windows(hf_checkpoint, jax_model):
  # 10x14 patches -> 5x7 merged units; 56 px windows hold 2x2 units, so the last row/column of windows is partial.
  grids = [(1, 10, 14)]
  ids = np.array([[5, 6] + image_block(grids[0]) + [7, 8, 9]])
  mask = np.ones_like(ids)
  pv = random_pixels(grids)
  ref = hf_logits(hf_checkpoint[1], ids, mask, pv, grids)
  out = np.asarray(jax_model(ids, attention_mask=mask, pixel_values=pv, image_grid_thw=np.array(grids)))
  assert out.shape == ref.shape
  assert rel_err(out, ref) <= TOL


def test_two_images_of_different_sizes_interleaved(hf_checkpoint, jax_model):
  grids = [(1, 6, 8), (1, 12, 4)]
  ids = np.array([[3] + image_block(grids[0]) + [9, 10, 11] + image_block(grids[1]) + [12, 13]])
  mask = np.ones_like(ids)
  pv = random_pixels(grids, seed=1)
  ref = hf_logits(hf_checkpoint[1], ids, mask, pv, grids)
  out = np.asarray(jax_model(ids, attention_mask=mask, pixel_values=pv, image_grid_thw=np.array(grids)))
  assert rel_err(out, ref) <= TOL


def _left_padded_batch():
  rows = [
    ([4, 5] + image_block((1, 8, 8)) + [6], [(1, 8, 8)]),
    ([7] + image_block((1, 4, 6)) + [8, 9] + image_block((1, 6, 2)) + [10, 11, 12, 13], [(1, 4, 6), (1, 6, 2)]),
    ([14, 15, 16] + image_block((1, 2, 10)), [(1, 2, 10)]),
  ]
  s = max(len(r) for r, _ in rows)
  ids = np.zeros((3, s), np.int64)
  mask = np.zeros((3, s), np.int64)
  for i, (r, _) in enumerate(rows):
    ids[i, s - len(r) :] = r
    mask[i, s - len(r) :] = 1
  grids = [g for _, gs in rows for g in gs]
  return ids, mask, grids


def test_batch_of_three_left_padded(hf_checkpoint, jax_model):
  ids, mask, grids = _left_padded_batch()
  pv = random_pixels(grids, seed=2)
  ref = hf_logits(hf_checkpoint[1], ids, mask, pv, grids)
  out = np.asarray(jax_model(ids, attention_mask=mask, pixel_values=pv, image_grid_thw=np.array(grids)))
  # Logits at padding positions are meaningless in both implementations: compare real tokens.
  assert rel_err(out, ref, mask) <= TOL


def test_text_only(hf_checkpoint, jax_model):
  ids = np.array([[1, 20, 30, 40, 50, 60, 70, 2], [1, 21, 31, 41, 51, 61, 71, 81]])
  mask = np.ones_like(ids)
  ref = hf_logits(hf_checkpoint[1], ids, mask)
  out = np.asarray(jax_model(ids, attention_mask=mask))
  assert rel_err(out, ref) <= TOL


def test_vision_features_match(hf_checkpoint, jax_model):
  grids = [(1, 10, 14), (1, 4, 4), (1, 16, 6)]
  pv = random_pixels(grids, seed=3)
  with torch.no_grad():
    ref = hf_checkpoint[1].model.get_image_features(torch.tensor(pv), torch.tensor(grids)).pooler_output
  ref = torch.cat(ref).numpy()
  plan = qvl.make_vision_plan(np.array(grids), jax_model.config.vision)
  out = np.asarray(jax_model.image_features(jnp.asarray(pv), plan))
  assert out.shape == ref.shape == (sum(t * h * w for t, h, w in grids) // 4, 64)
  assert rel_err(out, ref) <= TOL


def test_vision_padding_to_a_bucket_does_not_change_features(jax_model):
  grids = np.array([(1, 10, 14), (1, 4, 4)])
  pv = random_pixels(grids, seed=4)
  cfg = jax_model.config.vision
  exact = np.asarray(jax_model.image_features(jnp.asarray(pv), qvl.make_vision_plan(grids, cfg)))
  padded_pv = np.concatenate([pv, np.full((36, 1176), 7.0, np.float32)])
  plan = qvl.make_vision_plan(grids, cfg, pad_to=len(pv) + 36)
  padded = np.asarray(jax_model.image_features(jnp.asarray(padded_pv), plan))
  np.testing.assert_allclose(padded[: len(exact)], exact, rtol=1e-5, atol=1e-6)


def test_rope_index_and_deltas_match_hf(hf_checkpoint):
  ids, mask, grids = _left_padded_batch()
  ref_pos, ref_delta = hf_checkpoint[1].model.get_rope_index(
    torch.tensor(ids),
    mm_token_type_ids=torch.tensor((ids == IMAGE).astype(np.int64)),
    image_grid_thw=torch.tensor(grids),
    attention_mask=torch.tensor(mask),
  )
  pos, delta = qvl.get_rope_index(ids, np.array(grids), mask, image_token_id=IMAGE)
  m = mask.astype(bool)
  np.testing.assert_array_equal(pos[:, m], ref_pos.numpy()[:, m])
  np.testing.assert_array_equal(delta, ref_delta.numpy().reshape(-1))


def test_bf16_within_documented_tolerance(hf_checkpoint):
  """bf16 params and activations vs the fp32 reference: max relative logit error <= 3e-2.

  The tolerance and why: docs/reference.md, section "Numerics".
  """
  model = qvl.from_pretrained(hf_checkpoint[0], dtype=jnp.bfloat16)
  grids = [(1, 10, 14)]
  ids = np.array([[5, 6] + image_block(grids[0]) + [7, 8, 9]])
  mask = np.ones_like(ids)
  pv = random_pixels(grids)
  ref = hf_logits(hf_checkpoint[1], ids, mask, pv, grids)
  out = np.asarray(model(ids, attention_mask=mask, pixel_values=pv, image_grid_thw=np.array(grids)))
  err = rel_err(out, ref)
  assert 1e-5 < err <= 3e-2  # really bf16 (not silently fp32), and still close


def test_hf_reference_needs_mm_token_type_ids(hf_checkpoint, jax_model):
  """Guards the test harness itself: without mm_token_type_ids transformers silently uses 1D positions."""
  grids = [(1, 8, 8)]
  ids = np.array([[5] + image_block(grids[0]) + [7, 8]])
  mask = np.ones_like(ids)
  pv = random_pixels(grids)
  with torch.no_grad():
    wrong = hf_checkpoint[1](
      input_ids=torch.tensor(ids),
      attention_mask=torch.tensor(mask),
      pixel_values=torch.tensor(pv),
      image_grid_thw=torch.tensor(grids),
    ).logits.numpy()
  out = np.asarray(jax_model(ids, attention_mask=mask, pixel_values=pv, image_grid_thw=np.array(grids)))
  assert rel_err(out, wrong) > 1e-3


@pytest.mark.parametrize("impl", ["xla", "pallas"])
def test_parity_with_each_attention_implementation(hf_checkpoint, impl):
  """The same parity checks with the attention implementation selected by config (Pallas in interpret mode)."""
  model = qvl.from_pretrained(hf_checkpoint[0], dtype=jnp.float32, attention_impl=impl)
  ids, mask, grids = _left_padded_batch()
  pv = random_pixels(grids, seed=2)
  ref = hf_logits(hf_checkpoint[1], ids, mask, pv, grids)
  out = np.asarray(model(ids, attention_mask=mask, pixel_values=pv, image_grid_thw=np.array(grids)))
  assert rel_err(out, ref, mask) <= TOL
  grids1 = [(1, 10, 14)]
  ids1 = np.array([[5, 6] + image_block(grids1[0]) + [7, 8, 9]])
  pv1 = random_pixels(grids1)
  ref1 = hf_logits(hf_checkpoint[1], ids1, np.ones_like(ids1), pv1, grids1)
  assert rel_err(np.asarray(model(ids1, pixel_values=pv1, image_grid_thw=np.array(grids1))), ref1) <= TOL
