"""DeepEyes prompt strings and observation templates (byte-exact copies of the strings the checkpoints were trained on).

Every constant here is copied byte for byte from docs/reference.md (section "Prompts"), which matches the original
DeepEyes code (Visual-Agent/DeepEyes): mind the quirks they keep on purpose -- the tool schema says
``"required":["bbox"]`` although the argument is ``bbox_2d``, the system prompt has two trailing spaces after
``**Example**:``, after ``<tool_call>``, after the example call, and the user suffix has double spaces inside and one
trailing space.
Do not "fix" any of them: trained checkpoints are sensitive to these bytes.
"""

from __future__ import annotations

from typing import Any

SYSTEM_PROMPT: str = (
  "You are a helpful assistant.\n"
  "\n"
  "# Tools\n"
  "You may call one or more functions to assist with the user query.\n"
  "You are provided with function signatures within <tools></tools> XML tags:\n"
  "<tools>\n"
  '{"type":"function","function":{"name":"image_zoom_in_tool","description":"Zoom in on a specific '
  'region of an image by cropping it based on a bounding box (bbox) and an optional object label.",'
  '"parameters":{"type":"object","properties":{"bbox_2d":{"type":"array","items":{"type":"number"},'
  '"minItems":4,"maxItems":4,"description":"The bounding box of the region to zoom in, as [x1, y1, x2, '
  'y2], where (x1, y1) is the top-left corner and (x2, y2) is the bottom-right corner."},'
  '"label":{"type":"string","description":"The name or label of the object in the specified bounding '
  'box (optional)."}},"required":["bbox"]}}}\n'
  "</tools>\n"
  "\n"
  "# How to call a tool\n"
  "Return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n"
  "<tool_call>\n"
  '{"name": <function-name>, "arguments": <args-json-object>}\n'
  "</tool_call>\n"
  "\n"
  "**Example**:  \n"
  "<tool_call>  \n"
  '{"name": "image_zoom_in_tool", "arguments": {"bbox_2d": [10, 20, 100, 200], "label": "the apple on '
  'the desk"}}  \n'
  "</tool_call>"
)

# Appended to the question (eval) and to every tool response. Leading newline, double spaces, trailing space.
USER_SUFFIX: str = (
  "\nThink first, call **image_zoom_in_tool** if needed, then answer. Format strictly as:  <think>...</think>  "
  "<tool_call>...</tool_call> (if tools needed)  <answer>...</answer> "
)

TOOL_NAME = "image_zoom_in_tool"

# Ours, not DeepEyes': the prompt of the "tool disabled" evaluation of a trained model (no tool offered, one turn).
NO_TOOL_SYSTEM_PROMPT: str = "You are a helpful assistant."
NO_TOOL_SUFFIX: str = "\nAnswer from the image. Format strictly as:  <think>...</think>  <answer>...</answer> "
# The usual Qwen2.5-VL benchmark instructions: the no-tool baseline of benchmark evaluation and the no-tool / crop
# conditions of data selection (a plain reply, no tags).
NO_TOOL_CHOICE_SUFFIX: str = "\nAnswer with the option's letter from the given choices directly."
NO_TOOL_OPEN_SUFFIX: str = "\nAnswer the question using a single word or phrase."


def no_tool_messages(image: Any, question: str) -> list[dict]:
  """Chat messages asking `question` about `image` with no tool offered (image first, as in the eval prompts)."""
  return [
    {"role": "system", "content": NO_TOOL_SYSTEM_PROMPT},
    {
      "role": "user",
      "content": [{"type": "image", "image": image}, {"type": "text", "text": "\n" + question + NO_TOOL_SUFFIX}],
    },
  ]


# One image in the Qwen2.5-VL chat format; the caller expands the single <|image_pad|> to the image's token count.
IMAGE_PLACEHOLDER = "<|vision_start|><|image_pad|><|vision_end|>"

INVALID_ARGS_MESSAGE = "ZOOM IN ARGUMENTS ARE INVALID"

_OBS_PREFIX = "\n<|im_start|>user\n"
_OBS_SUFFIX = "<|im_end|>\n<|im_start|>assistant\n"

# Observation appended after a successful zoom-in (one <|image_pad|>, expanded by the caller).
SUCCESS_OBSERVATION: str = (
  _OBS_PREFIX + "<tool_response>" + IMAGE_PLACEHOLDER + USER_SUFFIX + "</tool_response>" + _OBS_SUFFIX
)


def eval_user_text(question: str, options: list[str]) -> str:
  """The evaluation user text: ``"Question: {q}\\nOptions: {opts}\\n" + USER_SUFFIX``.

  ``opts`` is ``"\\n"`` followed by one ``"{letter}. {option}\\n"`` line per option, letters A, B, C, ... in order
  (as DeepEyes' V* evaluation builds it). At most 26 options.
  """
  if len(options) > 26:
    raise ValueError(f"at most 26 options are supported, got {len(options)}")
  opts = "\n" + "".join(f"{chr(ord('A') + i)}. {option}\n" for i, option in enumerate(options))
  return f"Question: {question}\nOptions: {opts}\n" + USER_SUFFIX


def error_observation(message: str) -> str:
  """The observation for a failed tool call.

  ``"\\n<|im_start|>user\\nError: {message}<|im_end|>\\n<|im_start|>assistant\\n"``.
  """
  return "".join(text for text, _ in error_observation_parts(message))


def error_observation_parts(message: str) -> list[tuple[str, bool]]:
  """``error_observation(message)`` as ``(text, is_markup)`` parts (`processing.chat.encode_parts`): the message is
  data, since it may echo what the model wrote (its tool name, its JSON, the JSON error), so that a special token it
  spells stays ordinary text; the template around it is markup."""
  return [(_OBS_PREFIX + "Error: ", True), (message, False), (_OBS_SUFFIX, True)]


def json_error_observation(content: str, error: Exception) -> str:
  """The observation for a tool call whose JSON does not parse (``content`` is stripped, as the original does)."""
  return error_observation(f"Invalid tool call format: {content.strip()}. Error: {error}")
