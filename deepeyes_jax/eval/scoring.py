"""How a benchmark item is shown to the model and how its answer is scored.

Prompts (SPEC.md section 2, "Eval user text"): a multiple-choice item is shown as
``"Question: {q}\\nOptions: {opts}\\n" + USER_SUFFIX`` (``prompts.eval_user_text``) after the image, with the
DeepEyes system prompt. An open item (POPE's yes/no) is shown as ``"\\n" + q + USER_SUFFIX``, the layout of the
DeepEyes training prompts (``<image>\\n{question}{suffix}``). A DeepEyes-format item keeps its own messages.

Option order: shuffled per item with a permutation drawn from ``crc32(seed, item id)`` (so it does not depend on
the batch, the process or the resume point). ``shuffle=False`` keeps the release order, which for V* puts the
correct option always at ``A`` -- what the original DeepEyes evaluation did, and what inflated its V* number.

``--no-tool`` baseline: the plain Qwen system prompt (no tool schema), one assistant turn, and the usual
Qwen2.5-VL benchmark instruction instead of the DeepEyes suffix; the answer is the ``<answer>`` content when the
model writes one, else its whole reply (``<think>`` blocks removed).

Scoring: rule first (``rewards.rule_verdict`` with the shown options, so ``"B"``, ``"(B)"``, ``"B. red car"`` and
``"red car"`` all match option B; POPE: a leading yes / no), then the judge (any object with
``judge(question, answer, ground_truth) -> bool | None``, i.e. ``rl.judge.Judge``) only when the rule cannot
decide. A DeepEyes-format item is scored by its data source's reward function (``rewards.compute_reward``'s acc).
"""

from __future__ import annotations

import dataclasses
import re
import zlib

import numpy as np

from deepeyes_jax.agent import prompts
from deepeyes_jax.data.benchmarks import LETTERS, BenchmarkItem
from deepeyes_jax.rl import rewards

NO_TOOL_SYSTEM_PROMPT = "You are a helpful assistant."
NO_TOOL_CHOICE_SUFFIX = "\nAnswer with the option's letter from the given choices directly."
NO_TOOL_OPEN_SUFFIX = "\nAnswer the question using a single word or phrase."

_THINK_RE = re.compile(r"<think>.*?</think>", re.DOTALL)
_SPECIAL_RE = re.compile(r"<\|im_end\|>|<\|endoftext\|>")
_YES_NO_RE = re.compile(r"^\W*(yes|no)\b", re.IGNORECASE)


@dataclasses.dataclass(frozen=True)
class Shown:
  """One item as the model sees it. ``order[j]`` is the release index of the option shown at letter j;
  ``ground_truth`` is what the rule compares against (the shown letter of the correct option, or the open answer);
  ``judge_truth`` is what the judge sees (``"B. red car"``); ``match_question`` lists the shown options so that the
  rule can map an option's text to its letter."""

  user_text: str
  system_prompt: str
  order: tuple[int, ...]
  options: tuple[str, ...]
  ground_truth: str
  judge_truth: str
  match_question: str


def option_order(item_id: str, n: int, seed: int, shuffle: bool) -> list[int]:
  """The displayed order of ``n`` options: identity, or a permutation seeded by (seed, item id)."""
  if not shuffle:
    return list(range(n))
  rng = np.random.default_rng(zlib.crc32(f"{seed}\x00{item_id}".encode()))
  return [int(i) for i in rng.permutation(n)]


def show(item: BenchmarkItem, *, seed: int = 0, shuffle: bool = True, no_tool: bool = False) -> Shown:
  """How ``item`` is presented (see the module docstring)."""
  if item.options:
    if item.answer_index is None or not 0 <= item.answer_index < len(item.options):
      raise ValueError(f"item {item.item_id!r}: answer_index {item.answer_index} does not name one of its options")
    order = option_order(item.item_id, len(item.options), seed, shuffle)
    options = tuple(item.options[i] for i in order)
    letter = LETTERS[order.index(item.answer_index)]
    if no_tool:
      opts = "".join(f"{LETTERS[j]}. {o}\n" for j, o in enumerate(options))
      user_text = f"{item.question}\n{opts}" + NO_TOOL_CHOICE_SUFFIX.lstrip("\n")
    else:
      user_text = prompts.eval_user_text(item.question, list(options))
    lines = "".join(f"\n{LETTERS[j]}. {o}" for j, o in enumerate(options))
    return Shown(
      user_text=user_text,
      system_prompt=NO_TOOL_SYSTEM_PROMPT if no_tool else prompts.SYSTEM_PROMPT,
      order=tuple(order),
      options=options,
      ground_truth=letter,
      judge_truth=f"{letter}. {item.answer}",
      match_question=item.question + lines,
    )
  user_text = item.question + NO_TOOL_OPEN_SUFFIX if no_tool else "\n" + item.question + prompts.USER_SUFFIX
  return Shown(
    user_text=user_text,
    system_prompt=NO_TOOL_SYSTEM_PROMPT if no_tool else prompts.SYSTEM_PROMPT,
    order=(),
    options=(),
    ground_truth=item.answer,
    judge_truth=item.answer,
    match_question=item.question,
  )


def final_answer(answer: str | None, last_turn_text: str, no_tool: bool) -> str | None:
  """The answer to score: the ``<answer>`` content the agent found; in no-tool mode, when there is none, the
  whole last reply without ``<think>`` blocks and special tokens (a plain Qwen reply has no tags)."""
  if answer is not None and answer.strip():
    return answer.strip()
  if not no_tool:
    return None
  text = _SPECIAL_RE.sub("", _THINK_RE.sub("", last_turn_text)).strip()
  return text or None


@dataclasses.dataclass(frozen=True)
class Verdict:
  """``correct``; ``how``: ``rule`` | ``judge`` | ``no_answer`` | ``undecided`` (rule could not decide and no judge
  verdict: scored wrong) | ``reward`` (a DeepEyes-format item scored by its reward function)."""

  correct: bool
  how: str


def _yes_no(text: str) -> str | None:
  m = _YES_NO_RE.match(text)
  return m.group(1).lower() if m else None


def score_answer(answer: str | None, shown: Shown, judge=None, question: str = "") -> Verdict:
  """Rule match against ``shown.ground_truth``, then the judge when the rule cannot decide."""
  if answer is None:
    return Verdict(False, "no_answer")
  if len(answer) >= rewards.MAX_ANSWER_CHARS:  # as in training: a huge answer is not matched (judge hacking)
    return Verdict(False, "rule")
  if shown.ground_truth.lower() in ("yes", "no") and not shown.options:
    said = _yes_no(answer)
    if said is not None:
      return Verdict(said == shown.ground_truth.lower(), "rule")
  verdict = rewards.rule_verdict(answer, shown.ground_truth, shown.match_question)
  if verdict is not None:
    return Verdict(bool(verdict), "rule")
  if judge is not None:
    judged = judge.judge(shown.match_question or question, answer, shown.judge_truth)
    if judged is not None:
      return Verdict(bool(judged), "judge")
  return Verdict(False, "undecided")


def score_with_reward(item: BenchmarkItem, response: str, num_successful_tool_calls: int, judge=None) -> Verdict:
  """A DeepEyes-format item: ``acc`` of its data source's reward function (rule, then judge, as in training)."""
  result = rewards.compute_reward(
    item.data_source,
    response,
    item.answer,
    num_successful_tool_calls=num_successful_tool_calls,
    judge=judge,
    question=item.question,
    default="vstar",
  )
  if result.answer is None:
    return Verdict(False, "no_answer")
  return Verdict(result.acc == 1.0, "judge" if result.judged else "reward")
