"""The continuous rollout engine (paged KV pool, decode slots, one prefill per group) against the lock-step one.

The invariant: for the same seeds, tokens, log-probs, crops and trajectories do not depend on the engine, the slot
count, the page size, the segment length or the pool size (fp32, CPU)."""

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from deepeyes_jax.agent import prompts
from deepeyes_jax.agent.rollout import AgentConfig, RolloutStats, Task, run_rollouts
from deepeyes_jax.models import qwen2_5_vl as qvl
from deepeyes_jax.processing.tokenizer import load_tokenizer
from deepeyes_jax.sampling import paged, rules
from deepeyes_jax.sampling.sampler import Sampler

SMALL = dict(min_pixels=4 * 28 * 28, max_pixels=48 * 28 * 28)
ZOOM = (
  "<think>look closer</think>\n<tool_call>\n"
  '{{"name": "image_zoom_in_tool", "arguments": {{"bbox_2d": {box}}}}}\n</tool_call><|im_end|>'
)
ANSWER = "<think>done</think> <answer>B</answer><|im_end|>"


@pytest.fixture(scope="module")
def agent(tiny_vlm):
  path, _, _ = tiny_vlm
  return Sampler(qvl.from_pretrained(path, dtype=jnp.float32)), load_tokenizer(str(path))


def _task(tid, seed=0, size=(300, 200), text="What letter?"):
  rng = np.random.default_rng(seed)
  image = Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))
  return Task(task_id=tid, image=image, user_text=text + prompts.USER_SUFFIX)


def _assert_same(runs, ref):
  assert [t.uid for t in runs] == [t.uid for t in ref]
  for a, b in zip(runs, ref):
    np.testing.assert_array_equal(a.token_ids, b.token_ids)
    np.testing.assert_array_equal(a.action_mask, b.action_mask)
    np.testing.assert_array_equal(a.position_ids, b.position_ids)
    np.testing.assert_array_equal(a.grids, b.grids)
    np.testing.assert_allclose(a.logprobs, b.logprobs, rtol=1e-5, atol=1e-5)
    assert (a.stop_reason, a.answer, a.turns, a.tool_calls) == (b.stop_reason, b.answer, b.turns, b.tool_calls)
    assert [im.tobytes() for im in a.images] == [im.tobytes() for im in b.images]


TASKS = [
  ("e0", 11, (300, 200)),
  ("e1", 12, (200, 300)),
  ("e2", 13, (260, 260)),
]
ZOOMS = [ZOOM.format(box="[10, 20, 150, 120]"), ZOOM.format(box="[100, 50, 190, 190]")]
# Per row: forced turns then sampling; rows zoom 0-2 times, some answer at once, some sample throughout.
SCRIPTS = [ZOOMS[:1], [], ZOOMS, [ANSWER], ZOOMS[1:], [], [], ZOOMS[:1] + [ANSWER], ZOOMS, []]


def _rollout(agent, **overrides):
  stats = RolloutStats()
  return _rollout_with(agent, stats, **overrides), stats


def _rollout_with(agent, stats, cancel=None, **overrides):
  sampler, tok = agent
  tasks = [_task(t, s, size) for t, s, size in TASKS]
  base = AgentConfig(
    sampling=rules.SamplingParams(1.0), max_turns=4, max_tokens_per_turn=96, max_total_tokens=1024, **SMALL
  )
  cfg = dataclasses.replace(base, **overrides)
  scripts = (SCRIPTS * 2)[: 3 * 3]
  kw = dict(seed=5, scripted_turns=scripts, stats=stats, cancel=cancel)
  return run_rollouts(sampler, tok, tasks, group_size=3, config=cfg, **kw)


@pytest.fixture(scope="module")
def reference(agent):
  return _rollout(agent, engine="lockstep")


@pytest.mark.parametrize(
  "overrides",
  [
    dict(),
    dict(max_concurrent_rows=2, page_size=8, segment_steps=6, segment_release=0.0),  # segments of 8 (a bucket)
    dict(max_concurrent_rows=4, page_size=32, segment_steps=16, segment_release=1.0),
    dict(max_concurrent_rows=3, page_size=16, kv_pages=100, segment_steps=8),  # a fixed pool: waits and restarts
  ],
  ids=["all-slots", "2-slots-page8", "4-slots-page32", "fixed-pool"],
)
def test_continuous_engine_matches_lockstep(agent, reference, overrides):
  ref, ref_stats = reference
  out, stats = _rollout(agent, **overrides)
  _assert_same(out, ref)
  assert any(len(t.images) >= 2 for t in ref) and any(t.stop_reason == "answer" for t in ref)
  assert stats.kv_peak_used_bytes < ref_stats.kv_bytes
  if not overrides.get("kv_pages"):
    assert stats.restarts == 0
    assert stats.token_steps == ref_stats.token_steps  # the same tokens were generated
    assert stats.prefill_tokens * 3 == ref_stats.prefill_tokens  # one prefill per group (3 groups of 3), not per row
  else:  # rows restarted from their prompt when the pool ran out, and came out the same
    assert stats.restarts > 0 and stats.token_steps > ref_stats.token_steps
    assert stats.kv_bytes == overrides["kv_pages"] * paged.page_bytes(agent[0].config, 16, jnp.float32)


def test_continuous_engine_on_a_mesh_matches_one_device(tiny_vlm, agent, reference):
  """Slots and pool pages split over data x fsdp = 4 shards (page ids local to a shard), heads over tensor = 2."""
  from deepeyes_jax.parallel import sharding as shd

  mesh = shd.make_mesh(2, 2, 2)
  sampler = Sampler(qvl.from_pretrained(tiny_vlm[0], dtype=jnp.float32, mesh=mesh), mesh=mesh)
  assert sampler.pool_shards == 4
  ref, _ = reference
  out, stats = _rollout((sampler, agent[1]), max_concurrent_rows=6, page_size=8, segment_steps=8)
  _assert_same(out, ref)
  assert stats.kv_bytes % (4 * paged.page_bytes(sampler.config, 8, jnp.float32)) == 0  # a whole number per shard


def test_continuous_engine_with_pallas_attention_matches_lockstep(tiny_vlm, agent, reference, monkeypatch):
  """attention_impl="pallas": the decode and extend steps read the paged pool in place (the GPU kernel, interpret
  mode here) and give the reference engine's trajectories."""
  from deepeyes_jax.kernels import gpu_paged_attention

  traced = []
  kernel = gpu_paged_attention.paged_flash
  counted = lambda *a, **kw: traced.append(a[0].shape) or kernel(*a, **kw)
  monkeypatch.setattr(gpu_paged_attention, "paged_flash", counted)
  sampler = Sampler(qvl.from_pretrained(tiny_vlm[0], dtype=jnp.float32, attention_impl="pallas"))
  out, _ = _rollout((sampler, agent[1]), max_concurrent_rows=4, page_size=16, segment_steps=8)
  _assert_same(out, reference[0])
  assert {shape[1] for shape in traced} >= {1} and max(shape[1] for shape in traced) > 1  # decode and extend


@pytest.mark.parametrize("engine", ["continuous", "lockstep"])
def test_a_prompt_that_cannot_fit_ends_its_rows_with_a_reason(agent, engine, caplog):
  sampler, tok = agent
  # The same question about a large image (48 x 28^2 px -> 48 image tokens) and a small one (4 tokens): with room
  # for the small prompt only, the large task's rows end as prompt_too_long and the rest of the batch runs.
  tasks = [_task("big", 1, (1000, 1000)), _task("small", 2, (56, 56))]
  sizes = [len(r) for r in _prompt_lengths(tok, tasks, sampler.config)]
  cfg = AgentConfig(
    sampling=rules.GREEDY,
    max_total_tokens=(sizes[0] + sizes[1]) // 2 + 8,
    max_tokens_per_turn=8,
    engine=engine,
    **SMALL,
  )
  assert sizes[1] < cfg.max_total_tokens <= sizes[0]
  out = run_rollouts(sampler, tok, tasks, group_size=2, config=cfg, scripted_turns=[[ANSWER]] * 4)
  assert [t.stop_reason for t in out[:2]] == ["prompt_too_long"] * 2
  assert all(not t.action_mask.any() and not t.turns for t in out[:2])
  assert [t.stop_reason for t in out[2:]] != ["prompt_too_long"] * 2 and all(t.action_mask.any() for t in out[2:])
  assert "leaves no room in max_total_tokens" in caplog.text


def _prompt_lengths(tok, tasks, model_config, **pixels):
  from deepeyes_jax.sampling.generate import encode_conversation

  pixels = pixels or SMALL
  return [
    encode_conversation(tok, t.messages(), image_token_id=model_config.image_token_id, **pixels).tokens for t in tasks
  ]


def test_rows_a_fixed_pool_cannot_hold_end_with_an_error_and_the_others_go_on(agent, caplog):
  """rollout.kv_pages too small for one row, even alone: that row ends with the stop reason "error" (the message
  names kv_pages) instead of stopping the rollout. Two ways: a prompt that cannot start, and a turn that outgrows
  the pool."""
  sampler, tok = agent
  page = 16
  tasks = [_task("big", 1, (1000, 1000)), _task("small", 2, (56, 56))]
  pixels = dict(min_pixels=4 * 28 * 28, max_pixels=256 * 28 * 28)  # the big image takes 256 tokens, the small 4
  big, small = (paged.pages_for(len(r), page) for r in _prompt_lengths(tok, tasks, sampler.config, **pixels))
  assert small <= big - 8  # the small group's two rows fit where one big row cannot
  kw = dict(sampling=rules.GREEDY, max_tokens_per_turn=64, page_size=page, segment_steps=8, **pixels)
  # A big row needs its prompt's pages and a segment's growth (the group's first row a copy of the last page too):
  # one or two pages more than the pool. The small rows need small + 2 and 1.
  cfg = AgentConfig(kv_pages=big, max_total_tokens=4096, **kw)
  stats = RolloutStats()
  out = run_rollouts(sampler, tok, tasks, group_size=2, config=cfg, scripted_turns=[[ANSWER]] * 4, stats=stats)
  assert [t.stop_reason for t in out] == ["error", "error", "answer", "answer"]
  for t in out[:2]:
    assert "rollout.kv_pages=" in t.metadata["error"] and "cannot hold the prompt" in t.metadata["error"]
  assert [t.answer for t in out[2:]] == ["B", "B"] and stats.pool_failures == 2
  # A turn of ~60 tokens cannot fit next to the small prompt in small + 2 pages: the row ends when it outgrows them
  # (the other row, admitted when it ends, answers).
  long_turn = "<think>" + "look " * 60 + "</think> <answer>B</answer><|im_end|>"
  cfg = AgentConfig(kv_pages=small + 2, max_total_tokens=4096, **kw)
  stats = RolloutStats()
  out = run_rollouts(
    sampler, tok, tasks[1:], group_size=2, config=cfg, scripted_turns=[[long_turn], [ANSWER]], stats=stats
  )
  assert out[0].stop_reason == "error" and "alone" in out[0].metadata["error"]
  assert out[1].stop_reason == "answer" and stats.pool_failures == 1
  assert "KV pages failed, row ended" in caplog.text


@pytest.mark.parametrize("engine", ["continuous", "lockstep"])
def test_a_cancelled_rollout_stops_between_segments(agent, engine):
  """`cancel` is polled between decode segments (lock-step: turns): once it says so, the rollout raises
  RolloutCancelled there, without finishing the rows in flight."""
  from deepeyes_jax.agent.rollout import RolloutCancelled

  polls = []

  def cancel():
    polls.append(1)
    return len(polls) >= 3

  stats = RolloutStats()
  with pytest.raises(RolloutCancelled):
    _rollout_with(agent, stats, engine=engine, max_concurrent_rows=2, segment_steps=8, cancel=cancel)
  assert len(polls) == 3 and stats.token_steps > 0  # it ran, then stopped at the third poll


def test_a_row_the_pool_can_hold_once_cached_prompts_go_is_not_ended(agent):
  """A fixed pool full of another group's cached prompt (its row was restarted to make room): the growing row
  drops that prompt (prefilled again when its rows start) rather than ending as if the pool could not hold it."""
  sampler, tok = agent
  tasks = [_task("a", 2, (56, 56)), _task("b", 3, (56, 56))]
  long_turn = "<think>" + "look " * 16 + "</think> <answer>B</answer><|im_end|>"  # 61 tokens
  cfg = AgentConfig(
    sampling=rules.GREEDY, max_tokens_per_turn=96, max_total_tokens=4096, page_size=16, segment_steps=8,
    max_concurrent_rows=2, kv_pages=79, **SMALL,
  )  # fmt: skip
  stats = RolloutStats()
  scripts = [[ANSWER], [long_turn], [ANSWER], [ANSWER]]
  out = run_rollouts(sampler, tok, tasks, group_size=2, config=cfg, scripted_turns=scripts, stats=stats)
  assert [t.stop_reason for t in out] == ["answer"] * 4 and stats.pool_failures == 0
  assert stats.restarts > 0  # the pool was tight: a row made room by restarting
