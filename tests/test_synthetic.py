"""The synthetic zoom task (data/synthetic.py), the scripted demonstrator and host-built demonstrations, the tiny
model builder, and the embedded default run end to end (configs/synthetic.py:variant=ci)."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from PIL import Image

from deepeyes_jax.agent import prompts, protocol
from deepeyes_jax.agent.rollout import AgentConfig, run_rollouts
from deepeyes_jax.data import synthetic as syn
from deepeyes_jax.data.deepeyes import decode_example
from deepeyes_jax.data.pipeline import make_train_iterator
from deepeyes_jax.eval.tasks import record_task
from deepeyes_jax.processing import image as improc
from deepeyes_jax.reward import rewards
from deepeyes_jax.rl import warmstart

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = syn.SceneConfig(min_size=336, max_size=448, clutter=20, decoys=4)


def _agent(**kw):
  base = dict(
    max_turns=3,
    max_tokens_per_turn=96,
    max_total_tokens=768,
    max_images=3,
    coordinate_frame="resized",
    min_pixels=4 * 28 * 28,
    max_pixels=syn.GLOBAL_MAX_PIXELS,
  )
  return AgentConfig(**{**base, **kw})


# --------------------------------------------------------------------------------------------------------------
# Scenes
# --------------------------------------------------------------------------------------------------------------
def test_scenes_are_deterministic_per_seed_split_and_index():
  a, b = syn.make_scene(3, seed=1), syn.make_scene(3, seed=1)
  assert np.array_equal(np.asarray(a.image), np.asarray(b.image))
  assert (a.question, a.answer, a.target_box) == (b.question, b.answer, b.target_box)
  others = [syn.make_scene(3, seed=2), syn.make_scene(4, seed=1), syn.make_scene(3, seed=1, split="test")]
  for o in others:
    assert not np.array_equal(np.asarray(a.image.resize((64, 64))), np.asarray(o.image.resize((64, 64))))


def test_scene_layout_and_question():
  """The default: textured plates on coloured objects, one per cell; the question names the target's cell."""
  cfg = syn.SceneConfig()
  for i in range(12):
    s = syn.make_scene(i, config=cfg)
    w, h = s.image.size
    assert w == h and cfg.min_size <= w <= cfg.max_size
    assert cfg.min_objects <= len(s.objects) <= cfg.max_objects
    assert len({o.color for o in s.objects}) == len(s.objects)
    assert len({o.cell for o in s.objects}) == len(s.objects)
    t = s.objects[s.target]
    assert s.question.rstrip("?.").endswith(f"in the {syn.cell_name(t.cell, cfg.grid)}")
    assert s.answer == t.label and s.answer in syn.CHECK_COLORS
    x1, y1, x2, y2 = s.cell_box()
    assert x1 <= t.box[0] and y1 <= t.box[1] and t.box[2] <= x2 + 1 and t.box[3] <= y2 + 1  # object in its cell
    # The plate at the object's centre: the answer's colour and its complement, half each, nothing else.
    cx, cy = (t.box[0] + t.box[2]) // 2, (t.box[1] + t.box[3]) // 2
    r = round(0.2 * w / cfg.grid)
    px = np.asarray(s.image.crop((cx - r, cy - r, cx + r, cy + r))).reshape(-1, 3).astype(int)
    a = np.array(syn.CHECK_COLORS[s.answer])
    is_a, is_c = (px == a).all(1), (px == 255 - a).all(1)
    assert (is_a | is_c).all() and abs(is_a.mean() - 0.5) < 0.05
  assert syn.cell_name((0, 0), 3) == "top left cell" and syn.cell_name((2, 1), 3) == "middle right cell"
  assert syn.cell_name((1, 2), 4) == "row 3, column 2 cell"


def test_named_targets_and_dot_details():
  """target_by="name": "the red circle" (the model has to find it); detail="dot": a dot of the answer's colour."""
  cfg = syn.SceneConfig(detail="dot", target_by="name", min_size=768, zoom_inset=0.0)
  for i in range(10):
    s = syn.make_scene(i, config=cfg)
    t = s.objects[s.target]
    assert s.question.rstrip("?.").endswith(f"on the {t.color} {t.shape}")
    assert s.answer == t.label and s.answer in syn.BADGE_COLORS
    assert syn.target_name(syn.scene_record(s, cfg)["extra_info"]) == f"{t.color} {t.shape}"
    assert syn.target_name({"question": s.question}) == f"{t.color} {t.shape}"  # records without "target"
    cx, cy = (t.box[0] + t.box[2]) // 2, (t.box[1] + t.box[3]) // 2
    patch = np.asarray(s.image.crop((cx - 40, cy - 40, cx + 40, cy + 40))).astype(int)
    assert (patch.min(-1) > 235).any()
    assert np.abs(patch[40, 40] - np.array(syn.BADGE_COLORS[s.answer])).max() <= 20  # speckle-free: drawn over it
  for bad in (dict(target_by="colour"), dict(detail="stripes"), dict(plate_scale=1.2), dict(texture_unit=0)):
    with pytest.raises(ValueError, match=next(iter(bad))):
      syn.SceneConfig(**bad)


def _orientation_energy(a: np.ndarray) -> np.ndarray:
  """Mean squared differences along x, y, the main and the anti diagonal, normalised to sum 1."""
  a = a.astype(float).mean(-1)
  e = np.array(
    [
      (np.diff(a, axis=1)[:-1] ** 2).mean(),
      (np.diff(a, axis=0)[:, :-1] ** 2).mean(),
      ((a[1:, 1:] - a[:-1, :-1]) ** 2).mean(),
      ((a[1:, :-1] - a[:-1, 1:]) ** 2).mean(),
    ]
  )
  return e / e.sum()


def test_strokes_run_one_way_in_a_crop_and_average_out_in_the_global_view():
  """detail="strokes": in the demonstrator's crop (the plate at the original resolution) the strokes' direction
  dominates the image's gradients; in the 8-9x smaller global view the same plate is a gray with nearly isotropic
  noise and the same mean for every answer."""
  cfg = syn.SceneConfig(detail="strokes", texture_unit=0.75)
  size = 1440
  side, unit = cfg.plate_scale * size / cfg.grid, cfg.texture_unit * size / 168
  along = {"horizontal": 0, "vertical": 1, "rising": 3, "falling": 2}  # the energy index the strokes run along
  across = {"horizontal": 1, "vertical": 0, "rising": 2, "falling": 3}
  means = {}
  for kind in syn.STROKES:
    crop_e, global_e, means[kind] = [], [], []
    for seed in range(6):
      img = Image.new("RGB", (size, size), (140, 140, 140))
      syn._strokes(np.random.default_rng(seed), img, size / 2, size / 2, side, unit, kind)
      view = np.asarray(img.resize((168, 168), Image.Resampling.BICUBIC))
      h = int(side * 168 / size / 2) - 2
      global_e.append(_orientation_energy(view[84 - h : 84 + h, 84 - h : 84 + h]))
      means[kind].append(view[84 - h : 84 + h, 84 - h : 84 + h].mean())
      q = size / cfg.grid * (0.5 - cfg.zoom_inset)  # the demonstrator's box: the central third of the cell
      crop = img.crop((round(size / 2 - q), round(size / 2 - q), round(size / 2 + q), round(size / 2 + q)))
      rh, rw = improc.smart_resize(crop.size[1], crop.size[0], max_pixels=syn.GLOBAL_MAX_PIXELS)
      assert rw >= 0.9 * crop.size[0]  # shown at about the original resolution
      crop_e.append(_orientation_energy(np.asarray(crop.resize((rw, rh), Image.Resampling.BICUBIC))))
    crop_e, global_e = np.mean(crop_e, 0), np.mean(global_e, 0)
    if kind in along:
      assert crop_e[along[kind]] < 0.4 * crop_e[across[kind]], (kind, crop_e)
      assert global_e[along[kind]] > 0.8 * global_e[across[kind]], (kind, global_e)
    else:  # dotted: square specks, no direction either way
      assert abs(crop_e[0] - crop_e[1]) < 0.02 and abs(crop_e[2] - crop_e[3]) < 0.02, crop_e
  m = [np.mean(v) for v in means.values()]
  assert max(m) - min(m) < 6, means  # the same gray for every answer
  scene = syn.make_scene(0, config=cfg)
  assert scene.answer in syn.STROKES and "strokes" in scene.question


def test_checks_are_one_gray_in_the_global_view_and_two_colours_in_a_crop():
  """Why the default task needs the zoom: the global view (the real preprocessing) of every target plate is the same
  flat gray, within a gray level, whatever the answer; the demonstrator's crop (the real zoom tool) shows the
  answer's colour and its complement at full contrast. No complement is an answer, so the pair names the answer."""
  cfg = syn.SceneConfig(decoys=0, clutter=0)
  seen_means = []
  for i in range(12):
    s = syn.make_scene(i, config=cfg)
    size = s.image.size[0]
    view = np.asarray(s.image.resize((168, 168), Image.Resampling.BICUBIC)).astype(float)  # = improc.preprocess
    t = s.objects[s.target]
    cx, cy = ((t.box[0] + t.box[2]) / 2) * 168 / size, ((t.box[1] + t.box[3]) / 2) * 168 / size
    h = cfg.plate_scale * 168 / cfg.grid / 2 - 2  # inside the plate, clear of its edges
    plate = view[round(cy - h) : round(cy + h), round(cx - h) : round(cx + h)].reshape(-1, 3)
    assert plate.std(0).max() < 2.0, plate.std(0)
    seen_means.append(plate.mean(0))
    info = syn.scene_record(s, cfg)["extra_info"]
    crop, _, turns = syn.reading(s.image, info, (168, 168))
    rh, rw = improc.smart_resize(crop.size[1], crop.size[0], max_pixels=syn.GLOBAL_MAX_PIXELS)
    shown = np.asarray(crop.resize((rw, rh), Image.Resampling.BICUBIC)).reshape(-1, 3).astype(float)
    a = np.array(syn.CHECK_COLORS[s.answer], float)
    d = (shown - 127.5) @ (a - 127.5) / np.linalg.norm(a - 127.5)  # along the answer's colour axis
    assert d.std() > 100 and abs(d.mean()) < 15, (d.std(), d.mean())
    assert turns == [f"{s.answer}<|im_end|>"]
  assert np.ptp(np.array(seen_means), 0).max() < 2.0  # the same gray for every answer
  complements = {tuple(int(255 - x) for x in v) for v in syn.CHECK_COLORS.values()}
  assert not set(syn.CHECK_COLORS.values()) & complements


def test_digit_and_badge_details():
  digit = syn.make_scene(1, config=syn.SceneConfig(detail="digit"))
  t = digit.objects[digit.target]
  assert digit.answer == t.label and digit.answer.isdigit()
  assert digit.question.startswith(("What digit", "Which", "Read"))
  cx, cy = (t.box[0] + t.box[2]) // 2, (t.box[1] + t.box[3]) // 2
  patch = np.asarray(digit.image.crop((cx - 40, cy - 40, cx + 40, cy + 40))).min(-1)
  assert (patch < 30).any() and (patch > 235).any()  # black strokes on a white plate
  # A badge: the dot in a ring of its complement. Shrunk to the global view it is a gray blob, unlike a plain dot.
  cfg = syn.SceneConfig(detail="badge", clutter=0, decoys=0, detail_scale=0.2)
  s = syn.make_scene(2, config=cfg)
  t = s.objects[s.target]
  cx, cy = (t.box[0] + t.box[2]) // 2, (t.box[1] + t.box[3]) // 2
  h = cfg.detail_scale * s.image.size[0] / cfg.grid
  ring = np.asarray(s.image)[cy, round(cx + 0.45 * h)].astype(int)  # between the dot's and the ring's radii
  assert np.abs(ring - (255 - np.array(syn.BADGE_COLORS[s.answer]))).max() <= 20
  mean = np.asarray(s.image.crop((round(cx - h / 2), round(cy - h / 2), round(cx + h / 2), round(cy + h / 2))))
  inside = mean.reshape(-1, 3)[np.linalg.norm(mean.reshape(-1, 3) - 245, axis=1) > 60].mean(0)  # not the plate
  assert np.ptp(inside) < 40  # dot + ring average to a gray


def test_global_view_is_six_by_six_tokens_and_the_zoom_magnifies_about_eightfold():
  cfg = syn.SceneConfig()
  for i in range(5):
    s = syn.make_scene(i)
    _, grid = improc.preprocess(s.image, max_pixels=syn.GLOBAL_MAX_PIXELS)
    assert grid.tolist() == [1, 12, 12]  # 168 x 168 px: 6 x 6 merged tokens, 2 x 2 per cell of the 3 x 3 grid
    info = syn.scene_record(s)["extra_info"]
    x1, y1, x2, y2 = syn.cell_box_seen(info, (168, 168))  # the demonstrator's box, in the global view's pixels
    call = json.dumps({"name": "image_zoom_in_tool", "arguments": {"bbox_2d": [x1, y1, x2, y2]}})
    out = protocol.execute_turn(f"<tool_call>\n{call}\n</tool_call>", s.image, frame="resized", seen_size=(168, 168))
    rh, rw = improc.smart_resize(out.crop.size[1], out.crop.size[0], max_pixels=syn.GLOBAL_MAX_PIXELS)
    assert rw / (x2 - x1) >= 7.5  # crop pixels per global-view pixel
    # A tile of the checks: under half a pixel of the global view, >= 2.5 px of the crop.
    assert cfg.texture_unit < 0.5 and cfg.texture_unit * rw / (x2 - x1) >= 2.5


def test_background_says_which_cell_a_pixel_is_in():
  """ "cells": the red level grows with the column and the blue level with the row, one level per cell."""
  cfg = syn.SceneConfig(clutter=0, decoys=0, min_objects=1, max_objects=1)
  s = syn.make_scene(0, config=cfg)
  img = np.asarray(s.image).astype(int)
  size, g = s.image.size[0], cfg.grid
  med = np.zeros((g, g, 3))
  for r in range(g):
    for c in range(g):
      y0, x0 = r * size // g, c * size // g
      med[r, c] = np.median(img[y0 + 2 : y0 + 12, x0 + 2 : x0 + 12].reshape(-1, 3), 0)  # a corner: background
  assert (np.diff(med[..., 0], axis=1) > 25).all() and (np.abs(np.diff(med[..., 0], axis=0)) < 8).all()
  assert (np.diff(med[..., 2], axis=0) > 25).all() and (np.abs(np.diff(med[..., 2], axis=1)) < 8).all()
  with pytest.raises(ValueError, match="background"):
    syn.SceneConfig(background="stripes")
  with pytest.raises(ValueError, match="object_jitter"):
    syn.SceneConfig(object_jitter=2.0)


def test_records_decode_and_score_with_the_visual_reward():
  src = syn.SyntheticSource(5, seed=0)
  ex = decode_example(src[2], 2, source_name="synthetic")
  scene = syn.make_scene(2)
  assert ex.ground_truth == scene.answer and ex.question == scene.question
  assert ex.data_source == syn.DATA_SOURCE and ex.multi_turn
  assert json.loads(ex.extra["extra_info"]["target_box"]) == list(scene.target_box)
  user = ex.messages[1]["content"]
  assert user[0]["type"] == "image" and user[1]["text"].endswith(syn.prompts.USER_SUFFIX)
  good = f"<think>x</think>\n<answer>{scene.answer}</answer><|im_end|>"
  other = next(c for c in syn.BADGE_COLORS if c != scene.answer)
  bad = f"<think>x</think>\n<answer>{other}</answer><|im_end|>"
  r_good = rewards.compute_reward(syn.DATA_SOURCE, good, scene.answer, num_successful_tool_calls=1)
  r_bad = rewards.compute_reward(syn.DATA_SOURCE, bad, scene.answer, num_successful_tool_calls=1)
  assert (r_good.total, r_bad.total) == (pytest.approx(2.0), 0.0)  # 0.8 acc + 1.2 conditional tool bonus
  with pytest.raises(IndexError):
    src[5]


def test_source_feeds_the_grain_pipeline():
  it, stats = make_train_iterator(syn.SyntheticSource(50, config=SMALL), seed=0, batch_size=4)
  batch = next(it)
  assert len(batch) == 4 and stats.skipped == 0
  assert all(e.data_source == syn.DATA_SOURCE for e in batch)


# --------------------------------------------------------------------------------------------------------------
# Demonstrator and demonstrations
# --------------------------------------------------------------------------------------------------------------
def test_demonstrator_zoom_box_lies_on_the_target_plate_through_the_real_protocol():
  src = syn.SyntheticSource(30)
  agent = _agent()
  for i in range(30):
    ex = decode_example(src[i], i, source_name="s")
    _, turns = warmstart.synthetic_demonstrator(ex, "zoom", agent_config=agent)
    seen = syn.seen_size(ex.images[0].size, min_pixels=agent.min_pixels, max_pixels=agent.max_pixels)
    out = protocol.execute_turn(turns[0].replace("<|im_end|>", ""), ex.images[0], frame="resized", seen_size=seen)
    assert out.kind == "tool" and out.tool_call.status == "ok", out
    # The box is the central third of the target's cell: inside the target's textured plate (the crop is all
    # strokes and paper).
    x1, y1, x2, y2 = out.tool_call.bbox
    tb = json.loads(ex.extra["extra_info"]["target_box"])
    cx, cy = (tb[0] + tb[2]) / 2, (tb[1] + tb[3]) / 2
    half = syn.SceneConfig().plate_scale * ex.images[0].size[0] / 3 / 2
    assert cx - half <= x1 + 1 and cy - half <= y1 + 1 and x2 <= cx + half + 1 and y2 <= cy + half + 1
    a = np.array(syn.CHECK_COLORS[ex.ground_truth])
    px = np.asarray(out.crop).reshape(-1, 3).astype(int)
    assert ((px == a).all(1) | (px == 255 - a).all(1)).all()
    assert protocol.execute_turn(turns[1], ex.images[0]).answer == ex.ground_truth


def test_draw_modes_fractions_and_reproducibility():
  uids = [f"u{i}" for i in range(4000)]
  modes = warmstart.draw_modes(uids, 7, zoom_fraction=0.35, no_tool_fraction=0.2)
  assert modes == warmstart.draw_modes(uids, 7, zoom_fraction=0.35, no_tool_fraction=0.2)
  assert modes != warmstart.draw_modes(uids, 8, zoom_fraction=0.35, no_tool_fraction=0.2)
  f = {m: modes.count(m) / len(modes) for m in warmstart.MODES}
  assert f["no_tool"] == pytest.approx(0.2, abs=0.03)
  assert f["zoom"] == pytest.approx(0.8 * 0.35, abs=0.03)
  with pytest.raises(ValueError, match="fractions"):
    warmstart.draw_modes(uids, 0, zoom_fraction=1.5, no_tool_fraction=0)


def test_draw_modes_with_perception_exercises():
  uids = [f"u{i}" for i in range(4000)]
  kw = dict(zoom_fraction=0.4, no_tool_fraction=0.1, ground_fraction=0.25, read_fraction=0.15)
  modes = warmstart.draw_modes(uids, 3, **kw)
  f = {m: modes.count(m) / len(modes) for m in warmstart.MODES}
  for mode, want in (("no_tool", 0.1), ("ground", 0.25), ("read", 0.15), ("zoom", 0.5 * 0.4), ("direct", 0.5 * 0.6)):
    assert f[mode] == pytest.approx(want, abs=0.03), mode
  with pytest.raises(ValueError, match="no_tool \\+ ground \\+ read <= 1"):
    warmstart.draw_modes(uids, 0, zoom_fraction=0.5, no_tool_fraction=0.5, ground_fraction=0.4, read_fraction=0.2)


def test_perception_exercises_match_what_the_zoom_tool_does():
  """ "ground" answers with the box the demonstrator zooms on; "read" shows exactly the crop the zoom tool cuts for
  that box (through the real protocol), with the target's digit as the answer."""
  src = syn.SyntheticSource(8)
  agent = _agent()
  for i in range(8):
    ex = decode_example(src[i], i, source_name="s")
    info = ex.extra["extra_info"]
    seen = syn.seen_size(ex.images[0].size, min_pixels=agent.min_pixels, max_pixels=agent.max_pixels)
    msgs, turns = warmstart.synthetic_demonstrator(ex, "ground", agent_config=agent)
    assert msgs[1]["content"][1]["text"] == "\n" + syn.GROUND_QUESTION.format(target=syn.target_name(info))
    assert json.loads(turns[0].removesuffix("<|im_end|>"))["bbox_2d"] == syn.cell_box_seen(info, seen)
    _, zoom_turns = warmstart.synthetic_demonstrator(ex, "zoom", agent_config=agent)
    out = protocol.execute_turn(zoom_turns[0].replace("<|im_end|>", ""), ex.images[0], frame="resized", seen_size=seen)
    msgs, turns, crop = warmstart.synthetic_demonstrator(ex, "read", agent_config=agent)
    assert msgs[1]["content"][0]["image"] is crop and turns == [f"{ex.ground_truth}<|im_end|>"]
    assert np.array_equal(np.asarray(crop), np.asarray(out.crop))


def test_host_demonstrations_equal_scripted_rollouts_of_the_real_agent(tiny_vlm):
  """`demonstrate` (host only, no model) builds exactly what the rollout engine builds for the same script."""
  from deepeyes_jax.models import qwen2_5_vl as qvl
  from deepeyes_jax.processing.tokenizer import load_tokenizer
  from deepeyes_jax.sampling.sampler import Sampler

  path, _, cfg = tiny_vlm
  tok = load_tokenizer(str(path))
  src = syn.SyntheticSource(6, config=SMALL)
  examples = [decode_example(src[i], i, source_name="s") for i in range(3)]
  agent = _agent()
  modes = ["zoom", "direct", "no_tool"]
  demo_fn = warmstart.get_demonstrator("synthetic")
  scripts = [demo_fn(e, m, agent_config=agent)[1] for e, m in zip(examples, modes)]
  demos = warmstart.demonstrations(
    examples, modes, demonstrator="synthetic", tokenizer=tok, agent_config=agent, model_config=cfg
  )
  sampler = Sampler(qvl.from_pretrained(str(path), dtype=jax.numpy.float32))
  tasks = [record_task(e) if m != "no_tool" else syn_task_no_tool(e) for e, m in zip(examples, modes, strict=True)]
  rolled = run_rollouts(sampler, tok, tasks, config=agent, scripted_turns=scripts)
  assert [d.num_successful_tool_calls for d in demos] == [1, 0, 0]
  for d, r in zip(demos, rolled, strict=True):
    assert np.array_equal(d.token_ids, r.token_ids)
    assert np.array_equal(d.action_mask, r.action_mask)
    assert np.array_equal(d.position_ids, r.position_ids)
    assert np.array_equal(d.grids, r.grids)
    assert (d.answer, d.stop_reason) == (r.answer, r.stop_reason)
    assert [t.bbox for t in d.tool_calls] == [t.bbox for t in r.tool_calls]
    assert not d.logprobs.any()  # no model ran


def test_skill_accuracy_counts_content_tokens_only(tiny_vlm):
  """The warm-start probe: a demonstration counts as right when every content token (box digits, the answer) is
  predicted; a wrong format token does not matter, one wrong digit does."""
  from deepeyes_jax.processing.tokenizer import load_tokenizer
  from deepeyes_jax.rl.packing import minibatches

  path, _, cfg = tiny_vlm
  tok = load_tokenizer(str(path))
  src = syn.SyntheticSource(4, config=SMALL)
  examples = [decode_example(src[i], i, source_name="s") for i in range(4)]
  agent = _agent()
  trajs = warmstart.demonstrations(
    examples, ["ground"] * 4, demonstrator="synthetic", tokenizer=tok, agent_config=agent, model_config=cfg
  )
  import ml_collections

  config = ml_collections.ConfigDict({"rl": {"min_row_len": 256, "micro_batch_rows": 8, "num_minibatches": 1}})
  config.rl.old_logprobs = "sampler"

  class _NoMesh:
    mesh = None

  packed = minibatches(trajs, np.zeros(4, np.float32), config.rl, cfg.vision, _NoMesh())[0]
  content = warmstart.content_token_ids(tok, [e.ground_truth for e in examples])

  class Oracle:  # predicts the next token exactly, except where told
    def __init__(self, corrupt):
      self.corrupt = corrupt

    def predict(self, mb):
      pred = np.concatenate([mb.tokens[:, 1:], mb.tokens[:, :1]], 1).copy()
      for r, t in self.corrupt(mb):
        pred[r, t - 1] = (pred[r, t - 1] + 1) % 600
      return pred

  def positions(mb, want_content):
    target, action = mb.tokens[:, 1:], mb.loss_mask[:, 1:] > 0
    sel = action & (np.isin(target, content) == want_content)
    r, t = np.nonzero(sel)
    return r, t + 1

  # Answers count inside "<answer>...</answer>" too, where a byte-level BPE may merge the tag's ">" into the label;
  # a lone ">" is format.
  for label in syn.CHECK_COLORS:
    ids = tok(f"<answer>{label}</answer>", add_special_tokens=False)["input_ids"]
    assert np.isin(ids, warmstart.content_token_ids(tok, [label])).any(), label
  assert tok.convert_tokens_to_ids(">") not in warmstart.content_token_ids(tok, list(syn.CHECK_COLORS))
  assert warmstart.skill_accuracy(Oracle(lambda mb: []), {"ground": packed}, content) == {"ground": 1.0}
  fmt = lambda mb: list(zip(*positions(mb, False)))  # every format token wrong: still all right
  assert warmstart.skill_accuracy(Oracle(fmt), {"ground": packed}, content) == {"ground": 1.0}
  one = lambda mb: [next(zip(*positions(mb, True)))] if mb is packed[0] else []  # one digit of one example
  assert warmstart.skill_accuracy(Oracle(one), {"ground": packed}, content) == {"ground": 0.75}


def syn_task_no_tool(example):
  import dataclasses

  t = record_task(example)
  return dataclasses.replace(t, messages_override=prompts.no_tool_messages(example.images[0], example.question))


def test_tiny_checkpoint_loads_through_transformers_and_our_loader(tmp_path):
  from transformers import AutoConfig, AutoTokenizer

  from deepeyes_jax.models import qwen2_5_vl as qvl
  from deepeyes_jax.models.qwen2_5_vl.tiny import build_tiny_checkpoint

  cfg = build_tiny_checkpoint(tmp_path / "m", vocab_size=600, corpus=syn.corpus(50), hidden_size=64, num_layers=2)
  tok = AutoTokenizer.from_pretrained(tmp_path / "m")
  assert tok.convert_tokens_to_ids("<|image_pad|>") == cfg.image_token_id
  assert tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False).startswith("<|im_start|>")
  assert AutoConfig.from_pretrained(tmp_path / "m").model_type == "qwen2_5_vl"
  model = qvl.from_pretrained(tmp_path / "m", dtype=jax.numpy.float32)
  assert qvl.param_count(model) > 0 and model.config.text.vocab_size == 622
  # The task's texts are what the BPE merges were trained on: a demonstration is short.
  demo = syn.demonstration(
    {"question": "What digit is on the red circle?", "answer": "7", "target_cell": "[2, 3]", "grid": 6},
    (168, 168),
    zoom=True,
  )
  assert len(tok(demo[0], add_special_tokens=False)["input_ids"]) < 60


def test_fan_in_init_scales_kernels_by_fan_in():
  from flax import nnx

  from deepeyes_jax.models.qwen2_5_vl.model import init_random
  from deepeyes_jax.models.qwen2_5_vl.tiny import fan_in_init, tiny_config

  model = fan_in_init(init_random(tiny_config(vocab_size=300)), seed=1)
  seen = set()
  for path, x in jax.tree_util.tree_leaves_with_path(nnx.state(model, nnx.Param)):
    key = jax.tree_util.keystr(path)
    x = np.asarray(x)
    if "'weight'" in key and x.size >= 4096:  # a Linear's (out, in): fan-in is the last axis
      assert x.std() == pytest.approx(x.shape[-1] ** -0.5, rel=0.1), key
      seen.add("weight")
    elif "kernel" in key and x.size >= 4096:  # the vision qkv einsum (in, 3, out)
      assert x.std() == pytest.approx(x.shape[0] ** -0.5, rel=0.1), key
      seen.add("kernel")
    elif "bias" in key:
      assert not x.any(), key
      seen.add("bias")
    elif "embedding" in key:
      assert x.std() == pytest.approx(1.0, rel=0.05)
      seen.add("embedding")
    elif "scale" in key:
      assert (x == 1).all(), key  # norm scales untouched
      seen.add("scale")
  assert seen == {"weight", "kernel", "bias", "embedding", "scale"}
  again = fan_in_init(init_random(tiny_config(vocab_size=300)), seed=1)
  a, b = nnx.state(model, nnx.Param), nnx.state(again, nnx.Param)
  assert all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))  # deterministic


# --------------------------------------------------------------------------------------------------------------
# The embedded default, shortened (every stage runs; learning is not asserted)
# --------------------------------------------------------------------------------------------------------------
def _run(workdir, kill=None):
  """The train CLI on the ci variant; ``kill``: a tests/kill_hooks.py point to SIGKILL it at."""
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1")
  launcher = [os.path.join(ROOT, "tests", "kill_hooks.py"), kill] if kill else ["-m"]
  cmd = [sys.executable, *launcher, "deepeyes_jax.train", "--config", "configs/synthetic.py:variant=ci"]
  return subprocess.run(
    cmd + ["--workdir", str(workdir)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
  )


@pytest.fixture(scope="module")
def ci_run(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("synthetic_ci")
  proc = _run(workdir)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  return workdir, proc


def test_ci_run_writes_every_artefact(ci_run):
  workdir, proc = ci_run
  out = proc.stdout
  assert "warm start" in out and "ETA" in out and "held-out evaluation" in out
  assert "| skills: ground " in out  # the probes on the progress line (steps 2 and 4)
  rows = [json.loads(line) for line in open(workdir / "metrics.jsonl")]
  warm = [r for r in rows if "train/nll" in r]
  rl = [r for r in rows if "reward/mean" in r]
  assert [r["step"] for r in warm] == [1, 2, 3, 4] and [r["step"] for r in rl] == [5, 6]
  assert all(np.isfinite(r["train/nll"]) for r in warm)
  probed = [r for r in warm if "skills/ground" in r]
  assert [r["step"] for r in probed] == [2, 4]
  assert all(0.0 <= r[f"skills/{m}"] <= 1.0 for r in probed for m in ("ground", "read", "zoom"))
  # the per-reason counters of contained failures are logged every GRPO step (0 here: nothing failed)
  counters = ("data/skipped_records", "data/skipped_unknown_data_source", "data/skipped_image_size", "errors/rows")
  counters += ("errors/prompt_too_long", "errors/scoring", "reward/error", "reward/judge_unavailable")
  for key in counters:
    assert all(r[key] == 0 for r in rl), key
  for key in ("accuracy", "tool/calls_per_traj", "tool/success_rate", "train/loss"):
    assert all(key in r for r in rl), key
  assert any("eval/accuracy" in r for r in rows)
  assert list((workdir / "tensorboard").glob("events.out.tfevents.*"))
  steps = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
  assert 4 in steps and 6 in steps  # the warm-start checkpoint and the last one

  final = json.loads((workdir / "final_eval.json").read_text())
  assert final["num_questions"] == 4 and "rl_gain_points" in final
  for ckpt, step in (("warmstart", 4), ("final", 6)):
    for mode in ("tool", "no_tool"):
      m = final["checkpoints"][ckpt][mode]
      assert m["step"] == step and m["items"] == 4
      for key in ("accuracy", "tool_calls_per_traj", "tool_success_rate", "mean_iou"):
        assert 0.0 <= m[key] <= (10.0 if key == "tool_calls_per_traj" else 1.0)
      if mode == "no_tool":
        assert m["tool_calls_per_traj"] <= 1.0  # one turn: at most one (never executed) call

  html = (workdir / "report.html").read_text()
  assert "report.png" in html and "Held-out evaluation" in html
  with Image.open(workdir / "report.png") as im:
    assert im.format == "PNG" and im.size[0] > 600
  assert len(list((workdir / "report_trajectories").glob("trajectory_*.png"))) == 2
  assert (workdir / "base_model" / "tokenizer.json").exists()
  assert (workdir / "eval" / "final_trajectories" / "trajectories.jsonl").exists()


def test_ci_run_is_deterministic_and_resumes_to_the_same_result(ci_run, tmp_path):
  """Same seed, same machine -> the same final_eval.json, also for a run killed (SIGKILL) in its first GRPO
  step and restarted (it resumes from the warm-start checkpoint)."""
  workdir, _ = ci_run
  killed = _run(tmp_path, kill="rollouts=1")  # mid-way through the first GRPO step (step 5)
  assert killed.returncode == -9
  assert not (tmp_path / "final_eval.json").exists()
  resumed = _run(tmp_path)
  assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
  assert json.loads((tmp_path / "final_eval.json").read_text()) == json.loads((workdir / "final_eval.json").read_text())
