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

from deepeyes_jax.agent import protocol
from deepeyes_jax.agent.rollout import AgentConfig, run_rollouts
from deepeyes_jax.data import synthetic as syn
from deepeyes_jax.data.deepeyes import decode_example
from deepeyes_jax.data.pipeline import make_train_iterator
from deepeyes_jax.processing import image as improc
from deepeyes_jax.rl import rewards, warmstart
from deepeyes_jax.rl.trainer import example_to_task

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
  cfg = syn.SceneConfig()
  for i in range(20):
    s = syn.make_scene(i, config=cfg)
    w, h = s.image.size
    assert w == h and cfg.min_size <= w <= cfg.max_size
    assert cfg.min_objects <= len(s.objects) <= cfg.max_objects
    assert len({o.color for o in s.objects}) == len(s.objects)  # the colour names the target unambiguously
    assert len({o.cell for o in s.objects}) == len(s.objects)
    t = s.objects[s.target]
    assert f"{t.color} {t.shape}" in s.question and s.answer == t.digit
    x1, y1, x2, y2 = s.cell_box()
    assert x1 <= t.box[0] and y1 <= t.box[1] and t.box[2] <= x2 + 1 and t.box[3] <= y2 + 1  # object in its cell
    # The digit plate: black strokes on white at the object's centre (the answer-bearing detail is drawn).
    cx, cy = (t.box[0] + t.box[2]) // 2, (t.box[1] + t.box[3]) // 2
    patch = np.asarray(s.image.crop((cx - 40, cy - 40, cx + 40, cy + 40))).min(-1)
    assert (patch < 30).any() and (patch > 235).any()


def test_global_view_is_six_by_six_tokens_and_a_cell_crop_magnifies():
  for i in range(5):
    s = syn.make_scene(i)
    _, grid = improc.preprocess(s.image, max_pixels=syn.GLOBAL_MAX_PIXELS)
    assert grid.tolist() == [1, 12, 12]  # 168 x 168 px: one merged token per cell
    x1, y1, x2, y2 = s.cell_box()
    crop = s.image.crop((round(x1), round(y1), round(x2), round(y2)))
    rh, rw = improc.smart_resize(crop.size[1], crop.size[0], max_pixels=syn.GLOBAL_MAX_PIXELS)
    # The digit is ~0.12 cell: ~3.4 px in the global view, >= 15 px in the crop.
    cfg = syn.SceneConfig()
    global_cell_px = grid[1] * 14 / cfg.grid  # one cell of the global view the model sees
    assert rh * cfg.digit_scale >= 15 and global_cell_px * cfg.digit_scale < 4


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
  bad = f"<think>x</think>\n<answer>{(int(scene.answer) + 1) % 10}</answer><|im_end|>"
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
def test_demonstrator_zoom_box_covers_the_target_through_the_real_protocol():
  src = syn.SyntheticSource(30)
  agent = _agent()
  for i in range(30):
    ex = decode_example(src[i], i, source_name="s")
    _, turns = warmstart.synthetic_demonstrator(ex, "zoom", agent_config=agent)
    seen = syn.seen_size(ex.images[0].size, min_pixels=agent.min_pixels, max_pixels=agent.max_pixels)
    out = protocol.execute_turn(turns[0].replace("<|im_end|>", ""), ex.images[0], frame="resized", seen_size=seen)
    assert out.kind == "tool" and out.tool_call.status == "ok", out
    x1, y1, x2, y2 = out.tool_call.bbox
    tb = json.loads(ex.extra["extra_info"]["target_box"])
    assert x1 <= tb[0] + 1 and y1 <= tb[1] + 1 and tb[2] <= x2 + 1 and tb[3] <= y2 + 1
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


def test_host_demonstrations_equal_scripted_rollouts_of_the_real_agent(tiny_vlm):
  """`demonstrate` (host only, no model) builds exactly what the rollout engine builds for the same script."""
  from deepeyes_jax.models import qwen2_5_vl as qvl
  from deepeyes_jax.sampling.generate import load_tokenizer
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
  tasks = [example_to_task(e) if m != "no_tool" else syn_task_no_tool(e) for e, m in zip(examples, modes, strict=True)]
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


def syn_task_no_tool(example):
  import dataclasses

  t = example_to_task(example)
  return dataclasses.replace(t, messages_override=syn.no_tool_messages(example.images[0], example.question))


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


# --------------------------------------------------------------------------------------------------------------
# The embedded default, shortened (every stage runs; learning is not asserted)
# --------------------------------------------------------------------------------------------------------------
def _run(workdir, env_extra=None):
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1", **(env_extra or {}))
  cmd = [sys.executable, "-m", "deepeyes_jax.train", "--config", "configs/synthetic.py:variant=ci"]
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
  rows = [json.loads(line) for line in open(workdir / "metrics.jsonl")]
  warm = [r for r in rows if "train/nll" in r]
  rl = [r for r in rows if "reward/mean" in r]
  assert [r["step"] for r in warm] == [1, 2, 3, 4] and [r["step"] for r in rl] == [5, 6]
  assert all(np.isfinite(r["train/nll"]) for r in warm)
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
      assert m["step"] == step and m["num_questions"] == 4
      for key in ("accuracy", "tool_calls_per_question", "tool_success_rate", "mean_iou"):
        assert 0.0 <= m[key] <= (10.0 if key == "tool_calls_per_question" else 1.0)
      if mode == "no_tool":
        assert m["tool_calls_per_question"] <= 1.0  # one turn: at most one (never executed) call

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
  killed = _run(tmp_path, {"DEEPEYES_TEST_KILL_AT_STEP": "5"})
  assert killed.returncode == -9
  assert not (tmp_path / "final_eval.json").exists()
  resumed = _run(tmp_path)
  assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
  assert json.loads((tmp_path / "final_eval.json").read_text()) == json.loads((workdir / "final_eval.json").read_text())
