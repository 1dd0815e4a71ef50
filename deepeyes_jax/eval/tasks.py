"""Agent tasks, one builder per way of asking a question: with the zoom tool, without it, with the ground-truth crop.

Every evaluation (held-out during training, benchmarks, data selection) and the trainer build their tasks here:

- ``record_task(example)``: a DeepEyes-format record (training data, held-out split, selection) asked with its own
  prompt, byte for byte, and the zoom tool. Its metadata carries what the reward needs (``data_source``,
  ``ground_truth``, ``question``) and the record's scalar ``extra_info`` fields (e.g. the synthetic ``target_box``).
- ``tags_no_tool_task(task)``: the same question with no tool offered and one turn, asked for the DeepEyes answer
  format (``prompts.no_tool_messages``): what the held-out "no tool" column measures.
- ``plain_task(example, crop_box=None)``: one plain Qwen turn, no tool (``prompts.NO_TOOL_SYSTEM_PROMPT`` and the
  Qwen2.5-VL short-answer instruction), optionally with the ground-truth crop shown after the image: the no-tool and
  crop conditions of data selection.
- ``benchmark_task(item, shown)``: a benchmark item as ``scoring.show`` presents it (options shuffled or not, tool or
  no tool); a DeepEyes-format item keeps its own messages.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from PIL import Image

from deepeyes_jax.agent import prompts
from deepeyes_jax.agent.rollout import Task

MODES = ("tool", "no_tool", "crop")
MIN_CROP_SIDE = 28  # one 28-px patch block: a smaller crop is grown around its centre


def _scalars(d: dict) -> dict:
  return {k: v for k, v in d.items() if isinstance(v, (str, int, float, bool))}


def record_task(example) -> Task:
  """A data-pipeline ``Example`` (a DeepEyes record) -> a tool task with the record's messages byte for byte.

  The metadata holds the scalar ``extra_info`` fields and scalar columns of the record, then ``data_source`` /
  ``ground_truth`` / ``question`` (which win over a column of the same name)."""
  extra = example.extra or {}
  return Task(
    task_id=example.uid,
    image=example.images[0],
    messages_override=example.messages,
    metadata={
      **_scalars(extra.get("extra_info") or {}),
      **_scalars(extra),
      "data_source": example.data_source,
      "ground_truth": example.ground_truth,
      "question": example.question,
    },
  )


def tags_no_tool_task(task: Task) -> Task:
  """``task`` asked with no tool, in the DeepEyes answer format (``prompts.no_tool_messages``; the question from
  ``task.metadata["question"]``)."""
  return dataclasses.replace(task, messages_override=prompts.no_tool_messages(task.image, task.metadata["question"]))


def gt_box(example) -> list[float] | None:
  """``extra_info.bbox`` of a DeepEyes record as ``[x1, y1, x2, y2]`` (original pixels), or None."""
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


def plain_task(example, crop_box: Sequence[float] | None = None) -> Task:
  """One plain Qwen turn, no tool: the image (and the crop of ``crop_box`` after it), then the question with the
  short-answer instruction. Metadata as ``record_task``'s."""
  content = [{"type": "image", "image": example.images[0]}]
  if crop_box is not None:
    content.append({"type": "image", "image": crop(example.images[0], crop_box)})
  content.append({"type": "text", "text": example.question + prompts.NO_TOOL_OPEN_SUFFIX})
  messages = [{"role": "system", "content": prompts.NO_TOOL_SYSTEM_PROMPT}, {"role": "user", "content": content}]
  return dataclasses.replace(record_task(example), messages_override=messages)


def mode_task(example, mode: str) -> Task:
  """The task of one of ``MODES`` for a DeepEyes record (``crop`` needs ``gt_box(example)``)."""
  if mode == "tool":
    return record_task(example)
  if mode == "no_tool":
    return plain_task(example)
  if mode == "crop":
    box = gt_box(example)
    if box is None:
      raise ValueError(f"{example.uid}: mode 'crop' needs extra_info.bbox")
    return plain_task(example, box)
  raise ValueError(f"mode must be one of {MODES}, got {mode!r}")


def benchmark_task(item, shown) -> Task:
  """The task for a benchmark item as ``shown`` (``scoring.show``); decodes its image (raises ``ImageError`` /
  ``OSError`` for a corrupt one)."""
  image = item.load_image()
  meta = {"benchmark": item.benchmark, "category": item.category, "ground_truth": shown.ground_truth}
  if item.messages is not None:  # a DeepEyes record: its own prompt, byte for byte
    return Task(task_id=item.item_id, image=image, messages_override=item.messages, metadata=meta)
  return Task(
    task_id=item.item_id, image=image, user_text=shown.user_text, system_prompt=shown.system_prompt, metadata=meta
  )
