"""How a benchmark item is shown to the model and how its answer is scored.

Prompts (docs/reference.md, "Prompts"): a multiple-choice item is shown as
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
``judge(question, answer, ground_truth) -> bool | None``, i.e. ``reward.judge.Judge``) only when the rule cannot
decide. A DeepEyes-format item is scored by its data source's reward function (``rewards.compute_reward``'s acc).
"""

from __future__ import annotations

import dataclasses
import re
import zlib
from collections.abc import Mapping, Sequence

import numpy as np

from deepeyes_jax.agent import prompts
from deepeyes_jax.agent.prompts import NO_TOOL_CHOICE_SUFFIX, NO_TOOL_OPEN_SUFFIX, NO_TOOL_SYSTEM_PROMPT
from deepeyes_jax.agent.rollout import Task
from deepeyes_jax.agent.trajectory import Trajectory
from deepeyes_jax.data.benchmarks import LETTERS, BenchmarkItem
from deepeyes_jax.reward import rewards

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
  verdict: scored wrong) | ``reward`` (a DeepEyes-format item scored by its reward function) | ``error`` (scoring
  raised; see ``error``); ``reward``: the total
  reward when a reward function scored it; ``answer``: the answer that was scored (None: none found)."""

  correct: bool
  how: str
  reward: float | None = None
  answer: str | None = None
  error: str | None = None  # how == "error": scoring this sample raised (the message); counted, scored wrong


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
    return Verdict(False, "no_answer", reward=float(result.total))
  return Verdict(result.acc == 1.0, "judge" if result.judged else "reward", reward=float(result.total))


# ----------------------------------------------------------------------------------------------------------------
# Scorers: ``scorer(tasks, trajectories) -> verdicts`` (trajectories in (task, sample) order), the interface of
# ``eval.loop.run``.


def response_text(traj: Trajectory, tokenizer) -> str:
  """Everything after the prompt, special tokens kept: what a reward function scores."""
  return tokenizer.decode(traj.token_ids[traj.prompt_length :].tolist(), skip_special_tokens=False)


class RewardScorer:
  """DeepEyes-format data: ``acc`` of the reward function of the trajectory's ``data_source`` (rule, then the judge;
  judge questions of a batch are sent together). ``plain=True``: a one-turn plain reply (no tags; the no-tool and
  crop conditions of data selection) whose answer (``final_answer``) is wrapped as that reward expects it.
  ``default``: the reward of an unknown data source (None: an unknown source raises)."""

  def __init__(self, tokenizer, judge=None, *, plain: bool = False, default: str | None = None):
    self.tokenizer, self.judge, self.plain, self.default = tokenizer, judge, plain, default

  def _response(self, traj: Trajectory) -> tuple[str, str | None]:
    text = response_text(traj, self.tokenizer)
    if not self.plain:
      return text, traj.answer
    answer = final_answer(rewards.response_answer(text), text, no_tool=True)
    fn = rewards.get_reward_fn(traj.metadata["data_source"], default=self.default)
    wrapped = f"\\boxed{{{answer or ''}}}" if fn is rewards.math_reward else f"<answer>{answer or ''}</answer>"
    return wrapped, answer

  def __call__(self, tasks: Sequence[Task], trajs: Sequence[Trajectory]) -> list[Verdict]:
    del tasks  # what the reward needs travels in each trajectory's metadata
    responses = [self._response(t) for t in trajs]
    items = [
      rewards.RewardItem(
        data_source=t.metadata["data_source"],
        response=text,
        ground_truth=t.metadata["ground_truth"],
        num_successful_tool_calls=t.num_successful_tool_calls,
        question=t.metadata.get("question"),
      )
      for t, (text, _) in zip(trajs, responses)
    ]
    results = rewards.score_batch(items, judge=self.judge, default=self.default)
    out = []
    for (_, answer), r in zip(responses, results):
      how = "no_answer" if r.answer is None else "judge" if r.judged else "reward"
      out.append(Verdict(r.acc == 1.0, how, reward=float(r.total), answer=answer))
    return out


class BenchmarkScorer:
  """Benchmark items as ``show`` presented them (``shown`` by item id): the rule, then the judge; a DeepEyes-format
  item (its own messages) by its data source's reward function."""

  def __init__(
    self,
    items: Mapping[str, BenchmarkItem],
    shown: Mapping[str, Shown],
    *,
    tokenizer=None,
    judge=None,
    no_tool: bool = False,
  ):
    self.items, self.shown, self.tokenizer, self.judge, self.no_tool = items, shown, tokenizer, judge, no_tool

  def __call__(self, tasks: Sequence[Task], trajs: Sequence[Trajectory]) -> list[Verdict]:
    del tasks
    return [self.score(t) for t in trajs]

  def score(self, traj: Trajectory) -> Verdict:
    item = self.items[traj.task_id]
    if item.messages is not None:
      v = score_with_reward(item, response_text(traj, self.tokenizer), traj.num_successful_tool_calls, self.judge)
      return dataclasses.replace(v, answer=traj.answer)
    last = traj.turns[-1].text if traj.turns else ""
    answer = final_answer(traj.answer, last, self.no_tool)
    return dataclasses.replace(score_answer(answer, self.shown[traj.task_id], self.judge, item.question), answer=answer)
