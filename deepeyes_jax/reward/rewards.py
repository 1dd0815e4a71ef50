"""DeepEyes rewards, per data source (docs/reference.md, "Reward").

=============================================  ==========================================
data_source                                    reward
=============================================  ==========================================
``vstar``, ``chart`` (alias ``vl_agent``)      ``0.8*acc + 0.2*fmt + 1.2*tool``
``thinklite_eureka`` (alias ``xince``)         ``1.2*acc + 0.4*fmt`` (answer = last ``\\boxed{}``)
=============================================  ==========================================

* ``fmt`` is 0 or -1 (:func:`format_errors` lists the four rules);
* ``acc`` is 0 or 1: a rule-based match first (:func:`rule_verdict`; :func:`math_equal` via ``math-verify`` for the
  math source); when the rule cannot decide and a judge is given, the LLM judge (``judge.LLMJudge``) decides, for
  the non-math sources; when the judge is unavailable, the rule result stands and ``details["judge"]`` is
  ``"unavailable"``;
* ``tool`` is 1 only if at least one crop succeeded AND ``acc`` is 1 (the conditional tool bonus).

``response`` is the decoded text of everything after the prompt: every assistant turn and the observations between
them (so it holds the ``<|vision_start|>...<|vision_end|>`` of each crop and, in each successful observation, the
user suffix ``... <think>...</think> ... <answer>...</answer> ``).

What the original code (Visual-Agent/DeepEyes ``verl/utils/reward_score/vl_agent.py``, ``compute_score`` and
``compute_score_math``) does, and where we differ:

* vstar/chart: it never rule-matches -- every answer goes to the judge (few-shot, temperature 0.3, an unparseable
  reply scores 0). We rule-match first and only ask the judge when the rule cannot decide; a definite mismatch
  (different option letters, different numbers, yes vs no) is not sent to the judge.
* Its answer is ``response.split("<answer>")[-1].split("</answer>")[0]``, which is the whole response when there
  is no ``<answer>`` and runs to the end when the last ``<answer>`` is unclosed. We follow the spec: the text between
  the last ``<answer>`` and the following ``</answer>``, else None. We also skip observation turns
  (``<|im_start|>user ... <|im_end|>``) when looking for it, because every crop observation repeats the format
  suffix's literal ``<answer>...</answer>``, which would otherwise become the answer ``"..."``.
* Its vision check counts ``<|vision_start|><|image_pad|>`` against ``<|image_pad|><|vision_end|>``; the spec (and
  we) count ``<|vision_start|>`` against ``<|vision_end|>``. Its tool bonus tests ``count(vision_start) > 0`` in the
  response; we take the number of successful crops from the rollout (``num_successful_tool_calls``).
* An answer of >= 1000 characters is a format error AND scores ``acc = 0`` in the original ("penalize ... longer
  answer to hack llm-as-judge"); we keep both.
* math: the original applies only the think-tag rule, adds a format error when there is no ``\\boxed{}`` or more
  than one, takes ``\\boxed{([^}]+)}`` (no nested braces) after the last ``</think>``, and asks a second LLM prompt
  ("## Equivalence Judgement TRUE/FALSE", temperature 0) when math-verify says no. We apply the spec's four format
  rules to every source, extract the last ``\\boxed{}`` with balanced braces, and do not use a judge for math.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
import math
import re
import threading
import unicodedata
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from deepeyes_jax.registry import Registry, UnknownNameError
from deepeyes_jax.reward.judge import Judge

try:  # math-verify (HuggingFace): LaTeX/sympy equivalence for the math source.
  from math_verify import parse as _mv_parse
  from math_verify import verify as _mv_verify
except ImportError:  # pragma: no cover - exercised by monkeypatching in the tests
  _mv_parse = _mv_verify = None

logger = logging.getLogger(__name__)

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
ANSWER_OPEN, ANSWER_CLOSE = "<answer>", "</answer>"
VISION_START, VISION_END = "<|vision_start|>", "<|vision_end|>"
MAX_ANSWER_CHARS = 1000  # an answer this long (or longer) is a format error and scores acc = 0
MATH_VERIFY_TIMEOUT_S = 5  # math-verify's own (signal-based, main thread only) timeout


@dataclasses.dataclass(frozen=True)
class RewardWeights:
  """``total = acc * acc_weight + fmt * fmt_weight + tool * tool_weight``."""

  acc: float
  fmt: float
  tool: float


VISUAL_WEIGHTS = RewardWeights(acc=0.8, fmt=0.2, tool=1.2)
MATH_WEIGHTS = RewardWeights(acc=1.2, fmt=0.4, tool=0.0)


@dataclasses.dataclass
class RewardResult:
  """One scored response. ``judged``: ``acc`` came from the LLM judge. ``details``: how it was decided, e.g.
  ``format_errors`` (list of rule names), ``rule`` (``match``/``mismatch``/``undecided``/``no_answer``/...),
  ``judge`` (``not_needed``/``none``/``ok``/``unavailable``/``not_used``), ``data_source``."""

  total: float
  acc: float
  fmt: float
  tool: float
  answer: str | None
  judged: bool = False
  details: dict[str, Any] = dataclasses.field(default_factory=dict)


# --- extraction ----------------------------------------------------------------------------------------------
_OBSERVATION_RE = re.compile(r"<\|im_start\|>user\n.*?(?:<\|im_end\|>|\Z)", re.DOTALL)


def assistant_text(response: str) -> str:
  """``response`` without its observation turns (``<|im_start|>user ... <|im_end|>``): the model's own text."""
  return _OBSERVATION_RE.sub("", response)


def response_answer(response: str) -> str | None:
  """The stripped text between the last ``<answer>`` and the ``</answer>`` that follows it; None when there is no
  ``<answer>`` or the last one is not closed. Observation turns are skipped (see the module doc)."""
  text = assistant_text(response)
  start = text.rfind(ANSWER_OPEN)
  if start < 0:
    return None
  start += len(ANSWER_OPEN)
  end = text.find(ANSWER_CLOSE, start)
  if end < 0:
    return None
  return text[start:end].strip()


_BOXED_RE = re.compile(r"\\boxed\s*\{")
_BRACE_RE = re.compile(r"\\.|[{}]", re.DOTALL)  # an escaped character (skipped), or a brace


def extract_boxed(text: str) -> str | None:
  """The content of the last complete ``\\boxed{...}`` in ``text`` (braces balanced, ``\\{``/``\\}`` skipped), or
  None. ``\\boxed{\\frac{1}{2}}`` -> ``\\frac{1}{2}``; an unclosed last ``\\boxed{`` is ignored.

  "Last" is the last ``\\boxed{`` that closes (``\\boxed{\\boxed{1}}`` gives ``1``). One pass over the text with a
  stack of the open boxes, in linear time: a brace scan from each ``\\boxed{`` to its end would be quadratic on a
  text of many unclosed ones. A scan from an earlier box always passes through each later box's ``{`` (a ``{``
  never follows a backslash there), so every box's own scan is a suffix of the one pass.
  """
  starts = [m.end() for m in _BOXED_RE.finditer(text)]
  if not starts:
    return None
  found, found_k = None, -1
  open_boxes: list[tuple[int, int]] = []  # (box index, depth inside it), innermost last
  depth, k = 0, 0
  for m in _BRACE_RE.finditer(text, starts[0] - 1):
    while k < len(starts) and starts[k] <= m.start():
      open_boxes.append((k, depth))  # the box's "{" was the last brace counted
      k += 1
    c = m.group()
    if c == "{":
      depth += 1
    elif c == "}":
      depth -= 1
      if open_boxes and depth == open_boxes[-1][1] - 1:
        j = open_boxes.pop()[0]
        if j > found_k:
          found, found_k = text[starts[j] : m.start()].strip(), j
  return found


# --- format --------------------------------------------------------------------------------------------------
def format_errors(response: str, answer: str | None = None) -> list[str]:
  """The format rules ``response`` breaks (empty list: none). Each rule, as in docs/reference.md, "Reward":

  * ``"think_tags"``: the numbers of ``<think>`` and ``</think>`` differ;
  * ``"vision_tags"``: the numbers of ``<|vision_start|>`` and ``<|vision_end|>`` differ;
  * ``"answer_tags"``: after the last ``</think>`` (the whole response if there is none), the numbers of
    ``<answer>`` and ``</answer>`` differ;
  * ``"answer_too_long"``: the answer has >= 1000 characters. ``answer`` is the extracted final answer (the
    ``\\boxed{}`` content for math); None means ``response_answer(response)``. No answer breaks no rule here.

  The tag rules count over the whole response, observations included (each observation's format suffix holds a
  balanced ``<think>...</think>`` and ``<answer>...</answer>`` pair, so it changes no count difference).
  """
  errors = []
  if response.count(THINK_OPEN) != response.count(THINK_CLOSE):
    errors.append("think_tags")
  if response.count(VISION_START) != response.count(VISION_END):
    errors.append("vision_tags")
  tail = response.rsplit(THINK_CLOSE, 1)[-1]
  if tail.count(ANSWER_OPEN) != tail.count(ANSWER_CLOSE):
    errors.append("answer_tags")
  if answer is None:
    answer = response_answer(response)
  if answer is not None and len(answer) >= MAX_ANSWER_CHARS:
    errors.append("answer_too_long")
  return errors


def format_score(response: str, answer: str | None = None) -> float:
  """0.0 when ``response`` follows every rule of :func:`format_errors`, else -1.0."""
  return -1.0 if format_errors(response, answer) else 0.0


# --- short answers -------------------------------------------------------------------------------------------
_ARTICLES = frozenset({"a", "an", "the"})
_NUMBER_WORDS = {
  w: i
  for i, w in enumerate(
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
    "seventeen eighteen nineteen twenty".split()
  )
}
_NUMBER_WORDS.update({"thirty": 30, "forty": 40, "fifty": 50, "sixty": 60, "seventy": 70, "eighty": 80, "ninety": 90})
_NUMBER_WORDS.update({"hundred": 100, "thousand": 1000})
_FLOAT_RE = re.compile(r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:e[-+]?\d+)?")
_THOUSANDS_RE = re.compile(r"[-+]?\d{1,3}(?:,\d{3})+(?:\.\d+)?")
_FRACTION_RE = re.compile(r"([-+]?\d+)\s*/\s*(\d+)")
MAX_NUMBER_DIGITS = 1000  # an integer of a fraction with more significant digits is not parsed (parse_number: None)
_TOKEN_RE = re.compile(r"\d+(?:[.,/:]\d+)*|[^\W_]+")


def parse_number(text: str) -> float | None:
  """A number written alone: ``3``, ``3.0``, ``-2.5``, ``1e3``, ``1,000``, ``1/2``, ``50%`` (-> 50: a percent sign is
  dropped, so ``50%`` == ``50`` but != ``0.5``), ``$5``, or one number word (``zero`` ... ``twenty``, the tens,
  ``hundred``, ``thousand``). Anything else (``3 cars``, ``about 3``) gives None, and so does a fraction whose
  value a float cannot hold or whose integers have more than ``MAX_NUMBER_DIGITS`` significant digits (never an
  exception, whatever the text)."""
  s = unicodedata.normalize("NFKC", text).strip().lower().replace("\u2212", "-")
  s = s.strip("$ ").rstrip(".").strip()
  if s.endswith("%"):
    s = s[:-1].strip()
  if s in _NUMBER_WORDS:
    return float(_NUMBER_WORDS[s])
  if _THOUSANDS_RE.fullmatch(s):
    s = s.replace(",", "")
  if _FLOAT_RE.fullmatch(s):
    return float(s)
  m = _FRACTION_RE.fullmatch(s)
  if m is None:
    return None
  sign = -1 if m.group(1).startswith("-") else 1
  num, den = (g.lstrip("+-").lstrip("0") or "0" for g in m.groups())  # int() limits digits, leading zeros too
  if max(len(num), len(den)) > MAX_NUMBER_DIGITS or den == "0":
    return None
  try:
    return sign * int(num) / int(den)
  except OverflowError:  # e.g. 10**400 / 1
    return None


def normalize_text(text: str) -> str:
  """Lower case (NFKC), punctuation and underscores dropped (kept inside numbers: ``3.5``, ``1,000``, ``1/2``,
  ``10:30``), the articles a/an/the dropped, whitespace collapsed: ``"The Red car."`` -> ``"red car"``."""
  tokens = _TOKEN_RE.findall(unicodedata.normalize("NFKC", text).lower())
  return " ".join(t for t in tokens if t not in _ARTICLES)


def _short_verdict(answer: str, ground_truth: str) -> bool | None:
  """True: same answer; False: certainly different; None: the rule cannot tell (a judge may)."""
  a_num, g_num = parse_number(answer), parse_number(ground_truth)
  if a_num is not None and g_num is not None:
    return math.isclose(a_num, g_num, rel_tol=1e-6, abs_tol=1e-9)
  a, g = normalize_text(answer), normalize_text(ground_truth)
  if not g:
    return None
  if not a:
    return False
  if a == g:
    return True
  a_first, g_first = a.split()[0], g.split()[0]
  yes_no = {"yes", "no"}
  if a_first in yes_no and g_first in yes_no and (a in yes_no or g in yes_no):
    return a_first == g_first  # "No" vs "No, the spots are on a banana." / "yes" vs "no"
  return None


def match_short(answer: str, ground_truth: str) -> bool:
  """Short-answer match. True when, after :func:`normalize_text`, the strings are equal (``"The red car."`` ==
  ``"red car"``); when both are numbers (:func:`parse_number`) that agree within 1e-6 relative (``3`` == ``3.0``
  == ``three``, ``1,000`` == ``1000``, ``1/2`` == ``0.5``); or when one side is a bare yes/no and the other starts
  with the same word (``"No"`` == ``"No, the door is closed."``). Containment (``"pink"`` in ``"not pink"``) is
  never a match: such cases go to the judge."""
  return _short_verdict(answer, ground_truth) is True


# --- multiple choice -----------------------------------------------------------------------------------------
_OPTION_LETTERS = "ABCDEFGHIJ"
_BARE_CHOICE_RE = re.compile(r"\(?([A-Ja-j])\)?[.:)]?")
_CHOICE_WITH_TEXT_RE = re.compile(r"(?:\(([A-J])\)|([A-J])[.:)])\s*(\S.*)", re.DOTALL)
_CHOICE_PHRASE_RE = re.compile(
  r"(?i:\b(?:answer|option|choice)\b(?:\s+is|\s*[:=])?\s*(?:option\s+)?)\(?([A-J])\)?(?!\w)"
)
# The option text runs to the end of the line and is right-stripped of spaces and tabs in Python: a lazy "(\S.*?)"
# followed by "[ \t]*$" is quadratic on a line with long runs of spaces.
_OPTION_LINE_RE = re.compile(r"^[ \t]*(?:\(([A-J])\)|([A-J])[.:)])[ \t]*(\S.*)$", re.MULTILINE)
_WRAPPED_RE = re.compile(r"\\(?:boxed|text|textbf|mathrm)\{(.*)\}", re.DOTALL)


def _clean(text: str) -> str:
  s = text.strip().strip("*`$\"' \t\n")
  m = _WRAPPED_RE.fullmatch(s)
  return m.group(1).strip() if m else s


def split_choice(text: str) -> tuple[str | None, str | None]:
  """``(letter, option_text)`` read from an answer or ground truth: ``"B"``, ``"(B)"``, ``"B."``, ``"b"`` -> (B,
  None); ``"B. red car"``, ``"(B) red car"``, ``"B) red car"`` -> (B, "red car"); ``"The answer is B"``,
  ``"Option (B)"`` -> (B, None); anything else -> (None, text). Letters are A-J; with text after them or inside a
  sentence they must be upper case (``"A red car"`` has no letter)."""
  s = _clean(text)
  m = _BARE_CHOICE_RE.fullmatch(s)
  if m:
    return m.group(1).upper(), None
  m = _CHOICE_WITH_TEXT_RE.fullmatch(s)
  if m:
    return m.group(1) or m.group(2), m.group(3).strip()
  phrases = list(_CHOICE_PHRASE_RE.finditer(s))
  if phrases:
    return phrases[-1].group(1), None
  return None, s


def parse_options(question: str | None) -> dict[str, str]:
  """Options listed one per line in ``question`` (``A. text``, ``(A) text``, ``A) text``, ``A: text``), as
  ``{"A": "text", ...}``; empty unless at least two consecutive letters from A were found."""
  if not question:
    return {}
  found: dict[str, str] = {}
  for m in _OPTION_LINE_RE.finditer(question):
    found.setdefault(m.group(1) or m.group(2), m.group(3).rstrip(" \t"))
  letters = sorted(found)
  if len(letters) < 2 or "".join(letters) != _OPTION_LETTERS[: len(letters)]:
    return {}
  return found


def _option_for_text(text: str, options: Mapping[str, str]) -> str | None:
  hits = [k for k, v in options.items() if _short_verdict(text, v) is True]
  return hits[0] if len(hits) == 1 else None


def _choice_verdict(answer: str, ground_truth: str, options: Mapping[str, str] | None) -> bool | None:
  options = options or {}
  g_letter, g_text = split_choice(ground_truth)
  if g_letter is None:
    g_text = _clean(ground_truth)
    g_letter = _option_for_text(g_text, options) if options else None
  elif g_text is None:
    g_text = options.get(g_letter)
  a_letter, a_text = split_choice(answer)
  if a_letter is None and a_text and options:
    a_letter = _option_for_text(a_text, options)  # the option's text without its letter
  if a_letter is not None and g_letter is not None:
    return a_letter == g_letter
  if a_text and g_text and _short_verdict(a_text, g_text) is True:
    return True
  return None


def match_choice(answer: str, ground_truth: str, options: Mapping[str, str] | None = None) -> bool:
  """Multiple-choice match. The letter is read from both sides (:func:`split_choice`): ``"B"``, ``"(B)"``,
  ``"B."``, ``"B. red car"``, ``"The answer is B"`` all match the ground truth ``"B"`` (or ``"B. red car"``); only
  the letters are compared when both sides have one. Without a letter on one side the option texts are compared
  with :func:`match_short` (``"red car"`` vs ``"B. red car"``); ``options`` (e.g. from :func:`parse_options`) maps
  a bare option text to its letter (``"red car"`` vs ``"B"`` with ``{"B": "red car"}``)."""
  return _choice_verdict(answer, ground_truth, options) is True


def rule_verdict(answer: str, ground_truth: str, question: str | None = None) -> bool | None:
  """The rule-based decision used for ``acc``: True (match), False (certain mismatch) or None (undecided).

  The multiple-choice rule decides first when it can (:func:`match_choice`, with the options parsed from
  ``question``: option letters on both sides, or a letter plus text on one side); otherwise the short-answer rule
  (:func:`match_short`)."""
  verdict = _choice_verdict(answer, ground_truth, parse_options(question))
  return verdict if verdict is not None else _short_verdict(answer, ground_truth)


# --- math ----------------------------------------------------------------------------------------------------
_LATEX_NOISE_RE = re.compile(r"\\left|\\right|\\displaystyle|\\!|\\,|\\;|\\quad|\s+")
_FRAC_RE = re.compile(r"\\[dt]?frac\{([^{}]*)\}\{([^{}]*)\}")
_TEXT_RE = re.compile(r"\\(?:text|mathrm|mbox)\{([^{}]*)\}")


def _latex_lite(s: str) -> str:
  s = s.strip().strip("$")
  inner = extract_boxed(s)
  s = inner if inner is not None else s
  s = _TEXT_RE.sub(r"\1", s)
  s = _LATEX_NOISE_RE.sub("", s)
  s = s.replace("^\\circ", "").replace("^{\\circ}", "").replace("°", "").replace("\\%", "%")
  return _FRAC_RE.sub(r"(\1)/(\2)", s)


def _fallback_math_equal(answer: str, ground_truth: str) -> bool:
  """Without math-verify: equal after light LaTeX clean-up, or equal as numbers (``\\frac{1}{2}`` == ``0.5``)."""
  a, g = _latex_lite(answer), _latex_lite(ground_truth)
  if a == g and a:
    return True
  a_num = parse_number(re.sub(r"\((-?\d+)\)/\((\d+)\)", r"\1/\2", a))
  g_num = parse_number(re.sub(r"\((-?\d+)\)/\((\d+)\)", r"\1/\2", g))
  return a_num is not None and g_num is not None and math.isclose(a_num, g_num, rel_tol=1e-6, abs_tol=1e-9)


def _latex_wrap(s: str) -> str:
  return s if any(t in s for t in ("$", "\\boxed", "\\(", "\\[")) else f"${s}$"


def math_verify_available() -> bool:
  return _mv_parse is not None and _mv_verify is not None


def math_equal(answer: str, ground_truth: str) -> bool:
  """Mathematical equivalence of ``answer`` and ``ground_truth`` (``\\frac{1}{2}`` == ``0.5`` == ``1/2``).

  Uses math-verify (``verify(parse(ground_truth), parse(answer))``, each side wrapped in ``$...$`` unless it already
  has math delimiters). math-verify's timeout relies on ``signal.alarm`` and works only in the main thread; in other
  threads it runs without a timeout. When math-verify is not installed or fails, a crude fallback compares the
  answers after light LaTeX clean-up and as plain numbers or integer fractions."""
  a, g = answer.strip(), ground_truth.strip()
  if a and a == g:
    return True
  a_num, g_num = parse_number(a.strip("$")), parse_number(g.strip("$"))
  if a_num is not None and g_num is not None:
    return math.isclose(a_num, g_num, rel_tol=1e-6, abs_tol=1e-9)
  if math_verify_available():
    timeout = MATH_VERIFY_TIMEOUT_S if threading.current_thread() is threading.main_thread() else None
    try:
      gold = _mv_parse(_latex_wrap(g), parsing_timeout=timeout)
      pred = _mv_parse(_latex_wrap(a), parsing_timeout=timeout)
      return bool(gold and pred and _mv_verify(gold, pred, timeout_seconds=timeout))
    except Exception as e:  # math-verify is best effort: never let one odd answer kill a training step
      logger.debug("math-verify failed on %r vs %r: %r", a, g, e)
  return _fallback_math_equal(a, g)


# --- registry ------------------------------------------------------------------------------------------------
RewardFn = Callable[..., RewardResult]
"""``fn(response, ground_truth, *, num_successful_tool_calls, judge, question) -> RewardResult``."""

REWARD_FNS: Registry[RewardFn] = Registry("reward function")


class UnknownDataSourceError(UnknownNameError):
  """No reward function is registered for a data source (a KeyError)."""


def register_reward(name: str, *aliases: str, overwrite: bool = False) -> Callable[[RewardFn], RewardFn]:
  """Decorator registering a reward function under ``name`` (and ``aliases``) in :data:`REWARD_FNS`.

  Registering a name that already has another function raises ValueError unless ``overwrite=True``."""
  return REWARD_FNS.register(name, *aliases, overwrite=overwrite)


def get_reward_fn(data_source: str, default: str | RewardFn | None = None) -> RewardFn:
  """The reward function for ``data_source`` (exact name, else its lower-cased stripped form).

  Unknown sources raise :class:`UnknownDataSourceError` (a KeyError) naming the source and the known ones, unless
  ``default`` is given: a registered name or a reward function to use instead."""
  for key in (data_source, str(data_source).strip().lower()):
    if key in REWARD_FNS:
      return REWARD_FNS[key]
  if default is not None:
    return default if callable(default) else get_reward_fn(default)
  raise UnknownDataSourceError(
    f"{REWARD_FNS.unknown_message(data_source)}. Register one with @register_reward({data_source!r}) or pass "
    "default=<a known source>."
  )


def _combine(weights: RewardWeights, acc: float, fmt: float, tool: float) -> float:
  return weights.acc * acc + weights.fmt * fmt + weights.tool * tool


# "synthetic_zoom": the embedded default's task (data/synthetic.py), scored as the fine-grained V* source. Registered
# here, with the others, so that importing a data module changes no registry.
@register_reward("vstar", "chart", "vl_agent", "synthetic_zoom")
def visual_reward(
  response: str,
  ground_truth: str,
  *,
  num_successful_tool_calls: int = 0,
  judge: Judge | None = None,
  question: str | None = None,
) -> RewardResult:
  """Fine-grained perception (V*) and charts: ``0.8*acc + 0.2*fmt + 1.2*tool``, tool only when correct."""
  answer = response_answer(response)
  errors = format_errors(response, answer)
  fmt = -1.0 if errors else 0.0
  details: dict[str, Any] = {"format_errors": errors}
  judged = False
  if answer is None:
    acc, details["rule"], details["judge"] = 0.0, "no_answer", "not_needed"
  elif len(answer) >= MAX_ANSWER_CHARS:
    acc, details["rule"], details["judge"] = 0.0, "answer_too_long", "not_needed"
  else:
    verdict = rule_verdict(answer, ground_truth, question)
    details["rule"] = {True: "match", False: "mismatch", None: "undecided"}[verdict]
    acc = 1.0 if verdict else 0.0
    if verdict is not None:
      details["judge"] = "not_needed"
    elif judge is None:
      details["judge"] = "none"
    else:
      judgement = judge.judge(question or "", answer, ground_truth)
      if judgement is None:
        details["judge"] = "unavailable"  # fall back to the rule result (undecided -> 0)
      else:
        acc, judged, details["judge"] = (1.0 if judgement else 0.0), True, "ok"
  tool = 1.0 if num_successful_tool_calls > 0 and acc == 1.0 else 0.0
  total = _combine(VISUAL_WEIGHTS, acc, fmt, tool)
  return RewardResult(total=total, acc=acc, fmt=fmt, tool=tool, answer=answer, judged=judged, details=details)


@register_reward("thinklite_eureka", "xince")
def math_reward(
  response: str,
  ground_truth: str,
  *,
  num_successful_tool_calls: int = 0,
  judge: Judge | None = None,
  question: str | None = None,
) -> RewardResult:
  """Math (ThinkLite-VL): ``1.2*acc + 0.4*fmt``; the answer is the last ``\\boxed{}`` after the last ``</think>``
  of the model's own text; acc from :func:`math_equal`; no judge, no tool bonus."""
  del num_successful_tool_calls, judge, question  # no tool bonus; no judge for math (see the module doc)
  answer = extract_boxed(assistant_text(response).rsplit(THINK_CLOSE, 1)[-1])
  errors = format_errors(response, answer)
  fmt = -1.0 if errors else 0.0
  details: dict[str, Any] = {"format_errors": errors, "judge": "not_used"}
  details["matcher"] = "math_verify" if math_verify_available() else "fallback"
  if answer is None:
    acc, details["rule"] = 0.0, "no_boxed"
  elif len(answer) >= MAX_ANSWER_CHARS:
    acc, details["rule"] = 0.0, "answer_too_long"
  else:
    acc = 1.0 if math_equal(answer, ground_truth) else 0.0
    details["rule"] = "match" if acc else "mismatch"
  total = _combine(MATH_WEIGHTS, acc, fmt, 0.0)
  return RewardResult(total=total, acc=acc, fmt=fmt, tool=0.0, answer=answer, judged=False, details=details)


# --- entry points --------------------------------------------------------------------------------------------
def compute_reward(
  data_source: str,
  response: str,
  ground_truth: Any,
  *,
  num_successful_tool_calls: int,
  judge: Judge | None = None,
  question: str | None = None,
  default: str | RewardFn | None = None,
) -> RewardResult:
  """Score one response with the reward function registered for ``data_source`` (see :func:`get_reward_fn` for
  ``default``). ``num_successful_tool_calls``: crops that succeeded in this trajectory (drives the tool bonus);
  ``judge``: an object with ``judge(question, answer, ground_truth) -> bool | None`` (e.g. ``LLMJudge``), asked only
  when the rule cannot decide; ``question``: the question text (for the judge, and options for choice matching).

  An exception raised inside the reward function (a plugin's bug, math-verify on an odd answer) is contained: the
  item scores 0 in every component, with ``details["error"] = "ExceptionType: message"`` (logged once per distinct
  message). An unknown ``data_source`` still raises :class:`UnknownDataSourceError` (a configuration error)."""
  if num_successful_tool_calls < 0:
    raise ValueError(f"num_successful_tool_calls must be >= 0, got {num_successful_tool_calls}")
  fn = get_reward_fn(data_source, default=default)
  gt = ground_truth if isinstance(ground_truth, str) else str(ground_truth)
  try:
    result = fn(response, gt, num_successful_tool_calls=int(num_successful_tool_calls), judge=judge, question=question)
  except Exception as e:  # one item's failure is that item's zero reward, not the batch's end
    error = f"{type(e).__name__}: {e}"
    _log_once(error, data_source)
    result = RewardResult(total=0.0, acc=0.0, fmt=0.0, tool=0.0, answer=None, details={"error": error})
  result.details.setdefault("data_source", data_source)
  return result


_LOGGED_ERRORS: set[str] = set()
_MAX_LOGGED_ERRORS = 1024  # distinct messages remembered (then forgotten all at once: memory stays bounded)


def _log_once(error: str, data_source: str) -> None:
  if error in _LOGGED_ERRORS:
    return
  if len(_LOGGED_ERRORS) >= _MAX_LOGGED_ERRORS:
    _LOGGED_ERRORS.clear()
  _LOGGED_ERRORS.add(error)
  logger.warning("scoring failed (data source %r), the item scores 0: %s", data_source, error)


@dataclasses.dataclass(frozen=True)
class RewardItem:
  """One response to score with :func:`score_batch`."""

  data_source: str
  response: str
  ground_truth: Any
  num_successful_tool_calls: int = 0
  question: str | None = None


def _as_item(item: RewardItem | Mapping[str, Any]) -> RewardItem:
  if isinstance(item, RewardItem):
    return item
  fields = {f.name for f in dataclasses.fields(RewardItem)}
  return RewardItem(**{k: v for k, v in item.items() if k in fields})


def _key(question: str | None, answer: str, ground_truth: str) -> tuple[str, str, str]:
  return ("" if question is None else str(question), str(answer), str(ground_truth))


class _RecordingJudge:
  """Pass 1 of :func:`score_batch`: records what would be asked, answers nothing."""

  def __init__(self):
    self.asked: list[tuple[str, str, str]] = []

  def judge(self, question: str | None, answer: str, ground_truth: str) -> bool | None:
    self.asked.append(_key(question, answer, ground_truth))
    return None


class _ReplayJudge:
  """Pass 2 of :func:`score_batch`: answers from the verdicts fetched concurrently."""

  def __init__(self, verdicts: Mapping[tuple[str, str, str], bool | None]):
    self.verdicts = verdicts

  def judge(self, question: str | None, answer: str, ground_truth: str) -> bool | None:
    return self.verdicts.get(_key(question, answer, ground_truth))


def score_batch(
  items: Iterable[RewardItem | Mapping[str, Any]],
  judge: Judge | None = None,
  max_workers: int | None = None,
  default: str | RewardFn | None = None,
) -> list[RewardResult]:
  """Score many responses (``RewardItem`` or mappings with its field names); results keep the input order.

  The rules (and math-verify) run in the calling thread; the judge questions of all items are collected first and
  sent together, concurrently: through ``judge.judge_many(requests, max_workers=...)`` when the judge has it
  (``LLMJudge`` does; ``max_workers`` None means its configured default), else a thread pool of ``max_workers``
  (default 16) over ``judge.judge``. Identical questions are asked once.

  An item whose reward function raises scores 0 with ``details["error"]`` (:func:`compute_reward`) and the others
  go on; when every item of a non-empty batch fails, that is no bad item but a broken set-up, and RuntimeError is
  raised with the first error."""
  batch = [_as_item(x) for x in items]

  def score(item: RewardItem, j: Judge | None) -> RewardResult:
    return compute_reward(
      item.data_source,
      item.response,
      item.ground_truth,
      num_successful_tool_calls=item.num_successful_tool_calls,
      judge=j,
      question=item.question,
      default=default,
    )

  if judge is None:
    return _raise_if_all_failed([score(item, None) for item in batch])
  recorder = _RecordingJudge()
  results, pending = [], []
  for i, item in enumerate(batch):
    before = len(recorder.asked)
    results.append(score(item, recorder))
    if len(recorder.asked) > before:
      pending.append(i)
  if not pending:
    return _raise_if_all_failed(results)
  requests = list(dict.fromkeys(recorder.asked))
  judge_many = getattr(judge, "judge_many", None)
  if callable(judge_many):
    verdicts = judge_many(requests, max_workers=max_workers)
  else:
    with concurrent.futures.ThreadPoolExecutor(max_workers=max_workers or 16) as pool:
      verdicts = list(pool.map(lambda r: judge.judge(*r), requests))
  replay = _ReplayJudge(dict(zip(requests, verdicts)))
  for i in pending:
    results[i] = score(batch[i], replay)
  return _raise_if_all_failed(results)


def _raise_if_all_failed(results: list[RewardResult]) -> list[RewardResult]:
  errors = [r.details["error"] for r in results if "error" in r.details]
  if results and len(errors) == len(results):
    raise RuntimeError(f"scoring failed for every item of the batch ({len(results)}); the first: {errors[0]}")
  return results


def reward_metrics(results: Sequence[RewardResult]) -> dict[str, float]:
  """Batch means for logging: ``reward``, ``acc``, ``fmt``, ``tool``, ``judged`` (fraction decided by the judge),
  ``judge_unavailable`` (fraction that fell back to the rule because the judge was down), ``format_error`` and
  ``error`` (fraction whose scoring failed: zero reward, ``details["error"]``)."""
  n = len(results)
  if n == 0:
    return {}
  return {
    "reward": sum(r.total for r in results) / n,
    "acc": sum(r.acc for r in results) / n,
    "fmt": sum(r.fmt for r in results) / n,
    "tool": sum(r.tool for r in results) / n,
    "judged": sum(r.judged for r in results) / n,
    "judge_unavailable": sum(r.details.get("judge") == "unavailable" for r in results) / n,
    "format_error": sum(r.fmt < 0 for r in results) / n,
    "error": sum("error" in r.details for r in results) / n,
  }


def score_trajectories(trajectories: Sequence[Any], tokenizer, judge: Judge | None = None) -> list[RewardResult]:
  """Scores rollout trajectories (`agent.trajectory.Trajectory`): the response is everything after the prompt,
  decoded with the special tokens kept; the data source and ground truth come from the trajectory's metadata."""
  items = []
  for t in trajectories:
    response = tokenizer.decode(t.token_ids[t.prompt_length :].tolist(), skip_special_tokens=False)
    items.append(
      dict(
        data_source=t.metadata["data_source"],
        response=response,
        ground_truth=t.metadata["ground_truth"],
        num_successful_tool_calls=t.num_successful_tool_calls,
        question=t.metadata.get("question"),
      )
    )
  return score_batch(items, judge=judge)
