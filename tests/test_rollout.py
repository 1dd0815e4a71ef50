"""The batched zoom-agent rollout engine: token-exact trajectories, row independence, limits, serialisation, infer."""

import dataclasses
import logging
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from deepeyes_jax.agent import prompts
from deepeyes_jax.agent.rollout import AgentConfig, Task, run_rollouts
from deepeyes_jax.agent.trajectory import load_trajectories, save_trajectories
from deepeyes_jax.models import qwen2_5_vl as qvl
from deepeyes_jax.processing.tokenizer import load_tokenizer
from deepeyes_jax.sampling import rules
from deepeyes_jax.sampling.sampler import Sampler

SMALL = dict(min_pixels=4 * 28 * 28, max_pixels=48 * 28 * 28)
ZOOM = (
  "<think>look closer</think>\n<tool_call>\n"
  '{{"name": "image_zoom_in_tool", "arguments": {{"bbox_2d": {box}}}}}\n</tool_call><|im_end|>'
)
BAD_JSON = '<tool_call>\n{"name": "image_zoom_in_tool", "arguments": {"bbox_2d": [1, 2, 3}}\n</tool_call><|im_end|>'
ANSWER = "<think>done</think> <answer>B</answer><|im_end|>"


@pytest.fixture(scope="module")
def agent(tiny_vlm):
  path, _, _ = tiny_vlm
  return Sampler(qvl.from_pretrained(path, dtype=jnp.float32)), load_tokenizer(str(path))


def _image(seed, size=(300, 200)):
  rng = np.random.default_rng(seed)
  return Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))


def _task(tid, seed=0, size=(300, 200)):
  return Task(task_id=tid, image=_image(seed, size), user_text="What letter?" + prompts.USER_SUFFIX)


def _replay_logprobs(model, traj):
  """Log-probs of every token under a from-scratch forward over the finished trajectory."""
  pv = np.concatenate(traj.get_pixel_values())
  logits = model(
    traj.token_ids[None], pixel_values=pv, image_grid_thw=traj.grids, position_ids=traj.position_ids[:, None]
  )
  logp = jax.nn.log_softmax(logits[0].astype(jnp.float32), -1)
  return np.asarray(logp[np.arange(len(traj.token_ids) - 1), traj.token_ids[1:]])


def test_scripted_rollout_is_token_exact(tiny_vlm, agent):
  sampler, tok = agent
  scripts = [
    [ZOOM.format(box="[10, 20, 150, 120]"), BAD_JSON, ZOOM.format(box="[100, 50, 290, 190]"), ANSWER],
    [ANSWER],
  ]
  cfg = AgentConfig(sampling=rules.SamplingParams(1.0), max_total_tokens=2048, **SMALL)
  trajs = run_rollouts(sampler, tok, [_task("a", 1), _task("b", 2)], config=cfg, scripted_turns=scripts, seed=3)
  t0, t1 = trajs
  assert t0.stop_reason == "answer" and t0.answer == "B" and len(t0.turns) == 4
  assert [c.status for c in t0.tool_calls] == ["ok", "json_error", "ok"]
  assert t0.tool_calls[0].bbox == [10, 20, 150, 120] and len(t0.images) == 3
  assert t0.images[1].size == (140, 100)
  assert t1.stop_reason == "answer" and len(t1.turns) == 1 and len(t1.images) == 1
  # positions are those get_rope_index assigns over the whole sequence
  cfgm = sampler.config
  pos, _ = qvl.get_rope_index(t0.token_ids[None], t0.grids, image_token_id=cfgm.image_token_id)
  np.testing.assert_array_equal(pos[:, 0], t0.position_ids)
  # generated tokens decode back to the scripted text
  gen = [tok.decode(t0.token_ids[t0.action_mask == 1].tolist())]
  assert "".join(scripts[0]) == gen[0]
  model = qvl.from_pretrained(tiny_vlm[0], dtype=jnp.float32)
  for t in trajs:
    replay = _replay_logprobs(model, t)
    act = np.flatnonzero(t.action_mask)
    assert len(act) > 0
    np.testing.assert_allclose(t.logprobs[act], replay[act - 1], rtol=1e-5, atol=1e-5)
    assert np.all(t.logprobs[t.action_mask == 0] == 0)


def test_sampled_rollout_is_token_exact_and_rows_are_independent(tiny_vlm, agent):
  sampler, tok = agent
  cfg = AgentConfig(sampling=rules.SamplingParams(1.0), max_tokens_per_turn=24, max_total_tokens=1024, **SMALL)
  batch = run_rollouts(sampler, tok, [_task("x", 4), _task("y", 5)], group_size=2, config=cfg, seed=9)
  alone = run_rollouts(sampler, tok, [_task("y", 5)], group_size=2, config=cfg, seed=9)
  for a, b in zip(batch[2:], alone):
    np.testing.assert_array_equal(a.token_ids, b.token_ids)
    np.testing.assert_allclose(a.logprobs, b.logprobs, rtol=1e-5, atol=1e-6)
  assert not np.array_equal(batch[2].token_ids, batch[3].token_ids)  # the two samples of a group differ
  model = qvl.from_pretrained(tiny_vlm[0], dtype=jnp.float32)
  replay = _replay_logprobs(model, batch[0])
  act = np.flatnonzero(batch[0].action_mask)
  np.testing.assert_allclose(batch[0].logprobs[act], replay[act - 1], rtol=1e-5, atol=1e-5)


def test_chunked_rollout_does_not_depend_on_the_chunking(agent, caplog):
  sampler, tok = agent
  tasks = [_task("c0", 11), _task("c1", 12, size=(200, 300)), _task("c2", 13, size=(260, 260))]
  base = AgentConfig(sampling=rules.SamplingParams(1.0), max_tokens_per_turn=64, max_total_tokens=1024, **SMALL)
  # Some rows zoom in their first turn (forced), then sample: crops and extends run per chunk too.
  zoom = [ZOOM.format(box="[10, 20, 150, 120]")]
  scripts = [zoom, [], [], zoom, zoom, []]
  runs = {}
  for m in (0, 2, 3, 4):  # 3 rounds down to 1 group of 2 rows; 4 -> chunks of 4 + 2 rows
    cfg = dataclasses.replace(base, max_concurrent_rows=m, engine="lockstep")
    with caplog.at_level(logging.INFO, logger="deepeyes_jax.agent.rollout"):
      caplog.clear()
      runs[m] = run_rollouts(sampler, tok, tasks, group_size=2, config=cfg, seed=21, scripted_turns=scripts)
    chunk_lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("rollout chunk")]
    per_group = ["1/3: rows 0-1", "2/3: rows 2-3", "3/3: rows 4-5"]
    expected = {0: ["1/1: rows 0-5"], 2: per_group, 3: per_group, 4: ["1/2: rows 0-3", "2/2: rows 4-5"]}[m]
    assert chunk_lines == ["rollout chunk " + e for e in expected]
  ref = runs[0]
  assert [t.uid for t in ref] == [f"c{i}/{g}" for i in range(3) for g in range(2)]
  assert not np.array_equal(ref[1].token_ids, ref[2].token_ids)  # sampled, not greedy
  assert all(len(ref[r].turns) >= 2 and len(ref[r].images) == 2 for r in (0, 3, 4))  # sampled after the crop
  for m in (2, 3, 4):
    assert [t.uid for t in runs[m]] == [t.uid for t in ref]
    for a, b in zip(runs[m], ref):
      np.testing.assert_array_equal(a.token_ids, b.token_ids)
      np.testing.assert_array_equal(a.action_mask, b.action_mask)
      np.testing.assert_array_equal(a.position_ids, b.position_ids)
      np.testing.assert_allclose(a.logprobs, b.logprobs, rtol=1e-5, atol=1e-5)
      assert (a.stop_reason, a.answer, a.turns, a.tool_calls) == (b.stop_reason, b.answer, b.turns, b.tool_calls)


def test_chunked_rollout_reports_global_rows_to_on_turn(agent):
  sampler, tok = agent
  scripts = [
    [ZOOM.format(box="[10, 20, 150, 120]"), ANSWER],
    [ANSWER],
    [BAD_JSON, ANSWER],
    [ZOOM.format(box="[0, 0, 100, 100]"), ZOOM.format(box="[50, 50, 200, 150]"), ANSWER],
  ]
  tasks = [_task("o0", 1), _task("o1", 2)]
  seen = {}
  for m in (0, 2):
    calls = []
    cfg = AgentConfig(sampling=rules.GREEDY, max_total_tokens=2048, max_concurrent_rows=m, **SMALL)
    trajs = run_rollouts(
      sampler, tok, tasks, group_size=2, config=cfg, scripted_turns=scripts, on_turn=lambda *a: calls.append(a)
    )
    expected = [(r, n + 1) for r, s in enumerate(scripts) for n in range(len(s))]
    assert sorted((row, n) for row, n, _, _ in calls) == expected
    for row, n, turn, _ in calls:
      assert turn.text == scripts[row][n - 1]  # scripted_turns is indexed by global row
      assert trajs[row].turns[n - 1] == turn
    seen[m] = sorted((row, n, turn.text) for row, n, turn, _ in calls)
  assert seen[0] == seen[2]


def test_max_concurrent_rows_is_validated_and_read_from_configs():
  with pytest.raises(ValueError, match="max_concurrent_rows"):
    AgentConfig(max_concurrent_rows=-1)
  from deepeyes_jax.config_reference import ROOT, load_module
  from deepeyes_jax.run_setup import agent_config

  deepeyes_7b = load_module(ROOT / "configs" / "deepeyes_7b.py")

  assert agent_config(deepeyes_7b.get_config()).max_concurrent_rows == 512
  assert agent_config(deepeyes_7b.get_config()).page_size == 128
  assert agent_config(deepeyes_7b.get_config("size=tiny")).max_concurrent_rows == 0
  old = deepeyes_7b.get_config()
  for name in ("max_concurrent_rows", "engine", "page_size", "kv_pages", "segment_steps", "segment_release"):
    del old.rollout[name]  # a config written before the fields existed: the defaults
  defaults = dict(max_concurrent_rows=0, page_size=16, kv_pages=0, segment_steps=64)
  assert agent_config(old) == dataclasses.replace(agent_config(deepeyes_7b.get_config()), **defaults)
  bad_values = dict(engine="vllm", page_size=0, kv_pages=-1, segment_steps=0, segment_release=2)
  for bad in ({k: v} for k, v in bad_values.items()):
    with pytest.raises(ValueError, match=next(iter(bad))):
      AgentConfig(**bad)


@pytest.mark.parametrize(
  "script,limits,reason",
  [
    ([ZOOM.format(box="[0, 0, 100, 100]")] * 3, dict(max_turns=2), "max_turns"),
    ([ZOOM.format(box="[0, 0, 100, 100]")] * 3, dict(max_images=2), "max_images"),
    (["<think>" + "a b c " * 40], dict(max_tokens_per_turn=16), "turn_length"),
    ([ZOOM.format(box="[0, 0, 200, 200]")] * 3, dict(max_total_tokens=760), "max_sequence"),
    (["just text, no tags<|im_end|>"], {}, "no_tool_call"),
  ],
)
def test_limits_end_rows_with_a_reason(agent, script, limits, reason):
  sampler, tok = agent
  cfg = AgentConfig(sampling=rules.GREEDY, **{**dict(max_total_tokens=1024), **limits}, **SMALL)
  (t,) = run_rollouts(sampler, tok, [_task("lim", 7)], config=cfg, scripted_turns=[script])
  assert t.stop_reason == reason
  if reason in ("max_turns", "max_images"):
    assert t.tool_calls[-1].status == "not_executed"
    assert len(t.images) == 2  # the original + the one crop executed before the limit
  assert len(t.token_ids) <= cfg.max_total_tokens


def test_resized_coordinate_frame_maps_boxes_back(agent):
  sampler, tok = agent
  cfg = AgentConfig(sampling=rules.GREEDY, coordinate_frame="resized", max_total_tokens=1024, **SMALL)
  task = _task("big", 8, size=(1200, 800))  # seen at most 48*28*28 px: resized to 336x224
  (t,) = run_rollouts(sampler, tok, [task], config=cfg, scripted_turns=[[ZOOM.format(box="[28, 28, 112, 84]"), ANSWER]])
  sx, sy = 1200 / (t.grids[0][2] * 14), 800 / (t.grids[0][1] * 14)
  assert t.tool_calls[0].bbox == [round(28 * sx), round(28 * sy), round(112 * sx), round(84 * sy)]


def test_trajectories_round_trip_through_jsonl(tmp_path, agent):
  sampler, tok = agent
  cfg = AgentConfig(sampling=rules.GREEDY, max_total_tokens=1024, **SMALL)
  trajs = run_rollouts(
    sampler, tok, [_task("s/1", 1)], config=cfg, scripted_turns=[[ZOOM.format(box="[5, 5, 120, 90]"), ANSWER]]
  )
  save_trajectories(trajs, tmp_path)
  (back,) = load_trajectories(tmp_path)
  t = trajs[0]
  for f in ("token_ids", "action_mask", "logprobs", "position_ids", "grids"):
    np.testing.assert_array_equal(getattr(back, f), getattr(t, f))
  assert back.turns == t.turns and back.tool_calls == t.tool_calls and back.answer == t.answer
  for a, b in zip(back.get_pixel_values(), t.pixel_values):
    np.testing.assert_array_equal(a, b)
  (tmp_path / "bad").mkdir()
  (tmp_path / "bad" / "trajectories.jsonl").write_text("{not json\n")
  with pytest.raises(ValueError, match="trajectories.jsonl:1"):
    load_trajectories(tmp_path / "bad")


def test_infer_cli_end_to_end(tmp_path, tiny_vlm):
  path = tiny_vlm[0]
  _image(3, (320, 240)).save(tmp_path / "img.png")
  out = tmp_path / "out"
  cmd = [
    sys.executable,
    "-m",
    "deepeyes_jax.infer",
    f"--checkpoint={path}",
    f"--image={tmp_path / 'img.png'}",
    "--question=What is in the corner?",
    "--greedy",
    "--max_tokens_per_turn=12",
    "--max_total_tokens=1024",
    f"--max_pixels={48 * 28 * 28}",
    "--dtype=float32",
    f"--out={out}",
  ]
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
  res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
  assert res.returncode == 0, res.stderr[-3000:]
  assert "--- turn 1" in res.stdout and "answer:" in res.stdout
  with Image.open(out / "zooms.png") as im:
    assert im.size[0] >= 320 * 480 // 240
  page = (out / "trajectory.html").read_text()
  assert "Turn 1" in page and "data:image/png;base64," in page
  (t,) = load_trajectories(out)
  assert t.stop_reason in ("turn_length", "no_tool_call", "answer", "max_turns", "max_sequence")
