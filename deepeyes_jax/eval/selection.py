"""DeepEyes' tool-use-oriented data selection (docs/reference.md, "Data").

For each DeepEyes-format item, with a given policy (a checkpoint through ``loop.agent_rollouts``, or a scripted
rollout function):

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

A thin caller of ``eval.loop.run`` (task builders ``tasks.mode_task``, scorer ``scoring.RewardScorer``).
``select(...)`` returns one ``Decision`` per item; ``write_selection`` writes the kept records (unchanged, plus a
``selection`` column with the statistics) as parquet and every decision as JSON lines.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
from collections.abc import Sequence

from deepeyes_jax.data.deepeyes import Example, write_deepeyes_parquet
from deepeyes_jax.eval import loop, scoring
from deepeyes_jax.eval import tasks as tasks_lib
from deepeyes_jax.eval.loop import RolloutFn
from deepeyes_jax.eval.tasks import gt_box


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


def _solved(examples, rollout_fn, tokenizer, config, mode, judge, seed_offset) -> list[int]:
  """Correct samples out of k for each example in ``mode`` (see ``tasks.MODES``)."""
  records = loop.run(
    examples,
    lambda e: tasks_lib.mode_task(e, mode),
    rollout_fn,
    scoring.RewardScorer(tokenizer, judge, plain=mode != "tool", default="vstar"),
    item_id=lambda e: e.uid,
    group_size=config.k,
    seed=config.seed + seed_offset,
    batch_size=config.batch_size,
    label=f"selection ({mode})",
  )
  return [sum(s["correct"] for s in r["samples"]) for r in records]


def select(
  examples: Sequence[Example],
  rollout_fn: RolloutFn,
  one_turn_fn: RolloutFn,
  tokenizer,
  config: SelectionConfig,
  judge=None,
) -> list[Decision]:
  """One ``Decision`` per example, in order (see the module docstring). ``rollout_fn``: the agent with the tool
  (``loop.agent_rollouts``); ``one_turn_fn``: the same agent limited to one turn (the no-tool and crop conditions);
  ``tokenizer`` decodes the responses for the reward functions."""
  k = config.k
  solved = _solved(list(examples), rollout_fn, tokenizer, config, "tool", judge, 0)
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
    no_tool = _solved(ex, one_turn_fn, tokenizer, config, "no_tool", judge, 1)
    with_crop = _solved(ex, one_turn_fn, tokenizer, config, "crop", judge, 2)
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
