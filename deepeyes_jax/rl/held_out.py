"""Held-out evaluation during training: greedy rollouts on a test split, with and without the zoom tool.

Used by the trainer at the end of the warm start and at the end of training (`config.eval`); it writes what
`final_eval.json` reports. Metrics, over the questions:

- ``accuracy``: the reward's ``acc`` (rule match of the answer with the ground truth);
- ``tool_calls_per_question`` and ``tool_success_rate`` (successful crops / calls);
- ``mean_iou``: IoU of every successful zoom box with the target box (when the task records one as
  ``metadata["target_box"]``, original pixels), and ``first_zoom_iou``: the same for the first zoom of each
  question that zoomed;
- ``answered``: fraction of questions with an answer; ``reward``: mean total reward.

``tool=False`` ("tool disabled"): each question is asked with no tool offered (`prompts.no_tool_messages`: plain
system prompt, the question, an answer-format instruction) and a single assistant turn, so the model answers from
the global view only.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable, Sequence

import numpy as np

from deepeyes_jax.agent import prompts
from deepeyes_jax.agent.rollout import AgentConfig, Task, run_rollouts
from deepeyes_jax.agent.trajectory import Trajectory
from deepeyes_jax.rl import rewards as rewards_lib
from deepeyes_jax.sampling import rules


def _iou(a, b) -> float:
  ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
  iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
  inter = ix * iy
  union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
  return float(inter / union) if union > 0 else 0.0


def target_box(traj: Trajectory) -> list[float] | None:
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


def summarize(trajs: Sequence[Trajectory], results: Sequence[rewards_lib.RewardResult]) -> dict[str, float]:
  n = max(1, len(trajs))
  calls = sum(t.num_tool_calls for t in trajs)
  per_traj = [zoom_ious(t) for t in trajs]
  ious = [x for row in per_traj for x in row]
  first = [row[0] for row in per_traj if row]
  return {
    "num_questions": len(trajs),
    "accuracy": float(sum(r.acc for r in results) / n),
    "reward": float(sum(r.total for r in results) / n),
    "answered": float(sum(t.answer is not None for t in trajs) / n),
    "tool_calls_per_question": float(calls / n),
    "tool_success_rate": float(sum(t.num_successful_tool_calls for t in trajs) / max(1, calls)),
    "mean_iou": float(np.mean(ious)) if ious else 0.0,
    "first_zoom_iou": float(np.mean(first)) if first else 0.0,
  }


def evaluate(
  sampler,
  tokenizer,
  tasks: Sequence[Task],
  *,
  agent_config: AgentConfig,
  tool: bool = True,
  no_tool_messages: Callable[[Task], list[dict]] | None = None,  # default: prompts.no_tool_messages
  batch_size: int = 64,
  log: Callable[[str], None] | None = print,
) -> tuple[dict[str, float], list[Trajectory]]:
  """Greedy rollouts of `tasks` (in batches of `batch_size`) and their summary metrics (see the module doc)."""
  cfg = dataclasses.replace(agent_config, sampling=rules.GREEDY)
  if not tool:
    if no_tool_messages is None:
      no_tool_messages = lambda t: prompts.no_tool_messages(t.image, t.metadata["question"])  # noqa: E731
    cfg = dataclasses.replace(cfg, max_turns=1)
    tasks = [dataclasses.replace(t, messages_override=no_tool_messages(t)) for t in tasks]
  trajs: list[Trajectory] = []
  t0 = time.time()
  for k in range(0, len(tasks), batch_size):
    trajs += run_rollouts(sampler, tokenizer, tasks[k : k + batch_size], group_size=1, config=cfg, seed=0)
    if log is not None:
      done = len(trajs)
      eta = (time.time() - t0) / done * (len(tasks) - done)
      log(f"  eval ({'tool' if tool else 'no tool'}): {done}/{len(tasks)} questions, ETA {eta:.0f}s")
  results = rewards_lib.score_trajectories(trajs, tokenizer)
  for t, r in zip(trajs, results):
    t.metadata["correct"] = bool(r.acc)
  return summarize(trajs, results), trajs
