"""The one evaluation loop (eval/loop.py): batches, records, summary keys, and containment of bad items: a task that
cannot be built is skipped with an error record, a sample whose scoring raises is scored wrong and counted, and
the other items of the batch are unaffected."""

import numpy as np
import pytest
from PIL import Image

from deepeyes_jax.agent.rollout import Task
from deepeyes_jax.agent.trajectory import ToolRecord, Trajectory, Turn
from deepeyes_jax.eval import loop, scoring

IMAGE = Image.new("RGB", (64, 48), (200, 30, 30))


def _traj(task: Task, sample: int, answer: str, box=None) -> Trajectory:
  calls = (
    [ToolRecord(turn=0, content="{}", name="zoom", bbox_given=box, bbox=box, status="ok", error=None)] if box else []
  )
  return Trajectory(
    uid=f"{task.task_id}/{sample}", task_id=task.task_id, sample_index=sample, token_ids=np.arange(4, dtype=np.int32),
    action_mask=np.asarray([0, 0, 1, 1], np.int8), logprobs=np.zeros(4, np.float32),
    position_ids=np.zeros((3, 4), np.int32), images=[task.image], grids=np.ones((1, 3), np.int64), prompt_length=2,
    turns=[Turn(text=answer, num_tokens=2, stop="stop_token", kind="answer")] * (2 if box else 1),
    tool_calls=calls, answer=answer, stop_reason="answer", image_min_pixels=0, image_max_pixels=0,
    metadata=dict(task.metadata),
  )  # fmt: skip


def build(item: str) -> Task:
  if item.startswith("corrupt"):
    raise OSError(f"{item}: image file is truncated")
  return Task(task_id=item, image=IMAGE, metadata={"target_box": [0, 0, 10, 10]})


def rollout_fn(tasks, k, seed):
  # sample 0 zooms on the target's box and answers right; later samples answer wrong without a zoom
  return [
    _traj(t, i, "right" if i == 0 else "wrong", [0, 0, 10, 10] if i == 0 else None) for t in tasks for i in range(k)
  ]


def scorer(tasks, trajs):
  if any(t.task_id == "poison" for t in trajs):
    raise ZeroDivisionError("the judge's reply broke the parser")
  return [scoring.Verdict(t.answer == "right", "rule", answer=t.answer) for t in trajs]


def test_run_records_summary_and_containment():
  items = ["a", "corrupt-1", "poison", "b"]
  lines, batches = [], []
  records = loop.run(
    items, build, rollout_fn, scorer, item_id=str, group_size=2, batch_size=3, label="test", log_fn=lines.append,
    on_batch=lambda batch, tasks, trajs, recs: batches.append(([t.task_id for t in tasks], len(trajs), len(recs))),
  )  # fmt: skip
  assert [r["item_id"] for r in records] == items  # one record per item, in order
  assert batches == [(["a", "poison"], 4, 3), (["b"], 2, 1)]
  bad = records[1]
  assert bad["samples"] == [] and "truncated" in bad["error"]
  poison = records[2]["samples"]
  assert [s["how"] for s in poison] == ["error", "error"] and "ZeroDivisionError" in poison[0]["error"]
  a = records[0]["samples"]
  assert [s["correct"] for s in a] == [True, False] and a[0]["zoom_ious"] == [1.0] and a[1]["zoom_ious"] == []
  assert records[0]["greedy_correct"] and records[0]["acc"] == 0.5 and records[0]["pass"]

  s = loop.summarize(records)
  assert set(s) == set(loop.SUMMARY_KEYS)
  assert s["items"] == 3 and s["skipped"] == 1
  assert s["accuracy"] == pytest.approx((0.5 + 0.0 + 0.5) / 3) and s["greedy"] == pytest.approx(2 / 3)
  assert s["error_fraction"] == pytest.approx(2 / 6) and s["tool_calls_per_traj"] == pytest.approx(3 / 6)
  assert s["mean_iou"] == 1.0 and s["first_zoom_iou"] == 1.0 and s["tool_success_rate"] == 1.0
  assert len(lines) == 2 and lines[-1].startswith("test: items 4/4 | acc ") and "ETA 0h00m00s" in lines[-1]


def test_run_checks_the_rollout_count():
  with pytest.raises(ValueError, match="returned 1 trajectories for 1 tasks x 2"):
    loop.run(["a"], build, lambda tasks, k, seed: rollout_fn(tasks, 1, seed), scorer, item_id=str, group_size=2)


def test_training_metrics_count_contained_failures():
  """The step's metrics count the rows the engine ended with an error, the prompts that did not fit and the
  rewards whose function raised; the judge's fractions come from the rewards."""
  from deepeyes_jax.reward.rewards import RewardResult
  from deepeyes_jax.rl.metrics import rollout_metrics

  task = build("a")
  trajs = [_traj(task, i, "x") for i in range(4)]
  trajs[1].stop_reason, trajs[2].stop_reason = "error", "prompt_too_long"
  ok = RewardResult(total=1.0, acc=1.0, fmt=0.0, tool=0.0, answer="x", judged=True, details={"judge": "ok"})
  down = RewardResult(total=0.0, acc=0.0, fmt=0.0, tool=0.0, answer="x", details={"judge": "unavailable"})
  failed = RewardResult(total=0.0, acc=0.0, fmt=0.0, tool=0.0, answer=None, details={"error": "ValueError: bad"})
  m = rollout_metrics(trajs, [ok, down, failed, ok])
  assert (m["errors/rows"], m["errors/prompt_too_long"], m["errors/scoring"]) == (1.0, 1.0, 1.0)
  assert m["stop/error"] == 0.25 and m["reward/judged"] == 0.5 and m["reward/judge_unavailable"] == 0.25


def test_duplicate_ids_keep_their_own_records_and_a_lone_failing_item_is_contained():
  def failing_fn(tasks, k, seed):
    if any(t.task_id == "broken" for t in tasks):
      raise RuntimeError("every row of the rollout failed")
    return rollout_fn(tasks, k, seed)

  def two_answers(tasks, k, seed):  # the two items named "a" answer differently
    return [_traj(t, 0, "right" if n == 0 else "wrong") for n, t in enumerate(tasks)]

  records = loop.run(["a", "a"], build, two_answers, scorer, item_id=str, batch_size=2, log_fn=None)
  assert [r["greedy_correct"] for r in records] == [True, False]  # positional, not keyed by id
  records = loop.run(["a", "broken", "b"], build, failing_fn, scorer, item_id=str, batch_size=1, log_fn=None)
  assert [r["error"] for r in records] == [None, "RuntimeError: every row of the rollout failed", None]
  assert loop.summarize(records)["skipped"] == 1
  with pytest.raises(RuntimeError, match="every row"):  # a batch of several tasks failing together: systematic
    loop.run(["a", "broken"], build, failing_fn, scorer, item_id=str, batch_size=2, log_fn=None)


def test_summarize_reads_records_of_older_runs():
  """results.jsonl lines written before samples carried reward / zoom_ious / error (a resumed evaluation)."""
  old = {"sample": 0, "answer": "A", "correct": True, "how": "rule", "tool_calls": 1, "successful_tool_calls": 1,
         "turns": 2, "stop_reason": "answer", "response_tokens": 9}  # fmt: skip
  s = loop.summarize([loop.item_record("x", [old])])
  assert s["accuracy"] == 1.0 and s["reward"] == 0.0 and s["mean_iou"] == 0.0 and s["error_fraction"] == 0.0
