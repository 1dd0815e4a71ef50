"""Host-side index computations: vision window plan, patch positions, M-RoPE positions (classic mistakes 1, 4, 6)."""

import numpy as np
import pytest
import torch
from conftest import IMAGE, VEND, VSTART, image_block, tiny_config
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import vision_utils

from deepeyes_jax.models import qwen2_5_vl as qvl
from deepeyes_jax.models.qwen2_5_vl.vision import patch_positions

VCFG = tiny_config().vision  # patch 14, merge 2, window 56 -> 2x2 merged units per window


def _segments_to_cu(seg):
  """Cumulative boundaries of runs of equal segment ids (the reference's cu_seqlens)."""
  change = np.flatnonzero(np.diff(seg)) + 1
  return np.concatenate([[0], change, [len(seg)]])


def test_spec_window_example():
  """docs/reference.md ("Model"): grid (1, 8, 8), window 56 -> index [0,1,4,5,2,3,6,7,8,9,12,13,10,11,14,15],
  cu [0,16,32,48,64]."""
  plan = qvl.make_vision_plan(np.array([[1, 8, 8]]), VCFG)
  np.testing.assert_array_equal(plan.window_index, [0, 1, 4, 5, 2, 3, 6, 7, 8, 9, 12, 13, 10, 11, 14, 15])
  np.testing.assert_array_equal(_segments_to_cu(plan.window_segments), [0, 16, 32, 48, 64])


grids_strategy = st.lists(
  st.tuples(st.integers(1, 2), st.integers(1, 9).map(lambda x: 2 * x), st.integers(1, 9).map(lambda x: 2 * x)),
  min_size=1,
  max_size=3,
)


@settings(max_examples=60, deadline=None)
@given(grids=grids_strategy, window=st.sampled_from([56, 112]))
def test_window_plan_matches_transformers(grids, window):
  """Non-aligned grids, several images and multi-frame inputs: same permutation and window boundaries."""
  cfg = VCFG.__class__(**{**VCFG.__dict__, "window_size": window})
  plan = qvl.make_vision_plan(np.array(grids), cfg)
  ref_index, ref_cu = vision_utils.get_vision_window_index(torch.tensor(grids), 2, window, 14)
  np.testing.assert_array_equal(plan.window_index, ref_index.numpy())
  np.testing.assert_array_equal(_segments_to_cu(plan.window_segments), ref_cu.numpy())
  ref_full = vision_utils.get_vision_cu_seqlens(torch.tensor(grids)).numpy()
  np.testing.assert_array_equal(_segments_to_cu(plan.image_segments), ref_full)
  # Patch (row, col) positions, before the window permutation, equal the reference's block-major ids.
  ref_pos = vision_utils.get_vision_position_ids(torch.tensor(grids), 2).numpy()
  unperm = plan.pos_hw.reshape(-1, 4, 2)[plan.reverse_index].reshape(-1, 2)
  np.testing.assert_array_equal(unperm, ref_pos)
  assert np.all(plan.window_segments > 0) and np.all(plan.image_segments > 0)


def test_patch_positions_are_block_major():
  pos = patch_positions(1, 4, 4, 2)
  # First merge unit is the 2x2 block at the top-left, in raster order inside the block.
  np.testing.assert_array_equal(pos[:4], [[0, 0], [0, 1], [1, 0], [1, 1]])
  np.testing.assert_array_equal(pos[4:8], [[0, 2], [0, 3], [1, 2], [1, 3]])


def test_plan_padding_marks_tail_as_segment_zero():
  plan = qvl.make_vision_plan(np.array([[1, 4, 6]]), VCFG, pad_to=40)
  assert plan.window_index.shape == (10,)
  assert np.all(plan.window_segments[24:] == 0) and np.all(plan.image_segments[24:] == 0)
  with pytest.raises(ValueError, match="pad_to"):
    qvl.make_vision_plan(np.array([[1, 4, 6]]), VCFG, pad_to=22)


def test_spec_rope_index_example():
  """docs/reference.md ("Model"): [a, b, <vs>, 16 x img (4x4), <ve>, c, d, e] -> t = 0,1,2,3x16,7,8,9,10;
  delta = -12."""
  ids = np.array([[11, 12] + image_block((1, 8, 8)) + [13, 14, 15]])
  pos, delta = qvl.get_rope_index(ids, np.array([[1, 8, 8]]), image_token_id=IMAGE)
  np.testing.assert_array_equal(pos[0, 0], [0, 1, 2] + [3] * 16 + [7, 8, 9, 10])
  np.testing.assert_array_equal(pos[1, 0, 3:19], 3 + np.repeat(np.arange(4), 4))
  np.testing.assert_array_equal(pos[2, 0, 3:19], 3 + np.tile(np.arange(4), 4))
  assert delta.tolist() == [-12]


def test_advance_is_max_of_merged_sides_not_token_count():
  ids = np.array([[11] + image_block((1, 2, 12)) + [13]])  # merged 1 x 6: 6 tokens, advance 6
  pos, _ = qvl.get_rope_index(ids, np.array([[1, 2, 12]]), image_token_id=IMAGE)
  assert pos[0, 0, -2] == 7 + 1 and pos[0, 0, -1] == 2 + 6 + 1
  ids = np.array([[11] + image_block((1, 12, 4)) + [13]])  # merged 6 x 2: 12 tokens, advance 6
  pos, _ = qvl.get_rope_index(ids, np.array([[1, 12, 4]]), image_token_id=IMAGE)
  assert pos[0, 0, -1] == 2 + 6 + 1


@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_rope_index_matches_transformers_with_padding(data):
  model = _hf_model()
  b = data.draw(st.integers(1, 3))
  rows, grids = [], []
  for _ in range(b):
    toks = []
    for _ in range(data.draw(st.integers(0, 2))):
      g = (1, 2 * data.draw(st.integers(1, 4)), 2 * data.draw(st.integers(1, 4)))
      toks += data.draw(st.lists(st.integers(3, 200), max_size=3)) + image_block(g)
      grids.append(g)
    toks += data.draw(st.lists(st.integers(3, 200), min_size=1, max_size=4))
    rows.append(toks)
  left = data.draw(st.booleans())
  s = max(map(len, rows))
  ids = np.zeros((b, s), np.int64)
  mask = np.zeros((b, s), np.int64)
  for i, r in enumerate(rows):
    sl = slice(s - len(r), s) if left else slice(0, len(r))
    ids[i, sl], mask[i, sl] = r, 1
  pos, delta = qvl.get_rope_index(ids, np.array(grids).reshape(-1, 3), mask, image_token_id=IMAGE)
  if not grids:
    ref = np.cumsum(mask, -1) - 1
    np.testing.assert_array_equal(pos[:, mask == 1], np.broadcast_to(ref, pos.shape)[:, mask == 1])
    return
  ref_pos, ref_delta = model.model.get_rope_index(
    torch.tensor(ids),
    mm_token_type_ids=torch.tensor((ids == IMAGE).astype(np.int64)),
    image_grid_thw=torch.tensor(grids),
    attention_mask=torch.tensor(mask),
  )
  np.testing.assert_array_equal(pos[:, mask == 1], ref_pos.numpy()[:, mask == 1])
  np.testing.assert_array_equal(delta, ref_delta.numpy().reshape(-1))


_HF = {}


def _hf_model():
  if "m" not in _HF:
    from conftest import make_hf_model

    _HF["m"] = make_hf_model(tiny_config())
  return _HF["m"]


def test_placeholder_mismatch_is_an_error():
  ids = np.array([[11] + [VSTART] + [IMAGE] * 5 + [VEND]])
  with pytest.raises(ValueError, match="needs 6 consecutive"):
    qvl.get_rope_index(ids, np.array([[1, 4, 6]]), image_token_id=IMAGE)
  with pytest.raises(ValueError, match="more images"):
    qvl.get_rope_index(np.array([[11, 12]]), np.array([[1, 4, 6]]), image_token_id=IMAGE)
  with pytest.raises(ValueError, match="more <\\|image_pad\\|> tokens"):
    qvl.get_rope_index(ids, None, image_token_id=IMAGE)


def test_model_call_rejects_inconsistent_inputs(jax_model):
  ids = np.array([[11] + image_block((1, 4, 6)) + [12]])
  pv = np.zeros((24, 1176), np.float32)
  with pytest.raises(ValueError, match="no pixel_values"):
    jax_model(ids)
  with pytest.raises(ValueError, match="pixel_values shape"):
    jax_model(ids, pixel_values=pv[:20], image_grid_thw=np.array([[1, 4, 6]]))
  with pytest.raises(ValueError, match="6 <\\|image_pad\\|> tokens but the images give 12"):
    jax_model(ids, pixel_values=np.zeros((48, 1176), np.float32), image_grid_thw=np.array([[1, 6, 8]]))
  with pytest.raises(ValueError, match="outside the vocabulary"):
    jax_model(np.array([[11, 9999]]))
