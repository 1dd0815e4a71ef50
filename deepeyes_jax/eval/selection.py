"""DeepEyes' tool-use-oriented data selection (SPEC.md section 2, "Data").

For each DeepEyes-format item, with a given policy (a checkpoint through ``AgentPolicy``, or a scripted one):

1. **difficulty filter**: sample ``k`` answers with the zoom tool (the record's own prompt, multi-turn); drop items
   solved 0/k (``never_solved``: no learning signal, or a wrong label) or k/k (``always_solved``: nothing to learn);
2. **tool-integrated filter** (``tool_filter=True``): sample ``k`` answers WITHOUT the tool (plain prompt, one
   turn) and ``k`` answers when the model is also shown the ground-truth crop; keep the item only if it mostly fails
   without the tool (solved rate <= ``no_tool_max``) and is mostly solved with the crop (rate >= ``crop_min``, and
   above the no-tool rate): the items where looking closer is what makes the difference. The paper gives no
   thresholds; 0.5 / 0.5 are ours. The ground-truth box is ``extra_info.bbox`` as ``[x1, y1, x2, y2]`` in
   original-image pixels; an item without one is kept or dropped by ``missing_box`` (``"keep"`` by default: chart
   and math items have no box).

Correctness is the ``acc`` of the item's reward function (``rewards.compute_reward``: rule match, then the judge
when one is given). Answers of the one-turn modes are taken as DeepEyes does for plain replies: the ``<answer>``
content when present, else the whole reply.

``select(...)`` returns one ``Decision`` per item; ``write_selection`` writes the kept records (unchanged, plus a
``selection`` column with the statistics) as parquet and every decision as JSON lines.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import logging
import os
from collections.abc import Sequence
from typing import Protocol

from PIL import Image

from deepeyes_jax.agent.rollout import AgentConfig, Task, run_rollouts
from deepeyes_jax.data.deepeyes import Example
from deepeyes_jax.eval.scoring import NO_TOOL_OPEN_SUFFIX, NO_TOOL_SYSTEM_PROMPT, final_answer
from deepeyes_jax.rl import rewards

log = logging.getLogger(__name__)

MODES = ("tool", "no_tool", "crop")
MIN_CROP_SIDE = 28  # one 28-px patch block: a smaller crop is grown around its centre


@dataclasses.dataclass(frozen=True)
class Response:
  """One sampled answer: the decoded response (everything after the prompt) and the crops that succeeded."""

  text: str
  num_successful_tool_calls: int = 0


class Policy(Protocol):
  """Samples ``k`` responses for every task; ``mode`` says how the tasks were built (see ``MODES``)."""

  def sample(self, tasks: Sequence[Task], k: int, seed: int, mode: str) -> list[list[Response]]: ...


class AgentPolicy:
  """A checkpoint through the sampler and the rollout engine (``mode != "tool"``: one turn)."""

  def __init__(self, sampler, tokenizer, config: AgentConfig):
    self.sampler, self.tokenizer, self.config = sampler, tokenizer, config

  def sample(self, tasks, k, seed, mode):
    config = self.config if mode == "tool" else dataclasses.replace(self.config, max_turns=1)
    trajs = run_rollouts(self.sampler, self.tokenizer, tasks, group_size=k, config=config, seed=seed)
    out = []
    for i in range(len(tasks)):
      group = trajs[i * k : (i + 1) * k]
      out.append(
        [
          Response(
            self.tokenizer.decode(t.token_ids[t.prompt_length :].tolist(), skip_special_tokens=False),
            t.num_successful_tool_calls,
          )
          for t in group
        ]
      )
    return out


@dataclasses.dataclass(frozen=True)
class SelectionConfig:
  k: int = 8
  seed: int = 0
  batch_size: int = 16  # items per policy call (rows = batch_size * k)
  tool_filter: bool = True
  no_tool_max: float = 0.5  # keep only if solved without the tool at most this often ...
  crop_min: float = 0.5  # ... and with the ground-truth crop at least this often
  missing_box: str = "keep"  # "keep" | "drop": items without extra_info.bbox under the tool filter

  def __post_init__(self):
    if self.k < 2:
      raise ValueError(f"k must be >= 2 (0/k and k/k are dropped), got {self.k}")
    if self.missing_box not in ("keep", "drop"):
      raise ValueError(f"missing_box must be 'keep' or 'drop', got {self.missing_box!r}")


@dataclasses.dataclass
class Decision:
  """Why an item was kept or dropped. ``solved*``: correct samples out of k (None: that stage did not run)."""

  uid: str
  data_source: str
  kept: bool
  reason: str  # kept | kept_no_box | never_solved | always_solved | solved_without_tool | crop_does_not_help | no_box
  k: int
  solved: int
  solved_no_tool: int | None = None
  solved_crop: int | None = None


def gt_box(example: Example) -> list[float] | None:
  """``extra_info.bbox`` as ``[x1, y1, x2, y2]``, or None."""
  box = example.extra.get("extra_info", {}).get("bbox")
  if isinstance(box, list | tuple) and len(box) == 4 and all(isinstance(v, int | float) for v in box):
    return [float(v) for v in box]
  return None


def crop(image: Image.Image, box: Sequence[float]) -> Image.Image:
  """The box clamped to the image, grown to at least ``MIN_CROP_SIDE`` px a side around its centre."""
  w, h = image.size
  x1, y1, x2, y2 = box
  cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
  half_w, half_h = max(x2 - x1, MIN_CROP_SIDE) / 2, max(y2 - y1, MIN_CROP_SIDE) / 2
  left, top = max(0, int(round(cx - half_w))), max(0, int(round(cy - half_h)))
  right, bottom = min(w, int(round(cx + half_w))), min(h, int(round(cy + half_h)))
  return image.crop((left, top, right, bottom))


def tool_task(example: Example) -> Task:
  """The record's own prompt, byte for byte (as in training)."""
  meta = {"data_source": example.data_source, "ground_truth": example.ground_truth, "question": example.question}
  return Task(task_id=example.uid, image=example.images[0], messages_override=example.messages, metadata=meta)


def plain_task(example: Example, with_crop: bool) -> Task:
  """One turn, no tool: the image (and the ground-truth crop after it), then the question."""
  content = [{"type": "image", "image": example.images[0]}]
  if with_crop:
    content.append({"type": "image", "image": crop(example.images[0], gt_box(example))})
  content.append({"type": "text", "text": example.question + NO_TOOL_OPEN_SUFFIX})
  messages = [{"role": "system", "content": NO_TOOL_SYSTEM_PROMPT}, {"role": "user", "content": content}]
  return Task(task_id=example.uid, image=example.images[0], messages_override=messages)


def is_correct(example: Example, response: Response, mode: str, judge=None) -> bool:
  """``acc`` of the item's reward function; a one-turn reply is wrapped as the reward expects its answer."""
  text = response.text
  if mode != "tool":
    answer = final_answer(rewards.extract_answer(text), text, no_tool=True) or ""
    is_math = rewards.get_reward_fn(example.data_source, default="vstar") is rewards.math_reward
    text = f"\\boxed{{{answer}}}" if is_math else f"<answer>{answer}</answer>"
  result = rewards.compute_reward(
    example.data_source,
    text,
    example.ground_truth,
    num_successful_tool_calls=response.num_successful_tool_calls,
    judge=judge,
    question=example.question,
    default="vstar",
  )
  return result.acc == 1.0


def _solved(examples, policy, config, mode, judge, seed_offset) -> list[int]:
  counts = []
  for start in range(0, len(examples), config.batch_size):
    batch = examples[start : start + config.batch_size]
    tasks = [tool_task(e) if mode == "tool" else plain_task(e, with_crop=mode == "crop") for e in batch]
    groups = policy.sample(tasks, config.k, config.seed + seed_offset, mode)
    if len(groups) != len(batch) or any(len(g) != config.k for g in groups):
      raise ValueError(f"policy returned {[len(g) for g in groups]} responses for {len(batch)} tasks x k={config.k}")
    counts += [sum(is_correct(e, r, mode, judge) for r in g) for e, g in zip(batch, groups)]
    log.info("selection: %s %d/%d", mode, min(start + config.batch_size, len(examples)), len(examples))
  return counts


def select(examples: Sequence[Example], policy: Policy, config: SelectionConfig, judge=None) -> list[Decision]:
  """One ``Decision`` per example, in order (see the module docstring)."""
  k = config.k
  solved = _solved(list(examples), policy, config, "tool", judge, 0)
  decisions = []
  for e, s in zip(examples, solved):
    reason = "never_solved" if s == 0 else "always_solved" if s == k else "kept"
    decisions.append(Decision(e.uid, e.data_source, reason == "kept", reason, k, s))
  if not config.tool_filter:
    return decisions
  boxed = [(d, e) for d, e in zip(decisions, examples) if d.kept and gt_box(e) is not None]
  for d, e in zip(decisions, examples):
    if d.kept and gt_box(e) is None:
      d.reason = "kept_no_box" if config.missing_box == "keep" else "no_box"
      d.kept = config.missing_box == "keep"
  if boxed:
    ex = [e for _, e in boxed]
    no_tool = _solved(ex, policy, config, "no_tool", judge, 1)
    with_crop = _solved(ex, policy, config, "crop", judge, 2)
    for (d, _), nt, cr in zip(boxed, no_tool, with_crop):
      d.solved_no_tool, d.solved_crop = nt, cr
      if nt / k > config.no_tool_max:
        d.kept, d.reason = False, "solved_without_tool"
      elif cr / k < config.crop_min or cr <= nt:
        d.kept, d.reason = False, "crop_does_not_help"
  return decisions


def report(decisions: Sequence[Decision]) -> str:
  """'kept 2 of 6' then counts per reason and per data source, then one line per item."""
  kept = sum(d.kept for d in decisions)
  lines = [f"kept {kept} of {len(decisions)} items"]
  for reason, n in sorted(collections.Counter(d.reason for d in decisions).items()):
    lines.append(f"  {reason}: {n}")
  by_source = collections.defaultdict(lambda: [0, 0])
  for d in decisions:
    by_source[d.data_source][0] += d.kept
    by_source[d.data_source][1] += 1
  lines += [f"  data_source {s}: kept {a} of {b}" for s, (a, b) in sorted(by_source.items())]
  for d in decisions:
    extra = "" if d.solved_no_tool is None else f", no tool {d.solved_no_tool}/{d.k}, with crop {d.solved_crop}/{d.k}"
    lines.append(f"{'KEEP' if d.kept else 'drop'} {d.uid}: {d.reason} (tool {d.solved}/{d.k}{extra})")
  return "\n".join(lines)


def write_selection(records: Sequence[dict], decisions: Sequence[Decision], out_path: str) -> tuple[str, str]:
  """Kept raw records (with a ``selection`` column) -> ``out_path`` (parquet); every decision -> ``<out>.jsonl``."""
  from deepeyes_jax.data.deepeyes import write_deepeyes_parquet

  if len(records) != len(decisions):
    raise ValueError(f"{len(records)} records but {len(decisions)} decisions")
  kept = [{**r, "selection": dataclasses.asdict(d)} for r, d in zip(records, decisions) if d.kept]
  os.makedirs(os.path.dirname(os.path.abspath(out_path)) or ".", exist_ok=True)
  write_deepeyes_parquet(out_path, kept)
  jsonl = os.path.splitext(out_path)[0] + ".decisions.jsonl"
  with open(jsonl, "w") as f:
    for d in decisions:
      f.write(json.dumps(dataclasses.asdict(d)) + "\n")
  return out_path, jsonl
