"""The one evaluation loop: build each item's task, roll out in batches, score, record, summarise.

Held-out evaluation during training (``eval/held_out.py``), benchmark evaluation (``eval/runner.py``) and data
selection (``eval/selection.py``) are thin callers of ``run``:

- ``items`` are anything ``build_task(item) -> Task`` turns into an agent task (records, benchmark items, tasks);
  an item whose task cannot be built (``ImageError`` / ``OSError`` / ``ValueError``: a corrupt image, a missing box)
  gets an error record and is skipped, never fatal.
- ``rollout_fn(tasks, group_size, seed) -> trajectories`` in (task, sample) order: ``agent_rollouts`` in production
  (the sampler and the rollout engine, sharded over the mesh like training rollouts), a scripted function in tests.
- ``scorer(tasks, trajectories) -> verdicts`` (``scoring.RewardScorer`` for DeepEyes-format data,
  ``scoring.BenchmarkScorer`` for benchmark items).
- One record per item: ``{"item_id", "samples": [one dict per sample, see SAMPLE_KEYS], "greedy_correct", "acc",
  "pass", "error"}``; ``summarize(records)`` gives the one set of metric keys every evaluation reports
  (``SUMMARY_KEYS``, fractions in [0, 1]).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from deepeyes_jax.agent.rollout import AgentConfig, Task, run_rollouts
from deepeyes_jax.agent.trajectory import Trajectory
from deepeyes_jax.eval import scoring
from deepeyes_jax.processing.image import ImageError

log = logging.getLogger(__name__)

RolloutFn = Callable[[Sequence[Task], int, int], list[Trajectory]]
"""``rollout_fn(tasks, group_size, seed) -> trajectories`` in (task, sample) order."""

SAMPLE_KEYS = (
  "sample",
  "answer",
  "correct",
  "how",
  "reward",
  "tool_calls",
  "successful_tool_calls",
  "zoom_ious",
  "turns",
  "stop_reason",
  "response_tokens",
  "error",  # why the rollout (stop_reason "error") or the scoring (how "error") of this sample failed, else None
)
SUMMARY_KEYS = (
  "items",  # items scored
  "skipped",  # items whose task could not be built or whose rollouts all failed (see each record's "error")
  "accuracy",  # mean over items of the fraction of correct samples (avg@k; with one sample: accuracy)
  "greedy",  # sample 0 correct
  "pass_at_k",  # any sample correct
  "reward",  # mean total reward (reward-scored items; 0 for benchmark items)
  "answered",  # fraction of samples with an answer
  "tool_calls_per_traj",
  "successful_crops_per_traj",
  "tool_success_rate",  # successful crops / tool calls
  "turns_per_traj",
  "judged_fraction",  # samples decided by the judge
  "no_answer_fraction",
  "error_fraction",  # samples whose rollout or scoring failed (contained: scored wrong, counted here)
  "mean_iou",  # IoU of every successful zoom box with the task's target box (tasks that record one)
  "first_zoom_iou",  # the same for the first zoom of each sample that zoomed
)


def agent_rollouts(sampler, tokenizer, config: AgentConfig, *, one_turn: bool = False) -> RolloutFn:
  """A ``RolloutFn`` over the sampler and the rollout engine; ``one_turn``: a single assistant turn (the no-tool
  and crop conditions: a tool call in it is not executed)."""
  if one_turn:
    config = dataclasses.replace(config, max_turns=1)

  def rollout_fn(tasks, group_size, seed):
    return run_rollouts(sampler, tokenizer, tasks, group_size=group_size, config=config, seed=seed)

  return rollout_fn


# ----------------------------------------------------------------------------------------------------------------
# Zoom boxes against the target


def _iou(a, b) -> float:
  ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
  iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
  inter = ix * iy
  union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
  return float(inter / union) if union > 0 else 0.0


def target_box(traj: Trajectory) -> list[float] | None:
  """``metadata["target_box"]`` (original pixels; a JSON string in parquet records) or None."""
  box = traj.metadata.get("target_box")
  if box is None:
    return None
  return list(json.loads(box)) if isinstance(box, str) else list(box)


def zoom_ious(traj: Trajectory) -> list[float]:
  """IoU of each successful zoom box with the target box ([] when the task has no target box)."""
  box = target_box(traj)
  if box is None:
    return []
  return [_iou(tc.bbox, box) for tc in traj.tool_calls if tc.status == "ok" and tc.bbox is not None]


# ----------------------------------------------------------------------------------------------------------------
# Records


def sample_record(traj: Trajectory, verdict) -> dict[str, Any]:
  """One sample of one item (``SAMPLE_KEYS``)."""
  return {
    "sample": traj.sample_index,
    "answer": verdict.answer,
    "correct": bool(verdict.correct),
    "how": verdict.how,
    "reward": verdict.reward,
    "tool_calls": traj.num_tool_calls,
    "successful_tool_calls": traj.num_successful_tool_calls,
    "zoom_ious": zoom_ious(traj),
    "turns": len(traj.turns),
    "stop_reason": traj.stop_reason,
    "response_tokens": traj.response_length,
    "error": verdict.error or traj.metadata.get("error"),
  }


def item_record(item_id: str, samples: list[dict], error: str | None = None) -> dict[str, Any]:
  n = len(samples)
  return {
    "item_id": item_id,
    "samples": samples,
    "greedy_correct": bool(samples[0]["correct"]) if samples else None,
    "acc": sum(s["correct"] for s in samples) / n if n else None,
    "pass": any(s["correct"] for s in samples) if n else None,
    "error": error,
  }


def summarize(records: Sequence[dict]) -> dict[str, float]:
  """``SUMMARY_KEYS`` over item records (micro average over items; per-trajectory keys over all samples)."""
  scored = [r for r in records if r["error"] is None]
  n, samples = len(scored), [s for r in scored for s in r["samples"]]
  m, calls = max(1, len(samples)), sum(s["tool_calls"] for s in samples)
  ious = [x for s in samples for x in s.get("zoom_ious") or []]
  first = [s["zoom_ious"][0] for s in samples if s.get("zoom_ious")]
  return {
    "items": n,
    "skipped": len(records) - n,
    "accuracy": sum(r["acc"] for r in scored) / max(1, n),
    "greedy": sum(r["greedy_correct"] for r in scored) / max(1, n),
    "pass_at_k": sum(r["pass"] for r in scored) / max(1, n),
    "reward": sum(s.get("reward") or 0.0 for s in samples) / m,  # .get: results.jsonl of older runs
    "answered": sum(s["answer"] is not None for s in samples) / m,
    "tool_calls_per_traj": calls / m,
    "successful_crops_per_traj": sum(s["successful_tool_calls"] for s in samples) / m,
    "tool_success_rate": sum(s["successful_tool_calls"] for s in samples) / max(1, calls),
    "turns_per_traj": sum(s["turns"] for s in samples) / m,
    "judged_fraction": sum(s["how"] == "judge" for s in samples) / m,
    "no_answer_fraction": sum(s["how"] == "no_answer" for s in samples) / m,
    "error_fraction": sum(s.get("error") is not None for s in samples) / m,
    "mean_iou": float(np.mean(ious)) if ious else 0.0,
    "first_zoom_iou": float(np.mean(first)) if first else 0.0,
  }


# ----------------------------------------------------------------------------------------------------------------
# The loop


BatchFn = Callable[[list, list[Task], list[Trajectory], list[dict]], None]
"""``on_batch(items, tasks, trajectories, records)`` after each batch (records of that batch's items, in order)."""


def run(
  items: Sequence,
  build_task: Callable[[Any], Task],
  rollout_fn: RolloutFn,
  scorer,
  *,
  item_id: Callable[[Any], str],
  group_size: int = 1,
  seed: int = 0,
  batch_size: int = 8,
  label: str = "eval",
  log_fn: Callable[[str], None] | None = print,
  on_batch: BatchFn | None = None,
  done_before: int = 0,
) -> list[dict]:
  """Rolls out and scores ``items`` in batches of ``batch_size`` items; returns one record per item, in order.

  ``log_fn`` gets one progress line per batch (items, accuracy so far, tool calls per trajectory, seconds per
  item, ETA); ``done_before``: items finished by an earlier run (a resumed evaluation), counted in the line."""
  records: list[dict] = []
  t0, total = time.time(), len(items) + done_before
  for start in range(0, len(items), batch_size):
    batch = list(items[start : start + batch_size])
    out: list[dict | None] = [None] * len(batch)  # by position: two items may share an id
    tasks, built = [], []
    for pos, item in enumerate(batch):
      try:
        tasks.append(build_task(item))
        built.append(pos)
      except (ImageError, OSError, ValueError) as e:  # reported and skipped, never fatal
        log.warning("%s: skipping %s: %s", label, item_id(item), e)
        out[pos] = item_record(item_id(item), [], error=str(e))
    trajs, failed = _rollouts(rollout_fn, tasks, group_size, seed, label)
    if failed is not None:  # the one task of this batch failed in every row: that item's error, not the run's
      out[built[0]] = item_record(item_id(batch[built[0]]), [], error=failed)
      tasks, built = [], []
    if len(trajs) != len(tasks) * group_size:
      raise ValueError(f"rollout_fn returned {len(trajs)} trajectories for {len(tasks)} tasks x {group_size}")
    k = group_size
    verdicts = _score(scorer, tasks, trajs, k, label) if tasks else []
    for i, (pos, task) in enumerate(zip(built, tasks)):
      samples = [sample_record(t, v) for t, v in zip(trajs[i * k : (i + 1) * k], verdicts[i * k : (i + 1) * k])]
      out[pos] = item_record(task.task_id, samples)
    if on_batch is not None:
      on_batch(batch, tasks, trajs, out)
    records += out
    if log_fn is not None:
      log_fn(_progress(label, records, done_before, total, time.time() - t0))
  return records


def _rollouts(rollout_fn: RolloutFn, tasks: list[Task], k: int, seed: int, label: str):
  """``(rollout_fn(tasks, k, seed), None)``, or ``([], message)`` when a batch of ONE task failed in every row.

  The engine raises when all its rows fail: for several tasks that is a systematic failure and stops the run; for
  one task it is that item's failure, recorded as its error."""
  if len(tasks) != 1:
    return (rollout_fn(tasks, k, seed) if tasks else []), None
  try:
    return rollout_fn(tasks, k, seed), None
  except Exception as e:  # noqa: BLE001 -- one item; the caller records it
    message = f"{type(e).__name__}: {e}"
    log.warning("%s: every rollout of %s failed: %s", label, tasks[0].task_id, message)
    return [], message


def _score(scorer, tasks: list[Task], trajs: list[Trajectory], k: int, label: str) -> list:
  """``scorer(tasks, trajs)``; when it raises, each sample is scored alone and a sample whose scoring raises is
  scored wrong with ``how="error"`` (one bad reply never stops an evaluation)."""
  try:
    return scorer(tasks, trajs)
  except Exception as e:  # noqa: BLE001 -- contained per sample below
    log.warning("%s: scoring a batch raised %s: %s; scoring its samples one by one", label, type(e).__name__, e)
  out = []
  for i, traj in enumerate(trajs):
    try:
      out += scorer([tasks[i // k]], [traj])
    except Exception as e:  # noqa: BLE001
      log.warning("%s: scoring %s raised %s: %s; scored wrong", label, traj.uid, type(e).__name__, e)
      out.append(scoring.Verdict(False, "error", error=f"{type(e).__name__}: {e}"))
  return out


def _progress(label: str, records: list[dict], done_before: int, total: int, elapsed: float) -> str:
  s = summarize(records)
  per = elapsed / max(1, len(records))
  eta = per * (total - done_before - len(records))
  return (
    f"{label}: items {done_before + len(records)}/{total} | acc {s['accuracy']:.3f} | "
    f"tools/traj {s['tool_calls_per_traj']:.2f} | {per:.1f} s/item | "
    f"ETA {int(eta // 3600)}h{int(eta % 3600 // 60):02d}m{int(eta % 60):02d}s"
  )
