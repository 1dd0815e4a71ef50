"""One DeepEyes assistant turn: find the answer or the zoom-in tool call, execute it, build the observation.

Host-side, pure Python (PIL for the crop). Follows docs/reference.md (section "Tool protocol"), that is the original
``visual_toolbox_v2.py`` of Visual-Agent/DeepEyes, except where said otherwise below:

1. ``<answer>(.*?)</answer>`` (DOTALL): the LAST match is the answer. A non-empty answer (whitespace counts) ends the
   episode, even when the turn also calls a tool (the answer wins). An EMPTY answer ``<answer></answer>`` does not
   count (the original tests ``if answer:``): the turn falls through to the tool-call check.
2. ``<tool_call>(.*?)</tool_call>`` (DOTALL): the LAST match is executed, as the original's ``findall(...)[-1]``
   does (an older branch of it took the first).
   No match ends the episode (kind ``"end"``); so does an EMPTY last match ``<tool_call></tool_call>`` (the original
   tests ``if not action:``). Whitespace-only content is not empty and fails as JSON.
3. ``json.loads(content.strip())``. Any exception (``JSONDecodeError``, but also ``RecursionError`` on very deep
   nesting or ``ValueError`` on an integer of more than 4300 digits) gives
   ``Error: Invalid tool call format: {content.strip()}. Error: {e}``.
4. ``call["name"]`` then ``call["arguments"]`` (both read before the name is checked, as in the original). A missing key
   gives the ``str`` of Python's ``KeyError``: ``Error: 'name'`` / ``Error: 'arguments'``. A JSON value that is not an
   object gives the message Python itself raises for ``value["name"]`` on that type (fixed here so that it does not
   depend on the Python version):

   - list: ``list indices must be integers or slices, not str``
   - string: ``string indices must be integers, not 'str'``
   - number, boolean, null: ``'int' object is not subscriptable`` (``'float'``, ``'bool'``, ``'NoneType'``)

5. The name must be ``image_zoom_in_tool``, else ``Error: Unknown tool name: {name}`` (``str()`` of the JSON value,
   e.g. ``None`` for null).
6. ``arguments["bbox_2d"]``: missing gives ``Error: 'bbox_2d'`` (so ``"bbox"`` -- the key the prompt's schema wrongly
   names as required -- fails this way); arguments that are not an object give the messages of point 4.
7. bbox_2d must be a list of exactly 4 finite numbers (JSON ints or floats; booleans are not numbers; ``NaN``,
   ``Infinity``, which Python's json accepts, are rejected). Anything else gives ``Error: ZOOM IN ARGUMENTS ARE
   INVALID``. This is a deliberate simplification: the original unpacks the list into a method call and leaks a Python
   ``TypeError`` naming that internal method (e.g. for wrong arity or strings).
8. The box is clamped as the original does: ``x1 = max(0, x1)``, ``y1 = max(0, y1)``, ``x2 = min(W, x2)``,
   ``y2 = min(H, y2)``. It is invalid if ``x1 >= x2`` or ``y1 >= y2``, if ``max(w, h) / min(w, h) > 100``, or if
   ``min(w, h) <= 30`` (31 px is the smallest valid side) -- all on the clamped, unrounded box -- and gives
   ``Error: ZOOM IN ARGUMENTS ARE INVALID``.
9. Success: the crop box is the clamped box rounded with Python's ``round()`` (as PIL's ``crop`` rounds), the crop is
   ``image.crop(box)`` of the ORIGINAL image, and the observation is ``SUCCESS_OBSERVATION`` with one
   ``<|image_pad|>`` (the caller smart-resizes the crop and expands the pad to its token count).

Coordinate frames (``execute_turn(frame=...)``):

- ``"original"`` (default, the DeepEyes behaviour): bbox_2d is in pixels of the original image.
- ``"resized"``: the model saw the image resized to ``seen_size = (seen_w, seen_h)`` (by smart_resize) and its box is
  in that frame. Each coordinate is mapped to original pixels (``x * W / seen_w``, ``y * H / seen_h``) BEFORE
  clamping and validation, so the clamp, the min-side and the aspect rules apply in ORIGINAL pixels (the crop that is
  cut and shown is what is judged). This fixes the original's bug for images above max_pixels, where the model sees a
  downscaled image but its box is used as original pixels.

``execute_turn`` never raises on model output: every failure of the call is an error observation. It raises
``ValueError`` only for bad caller arguments (an unknown frame, ``frame="resized"`` without a valid ``seen_size``).
"""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
from typing import Any

from PIL import Image

from deepeyes_jax.agent import prompts

FRAMES = ("original", "resized")


@dataclasses.dataclass(frozen=True)
class ToolCall:
  """The last tool call of a turn and what became of it."""

  content: str  # the text between the LAST <tool_call> and its </tool_call>, unstripped
  name: str | None  # the tool name (str() of the JSON value if not a string); None when it could not be read
  bbox_given: tuple | None  # bbox_2d as written by the model (after JSON) when it is a list; else None
  bbox: tuple[int, int, int, int] | None  # final crop box in ORIGINAL pixels (clamped, rounded) when status == "ok"
  status: str  # "ok" | "json_error" | "bad_call" | "unknown_tool" | "bad_arguments" | "invalid_box"
  error: str | None  # the message after "Error: " in the observation; None when ok


@dataclasses.dataclass(frozen=True)
class TurnOutcome:
  """What one assistant turn did: answered, called the tool, or ended without either."""

  kind: str  # "answer" | "tool" | "end"
  answer: str | None  # the last <answer>...</answer> text when kind == "answer"
  tool_call: ToolCall | None  # when kind == "tool"
  observation: str | None  # the text to append (error or success observation) when kind == "tool"
  crop: Image.Image | None  # the cropped ORIGINAL image when the tool call succeeded

  def observation_parts(self) -> list[tuple[str, bool]]:
    """``observation`` as ``(text, is_markup)`` parts for `processing.chat.encode_parts`: the success observation is
    all template (its image placeholder is the crop's); an error's message is data, since it may echo the model's
    text (a tool name spelling ``<|image_pad|>`` must not become an image). Empty when there is no observation."""
    if self.observation is None:
      return []
    if self.tool_call is None or self.tool_call.error is None:
      return [(self.observation, True)]
    return prompts.error_observation_parts(self.tool_call.error)


def last_between(text: str, open_tag: str, close_tag: str) -> str | None:
  """The last match of ``re.findall(open(.*?)close, text, re.DOTALL)`` (None when there is none), in linear time.

  The regex retries at every ``open`` that no ``close`` follows, scanning to the end each time: quadratic on a turn
  of repeated unclosed tags. Here each ``find`` starts where the previous match ended, and the scan stops at the
  first ``open`` without a ``close`` after it (no later ``open`` can have one).
  """
  found, pos = None, 0
  while True:
    start = text.find(open_tag, pos)
    if start < 0:
      return found
    start += len(open_tag)
    end = text.find(close_tag, start)
    if end < 0:
      return found
    found, pos = text[start:end], end + len(close_tag)


def extract_answer(text: str) -> str | None:
  """The content of the last ``<answer>...</answer>`` (may be ``''``); None when there is none."""
  return last_between(text, "<answer>", "</answer>")


def extract_tool_call(text: str) -> str | None:
  """The content of the last ``<tool_call>...</tool_call>`` (unstripped, may be ``''``); None when there is none."""
  return last_between(text, "<tool_call>", "</tool_call>")


def validate_box(x1, y1, x2, y2, width, height) -> tuple[float, float, float, float] | None:
  """Clamps a box to the ``width`` x ``height`` image and checks it; returns the clamped box, or None if invalid.

  Clamps ``x1, y1`` from below by 0 and ``x2, y2`` from above by ``width, height`` (as DeepEyes does), then rejects
  ``x1 >= x2``, ``y1 >= y2``, ``min(w, h) <= 30`` and ``max(w, h) / min(w, h) > 100``. NaN coordinates are invalid;
  infinities are clamped like any other value.
  """
  if any(isinstance(v, float) and math.isnan(v) for v in (x1, y1, x2, y2)):
    return None
  x1, y1 = max(0, x1), max(0, y1)
  x2, y2 = min(width, x2), min(height, y2)
  if x1 >= x2 or y1 >= y2:
    return None
  w, h = x2 - x1, y2 - y1
  short, long = min(w, h), max(w, h)
  if short <= 30 or long / short > 100:
    return None
  return float(x1), float(y1), float(x2), float(y2)


def _subscript_error(value: Any, key: str) -> str | None:
  """The message of the exception Python raises for ``value[key]`` on a JSON value, or None if it succeeds."""
  if isinstance(value, dict):
    return None if key in value else repr(key)
  if isinstance(value, list):
    return "list indices must be integers or slices, not str"
  if isinstance(value, str):
    return "string indices must be integers, not 'str'"
  return f"'{type(value).__name__}' object is not subscriptable"


def _safe_str(value: Any) -> str:
  try:
    return str(value)
  except (RecursionError, ValueError):  # very deep nesting
    return f"<{type(value).__name__} too deeply nested to print>"


def _is_number(v: Any) -> bool:
  if isinstance(v, bool):
    return False
  if isinstance(v, int):
    return True
  return isinstance(v, float) and math.isfinite(v)


def _scale(v: int | float, num: int, den: int) -> float:
  """``v * num / den`` that saturates to +-inf instead of raising on huge ints (clamping then does the rest)."""
  try:
    return v * num / den
  except OverflowError:
    return math.inf if v > 0 else -math.inf


def _check_frame(frame: str, seen_size: Any) -> None:
  if frame not in FRAMES:
    raise ValueError(f"unknown frame {frame!r}; expected one of {FRAMES}")
  if frame == "resized":
    if seen_size is None:
      raise ValueError('frame="resized" needs seen_size=(seen_w, seen_h)')
    ok = isinstance(seen_size, (tuple, list)) and len(seen_size) == 2
    if not ok or not all(isinstance(s, numbers.Integral) and not isinstance(s, bool) and s > 0 for s in seen_size):
      raise ValueError(f"seen_size must be two positive ints, got {seen_size!r}")


def _tool(content: str, status: str, error: str, name: str | None = None, bbox_given: tuple | None = None):
  call = ToolCall(content=content, name=name, bbox_given=bbox_given, bbox=None, status=status, error=error)
  return TurnOutcome(kind="tool", answer=None, tool_call=call, observation=prompts.error_observation(error), crop=None)


def execute_turn(
  text: str, image: Image.Image, *, frame: str = "original", seen_size: tuple[int, int] | None = None
) -> TurnOutcome:
  """Executes one decoded assistant turn (possibly ending with ``<|im_end|>``) against ``image``.

  See the module docstring for the rules. ``seen_size`` is ``(width, height)`` of the image the model saw; it is
  used only with ``frame="resized"`` (ignored otherwise).
  """
  _check_frame(frame, seen_size)

  answer = extract_answer(text)
  if answer:
    return TurnOutcome(kind="answer", answer=answer, tool_call=None, observation=None, crop=None)
  content = extract_tool_call(text)
  if not content:
    return TurnOutcome(kind="end", answer=None, tool_call=None, observation=None, crop=None)

  try:
    call = json.loads(content.strip())
  except Exception as e:  # JSONDecodeError, RecursionError, ValueError (int too long)
    error = f"Invalid tool call format: {content.strip()}. Error: {e}"
    tool_call = ToolCall(content=content, name=None, bbox_given=None, bbox=None, status="json_error", error=error)
    return TurnOutcome(
      kind="tool", answer=None, tool_call=tool_call, observation=prompts.json_error_observation(content, e), crop=None
    )

  error = _subscript_error(call, "name")
  if error is not None:
    return _tool(content, "bad_call", error)
  raw_name = call["name"]
  name = raw_name if isinstance(raw_name, str) else _safe_str(raw_name)
  error = _subscript_error(call, "arguments")
  if error is not None:
    return _tool(content, "bad_call", error, name=name)
  args = call["arguments"]
  if raw_name != prompts.TOOL_NAME:
    return _tool(content, "unknown_tool", f"Unknown tool name: {name}", name=name)

  error = _subscript_error(args, "bbox_2d")
  if error is not None:
    return _tool(content, "bad_arguments", error, name=name)
  given = args["bbox_2d"]
  if not isinstance(given, list):
    return _tool(content, "invalid_box", prompts.INVALID_ARGS_MESSAGE, name=name)
  bbox_given = tuple(given)
  if len(given) != 4 or not all(_is_number(v) for v in given):
    return _tool(content, "invalid_box", prompts.INVALID_ARGS_MESSAGE, name=name, bbox_given=bbox_given)

  width, height = image.size
  x1, y1, x2, y2 = given
  if frame == "resized":
    seen_w, seen_h = int(seen_size[0]), int(seen_size[1])
    x1, x2 = _scale(x1, width, seen_w), _scale(x2, width, seen_w)
    y1, y2 = _scale(y1, height, seen_h), _scale(y2, height, seen_h)
  clamped = validate_box(x1, y1, x2, y2, width, height)
  if clamped is None:
    return _tool(content, "invalid_box", prompts.INVALID_ARGS_MESSAGE, name=name, bbox_given=bbox_given)

  box = tuple(round(v) for v in clamped)
  crop = image.crop(box)
  tool_call = ToolCall(content=content, name=name, bbox_given=bbox_given, bbox=box, status="ok", error=None)
  return TurnOutcome(kind="tool", answer=None, tool_call=tool_call, observation=prompts.SUCCESS_OBSERVATION, crop=crop)
