"""Tests of the DeepEyes prompts and of one assistant turn (deepeyes_jax.agent.prompts / .protocol).

Expected observation strings are written out by hand from docs/reference.md ("Prompts"), never built with the module's
helpers.
"""

import json
import math

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from PIL import Image

from deepeyes_jax.agent import prompts, protocol
from deepeyes_jax.agent.protocol import execute_turn

# ---------------------------------------------------------------------------------------------------------------------
# Literal copies of docs/reference.md (section "Prompts"), byte for byte.

SPEC_SYSTEM_PROMPT_LINES = [
  "You are a helpful assistant.",
  "",
  "# Tools",
  "You may call one or more functions to assist with the user query.",
  "You are provided with function signatures within <tools></tools> XML tags:",
  "<tools>",
  (
    '{"type":"function","function":{"name":"image_zoom_in_tool","description":"Zoom in on a specific regi'
    'on of an image by cropping it based on a bounding box (bbox) and an optional object label.","paramet'
    'ers":{"type":"object","properties":{"bbox_2d":{"type":"array","items":{"type":"number"},"minItems":4'
    ',"maxItems":4,"description":"The bounding box of the region to zoom in, as [x1, y1, x2, y2], where ('
    'x1, y1) is the top-left corner and (x2, y2) is the bottom-right corner."},"label":{"type":"string","'
    'description":"The name or label of the object in the specified bounding box (optional)."}},"required'
    '":["bbox"]}}}'
  ),
  "</tools>",
  "",
  "# How to call a tool",
  "Return a json object with function name and arguments within <tool_call></tool_call> XML tags:",
  "<tool_call>",
  '{"name": <function-name>, "arguments": <args-json-object>}',
  "</tool_call>",
  "",
  "**Example**:  ",
  "<tool_call>  ",
  ('{"name": "image_zoom_in_tool", "arguments": {"bbox_2d": [10, 20, 100, 200], "label": "the apple on the desk"}}  '),
  "</tool_call>",
]
SPEC_SYSTEM_PROMPT = "\n".join(SPEC_SYSTEM_PROMPT_LINES)
SPEC_USER_SUFFIX = (
  "\nThink first, call **image_zoom_in_tool** if needed, then answer. Format strictly as:  <think>...</think>  "
  "<tool_call>...</tool_call> (if tools needed)  <answer>...</answer> "
)

OPEN = "\n<|im_start|>user\n"
CLOSE = "<|im_end|>\n<|im_start|>assistant\n"
INVALID_OBS = "\n<|im_start|>user\nError: ZOOM IN ARGUMENTS ARE INVALID<|im_end|>\n<|im_start|>assistant\n"
SUCCESS_OBS = (
  "\n<|im_start|>user\n<tool_response><|vision_start|><|image_pad|><|vision_end|>"
  "\nThink first, call **image_zoom_in_tool** if needed, then answer. Format strictly as:  <think>...</think>  "
  "<tool_call>...</tool_call> (if tools needed)  <answer>...</answer> "
  "</tool_response><|im_end|>\n<|im_start|>assistant\n"
)


def _pattern_image(width: int, height: int) -> tuple[Image.Image, np.ndarray]:
  """An RGB image whose every pixel is distinct, so a crop at the wrong place cannot match."""
  ys, xs = np.mgrid[0:height, 0:width]
  arr = np.stack([xs % 256, ys % 256, (xs // 256) * 40 + (ys // 256) * 7], axis=-1).astype(np.uint8)
  return Image.fromarray(arr, "RGB"), arr


IMAGE, PIXELS = _pattern_image(400, 300)
WIDE_IMAGE, WIDE_PIXELS = _pattern_image(3200, 100)


def _zoom(bbox, name="image_zoom_in_tool") -> str:
  return f'<tool_call>\n{{"name": "{name}", "arguments": {{"bbox_2d": {bbox}}}}}\n</tool_call>'


def _turn(*parts: str) -> str:
  return "<think>Let me look closer.</think>\n" + "\n".join(parts) + "<|im_end|>"


# ---------------------------------------------------------------------------------------------------------------------
# Prompts.


def test_system_prompt_is_byte_exact():
  assert prompts.SYSTEM_PROMPT == SPEC_SYSTEM_PROMPT
  assert '"required":["bbox"]' in prompts.SYSTEM_PROMPT  # the schema quirk is kept
  assert '"required":["bbox_2d"]' not in prompts.SYSTEM_PROMPT
  assert "\n**Example**:  \n<tool_call>  \n" in prompts.SYSTEM_PROMPT  # double spaces at line ends
  assert '"label": "the apple on the desk"}}  \n</tool_call>' in prompts.SYSTEM_PROMPT
  assert prompts.SYSTEM_PROMPT.startswith("You are a helpful assistant.\n\n# Tools\n")
  assert prompts.SYSTEM_PROMPT.endswith("\n</tool_call>")
  assert prompts.SYSTEM_PROMPT.count("\n") == 18
  assert len(prompts.SYSTEM_PROMPT) == 1166


def test_user_suffix_is_byte_exact():
  assert prompts.USER_SUFFIX == SPEC_USER_SUFFIX
  assert prompts.USER_SUFFIX.startswith("\nThink first, ")
  assert prompts.USER_SUFFIX.endswith("<answer>...</answer> ")  # trailing space
  assert "as:  <think>...</think>  <tool_call>...</tool_call> (if tools needed)  <answer>" in prompts.USER_SUFFIX
  assert prompts.USER_SUFFIX.count("  ") == 3


def test_reference_doc_quotes_the_prompts_byte_for_byte():
  """docs/reference.md ("Prompts") is where a reader finds these bytes: it must not drift from the constants."""
  import pathlib
  import re

  doc = (pathlib.Path(__file__).resolve().parents[1] / "docs" / "reference.md").read_text(encoding="utf-8")
  section = doc.split("\n## Prompts\n", 1)[1].split("\n## ", 1)[0]
  assert re.search(r"### System prompt\n.*?\n```\n(.*?)\n```\n", section, re.DOTALL)[1] == SPEC_SYSTEM_PROMPT
  for value in (SPEC_USER_SUFFIX, SUCCESS_OBS, INVALID_OBS):
    assert "`" + json.dumps(value) + "`" in section


def test_constants():
  assert prompts.TOOL_NAME == "image_zoom_in_tool"
  assert prompts.IMAGE_PLACEHOLDER == "<|vision_start|><|image_pad|><|vision_end|>"
  assert prompts.INVALID_ARGS_MESSAGE == "ZOOM IN ARGUMENTS ARE INVALID"
  assert prompts.SUCCESS_OBSERVATION == SUCCESS_OBS
  assert prompts.SUCCESS_OBSERVATION.count("<|image_pad|>") == 1


def test_eval_user_text():
  text = prompts.eval_user_text("What is the color of the cup?", ["red", "blue", "green"])
  assert text == (
    "Question: What is the color of the cup?\nOptions: \nA. red\nB. blue\nC. green\n\n"
    "\nThink first, call **image_zoom_in_tool** if needed, then answer. Format strictly as:  <think>...</think>  "
    "<tool_call>...</tool_call> (if tools needed)  <answer>...</answer> "
  )


def test_error_observations():
  assert prompts.error_observation("'bbox_2d'") == (
    "\n<|im_start|>user\nError: 'bbox_2d'<|im_end|>\n<|im_start|>assistant\n"
  )
  err = ValueError("boom")
  assert prompts.json_error_observation("  {x}\n", err) == (
    "\n<|im_start|>user\nError: Invalid tool call format: {x}. Error: boom<|im_end|>\n<|im_start|>assistant\n"
  )


def test_task_messages_image_first():
  from deepeyes_jax.agent.rollout import Task

  messages = Task(task_id="t", image=IMAGE, user_text="hello").messages()
  assert messages == [
    {"role": "system", "content": SPEC_SYSTEM_PROMPT},
    {"role": "user", "content": [{"type": "image", "image": IMAGE}, {"type": "text", "text": "hello"}]},
  ]


# ---------------------------------------------------------------------------------------------------------------------
# Extraction.


def test_extract_last_answer_and_tool_call():
  text = "<answer>A</answer> x <answer>\nB\n</answer><tool_call>one</tool_call><tool_call> two </tool_call>"
  assert protocol.extract_answer(text) == "\nB\n"
  assert protocol.extract_tool_call(text) == " two "
  assert protocol.extract_answer("<answer></answer>") == ""
  assert protocol.extract_answer("<answer>open") is None
  assert protocol.extract_tool_call("no call") is None


# ---------------------------------------------------------------------------------------------------------------------
# Golden turns.


def _ok(outcome, box):
  assert outcome.kind == "tool"
  assert outcome.tool_call.status == "ok", outcome.tool_call
  assert outcome.tool_call.error is None
  assert outcome.tool_call.bbox == box
  assert outcome.observation == SUCCESS_OBS
  x1, y1, x2, y2 = box
  assert outcome.crop.size == (x2 - x1, y2 - y1)


def _error(outcome, status, observation):
  assert outcome.kind == "tool"
  assert outcome.tool_call.status == status, outcome.tool_call
  assert outcome.observation == observation
  assert observation == OPEN + "Error: " + outcome.tool_call.error + CLOSE
  assert outcome.crop is None
  assert outcome.tool_call.bbox is None


def test_answer_wins_over_tool_call():
  text = _turn(_zoom([10, 20, 110, 120]), "<answer>B</answer>")
  outcome = execute_turn(text, IMAGE)
  assert outcome.kind == "answer"
  assert outcome.answer == "B"
  assert outcome.observation is None and outcome.crop is None and outcome.tool_call is None


def test_last_of_two_tool_calls_is_executed():
  text = _turn(_zoom([0, 0, 100, 100]), "Hmm, no, rather:", _zoom([50, 60, 250, 210]))
  outcome = execute_turn(text, IMAGE)
  _ok(outcome, (50, 60, 250, 210))
  assert outcome.tool_call.name == "image_zoom_in_tool"
  assert outcome.tool_call.bbox_given == (50, 60, 250, 210)
  assert outcome.tool_call.content == '\n{"name": "image_zoom_in_tool", "arguments": {"bbox_2d": [50, 60, 250, 210]}}\n'
  np.testing.assert_array_equal(np.asarray(outcome.crop), PIXELS[60:210, 50:250])
  assert outcome.crop.tobytes() == IMAGE.crop((50, 60, 250, 210)).tobytes()


def test_bad_json():
  content = '{"name": "image_zoom_in_tool", "arguments": {"bbox_2d": [1, 2 3, 4]}}'
  text = _turn(f"<tool_call>\n  {content}\n</tool_call>")
  outcome = execute_turn(text, IMAGE)
  expected = (
    "\n<|im_start|>user\nError: Invalid tool call format: "
    '{"name": "image_zoom_in_tool", "arguments": {"bbox_2d": [1, 2 3, 4]}}'
    ". Error: Expecting ',' delimiter: line 1 column 63 (char 62)<|im_end|>\n<|im_start|>assistant\n"
  )
  with pytest.raises(json.JSONDecodeError, match=r"^Expecting ',' delimiter: line 1 column 63 \(char 62\)$"):
    json.loads(content)
  _error(outcome, "json_error", expected)
  assert outcome.tool_call.name is None
  assert outcome.tool_call.content == f"\n  {content}\n"


def test_whitespace_tool_call_is_a_json_error_and_empty_one_ends():
  outcome = execute_turn(_turn("<tool_call> \n</tool_call>"), IMAGE)
  expected = (
    "\n<|im_start|>user\nError: Invalid tool call format: . Error: Expecting value: line 1 column 1 (char 0)"
    "<|im_end|>\n<|im_start|>assistant\n"
  )
  _error(outcome, "json_error", expected)
  outcome = execute_turn(_turn("<tool_call></tool_call>"), IMAGE)
  assert outcome.kind == "end" and outcome.observation is None


def test_bbox_instead_of_bbox_2d():
  text = _turn('<tool_call>{"name": "image_zoom_in_tool", "arguments": {"bbox": [10, 20, 100, 200]}}</tool_call>')
  outcome = execute_turn(text, IMAGE)
  _error(outcome, "bad_arguments", "\n<|im_start|>user\nError: 'bbox_2d'<|im_end|>\n<|im_start|>assistant\n")
  assert outcome.tool_call.error == "'bbox_2d'"
  assert outcome.tool_call.bbox_given is None


@pytest.mark.parametrize(
  "call,message,status",
  [
    ('{"arguments": {"bbox_2d": [0, 0, 100, 100]}}', "'name'", "bad_call"),
    ('{"name": "image_zoom_in_tool"}', "'arguments'", "bad_call"),
    (
      '{"name": "image_zoom_in_tool", "arguments": [0, 0, 100, 100]}',
      "list indices must be integers or slices, not str",
      "bad_arguments",
    ),
    (
      '{"name": "image_zoom_in_tool", "arguments": "bbox_2d"}',
      "string indices must be integers, not 'str'",
      "bad_arguments",
    ),
    ('[{"name": "image_zoom_in_tool"}]', "list indices must be integers or slices, not str", "bad_call"),
    ('"image_zoom_in_tool"', "string indices must be integers, not 'str'", "bad_call"),
    ("42", "'int' object is not subscriptable", "bad_call"),
    ("4.5", "'float' object is not subscriptable", "bad_call"),
    ("true", "'bool' object is not subscriptable", "bad_call"),
    ("null", "'NoneType' object is not subscriptable", "bad_call"),
    (
      '{"name": "image_rotate_tool", "arguments": {"angle": 90}}',
      "Unknown tool name: image_rotate_tool",
      "unknown_tool",
    ),
    ('{"name": null, "arguments": {}}', "Unknown tool name: None", "unknown_tool"),
    ('{"name": "crop"}', "'arguments'", "bad_call"),  # arguments are read before the name is checked
  ],
)
def test_malformed_calls(call, message, status):
  outcome = execute_turn(_turn(f"<tool_call>{call}</tool_call>"), IMAGE)
  _error(outcome, status, "\n<|im_start|>user\nError: " + message + "<|im_end|>\n<|im_start|>assistant\n")
  assert outcome.tool_call.error == message


@pytest.mark.parametrize("value", [[1], "s", 3, 2.5, False, None])
def test_non_object_messages_match_python(value):
  """The fixed messages for non-objects are what this Python raises for value["name"]."""
  with pytest.raises(TypeError) as info:
    value["name"]
  outcome = execute_turn(f"<tool_call>{json.dumps(value)}</tool_call>", IMAGE)
  assert outcome.tool_call.error == str(info.value)


@pytest.mark.parametrize(
  "bbox,box",
  [
    ([-50, -20, 1000, 1000], (0, 0, 400, 300)),  # clamped to the image, still valid
    ([369, 0, 500, 100], (369, 0, 400, 100)),  # clamped to 31 px wide
    ([10, 10, 41, 200], (10, 10, 41, 200)),  # 31 px: the smallest valid side
    ([10, 10, 200, 41], (10, 10, 200, 41)),
    ([10.5, 20.4, 100.6, 200.5], (10, 20, 101, 200)),  # floats: Python round(), half to even
    ([0, 0, 10**400, 300], (0, 0, 400, 300)),  # huge ints are numbers, clamped
    ([0.0, 0, 400, 300.0], (0, 0, 400, 300)),
  ],
)
def test_valid_boxes(bbox, box):
  outcome = execute_turn(_turn(_zoom(json.dumps(bbox))), IMAGE)
  _ok(outcome, box)
  x1, y1, x2, y2 = box
  np.testing.assert_array_equal(np.asarray(outcome.crop), PIXELS[y1:y2, x1:x2])
  assert outcome.crop.tobytes() == IMAGE.crop(box).tobytes()


def test_float_box_rounds_like_pil():
  bbox = (10.5, 20.4, 100.6, 200.5)
  outcome = execute_turn(_zoom(list(bbox)), IMAGE)
  _ok(outcome, (10, 20, 101, 200))
  assert outcome.crop.tobytes() == IMAGE.crop(bbox).tobytes()  # PIL rounds a float box the same way


@pytest.mark.parametrize(
  "bbox",
  [
    [200, 100, 100, 200],  # inverted x
    [100, 200, 200, 100],  # inverted y
    [100, 100, 100, 200],  # empty
    [10, 10, 40, 200],  # 30 px wide
    [10, 10, 200, 40],  # 30 px high
    [370, 0, 500, 100],  # 30 px wide after clamping
    [500, 0, 600, 100],  # entirely right of the image
    [-200, -200, -100, -100],  # entirely above-left
    [0, 0, 400],  # arity
    [0, 0, 400, 300, 5],
    [],
    ["0", "0", "400", "300"],  # strings
    [True, 0, 400, 300],  # bool is not a number
    [0, 0, 400, False],
    [[0, 0], [400, 300]],  # nested
    [None, 0, 400, 300],
    [0, 0, float("nan"), 300],
    [0, 0, float("inf"), 300],
    [float("-inf"), 0, 400, 300],
  ],
)
def test_invalid_boxes(bbox):
  outcome = execute_turn(_turn(_zoom(json.dumps(bbox))), IMAGE)
  _error(outcome, "invalid_box", INVALID_OBS)
  assert outcome.tool_call.error == "ZOOM IN ARGUMENTS ARE INVALID"
  assert json.dumps(list(outcome.tool_call.bbox_given)) == json.dumps(bbox)


@pytest.mark.parametrize("value", ['"0,0,100,100"', "100", '{"x1": 0}', "null"])
def test_bbox_not_a_list(value):
  outcome = execute_turn(
    _turn(f'<tool_call>{{"name": "image_zoom_in_tool", "arguments": {{"bbox_2d": {value}}}}}</tool_call>'), IMAGE
  )
  _error(outcome, "invalid_box", INVALID_OBS)
  assert outcome.tool_call.bbox_given is None


def test_aspect_ratio_limit():
  _ok(execute_turn(_zoom([0, 0, 3100, 31]), WIDE_IMAGE), (0, 0, 3100, 31))  # 100:1
  _error(execute_turn(_zoom([0, 0, 3132, 31]), WIDE_IMAGE), "invalid_box", INVALID_OBS)  # 101.03:1
  _error(execute_turn(_zoom([0, 0, 3131, 31]), WIDE_IMAGE), "invalid_box", INVALID_OBS)  # 101:1
  outcome = execute_turn(_zoom([0, 0, 3130, 31]), WIDE_IMAGE)  # 100.97:1
  _error(outcome, "invalid_box", INVALID_OBS)
  outcome = execute_turn(_zoom([100, 0, 3200, 31]), WIDE_IMAGE)
  _ok(outcome, (100, 0, 3200, 31))
  np.testing.assert_array_equal(np.asarray(outcome.crop), WIDE_PIXELS[0:31, 100:3200])


def test_answers():
  assert execute_turn("plain text, no tags<|im_end|>", IMAGE).kind == "end"
  whitespace = execute_turn("<answer> </answer><|im_end|>", IMAGE)
  assert whitespace.kind == "answer" and whitespace.answer == " "
  empty = execute_turn("<answer></answer><|im_end|>", IMAGE)
  assert empty.kind == "end" and empty.answer is None and empty.observation is None
  # An empty answer does not count: the tool call in the same turn runs.
  outcome = execute_turn(_turn(_zoom([0, 0, 100, 100]), "<answer></answer>"), IMAGE)
  _ok(outcome, (0, 0, 100, 100))
  # Only the last answer counts.
  outcome = execute_turn(_turn("<answer>A</answer>", _zoom([0, 0, 100, 100]), "<answer></answer>"), IMAGE)
  _ok(outcome, (0, 0, 100, 100))
  outcome = execute_turn("<answer></answer> <answer>\nC. green\n</answer>", IMAGE)
  assert outcome.kind == "answer" and outcome.answer == "\nC. green\n"


def test_resized_frame_maps_to_original_pixels():
  image, pixels = _pattern_image(2000, 1000)
  outcome = execute_turn(_zoom([100, 100, 200, 200]), image, frame="resized", seen_size=(1000, 500))
  _ok(outcome, (200, 200, 400, 400))
  assert outcome.tool_call.bbox_given == (100, 100, 200, 200)
  np.testing.assert_array_equal(np.asarray(outcome.crop), pixels[200:400, 200:400])
  # The min-side rule applies in original pixels: 20 px seen is 40 px original (valid); 15 px seen is 30 (invalid).
  _ok(execute_turn(_zoom([0, 0, 20, 20]), image, frame="resized", seen_size=(1000, 500)), (0, 0, 40, 40))
  _error(execute_turn(_zoom([0, 0, 15, 20]), image, frame="resized", seen_size=(1000, 500)), "invalid_box", INVALID_OBS)
  # Clamping happens after the mapping, in original pixels.
  outcome = execute_turn(_zoom([900, 400, 1100, 600]), image, frame="resized", seen_size=(1000, 500))
  _ok(outcome, (1800, 800, 2000, 1000))
  outcome = execute_turn(_zoom([-(10**400), 0, 10**400, 10**400]), image, frame="resized", seen_size=(1000, 500))
  _ok(outcome, (0, 0, 2000, 1000))
  # The same box in the original frame is a different crop.
  _ok(execute_turn(_zoom([100, 100, 200, 200]), image), (100, 100, 200, 200))


def test_caller_errors_raise():
  with pytest.raises(ValueError):
    execute_turn("<answer>A</answer>", IMAGE, frame="seen")
  with pytest.raises(ValueError):
    execute_turn(_zoom([0, 0, 100, 100]), IMAGE, frame="resized")
  with pytest.raises(ValueError):
    execute_turn(_zoom([0, 0, 100, 100]), IMAGE, frame="resized", seen_size=(0, 100))


def test_validate_box():
  assert protocol.validate_box(-5, -5, 500, 500, 400, 300) == (0.0, 0.0, 400.0, 300.0)
  assert protocol.validate_box(0, 0, 31, 31, 400, 300) == (0.0, 0.0, 31.0, 31.0)
  assert protocol.validate_box(0, 0, 30.0, 100, 400, 300) is None
  assert protocol.validate_box(0, 0, 30.01, 100, 400, 300) == (0.0, 0.0, 30.01, 100.0)
  assert protocol.validate_box(0, 0, float("nan"), 100, 400, 300) is None
  assert protocol.validate_box(10, 0, 10, 100, 400, 300) is None


# ---------------------------------------------------------------------------------------------------------------------
# Fuzz: execute_turn never raises and always returns a well-formed outcome.

FUZZ_IMAGE, _ = _pattern_image(400, 300)


def _check_outcome(outcome, image):
  assert outcome.kind in ("answer", "tool", "end")
  event(outcome.tool_call.status if outcome.kind == "tool" else outcome.kind)
  if outcome.kind != "tool":
    assert outcome.observation is None and outcome.crop is None and outcome.tool_call is None
    assert (outcome.answer is not None and outcome.answer != "") == (outcome.kind == "answer")
    return
  obs, call = outcome.observation, outcome.tool_call
  assert obs.startswith("\n<|im_start|>user\n") and obs.endswith("<|im_end|>\n<|im_start|>assistant\n")
  if call.status == "ok":
    assert obs == SUCCESS_OBS and obs.count("<|image_pad|>") == 1
    assert call.error is None
    x1, y1, x2, y2 = call.bbox
    assert all(type(v) is int for v in call.bbox)
    assert 0 <= x1 < x2 <= image.width and 0 <= y1 < y2 <= image.height
    assert min(x2 - x1, y2 - y1) >= 30
    assert outcome.crop is not None and outcome.crop.size == (x2 - x1, y2 - y1)
  else:
    assert call.status in ("json_error", "bad_call", "unknown_tool", "bad_arguments", "invalid_box")
    assert obs.startswith("\n<|im_start|>user\nError: ")
    assert obs == "\n<|im_start|>user\nError: " + call.error + "<|im_end|>\n<|im_start|>assistant\n"
    assert outcome.crop is None and call.bbox is None


TAGS = st.sampled_from(
  [
    "<answer>",
    "</answer>",
    "<tool_call>",
    "</tool_call>",
    "<|im_end|>",
    "{",
    "}",
    "[",
    "]",
    '"name"',
    ":",
    ",",
    '"image_zoom_in_tool"',
    '"arguments"',
    '"bbox_2d"',
    " ",
    "\n",
    "0",
    "100",
    "-1",
    "NaN",
  ]
)
FUZZ_TEXT = st.lists(st.one_of(st.text(max_size=20), TAGS, TAGS, TAGS), max_size=30).map("".join)

JSON_VALUES = st.recursive(
  st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10),
  lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=8), children, max_size=5),
  max_leaves=20,
)
COORD = st.one_of(
  st.integers(-100, 500),
  st.integers(),
  st.integers(-(10**400), 10**400),
  st.floats(),
  st.floats(-100, 500),
  st.booleans(),
  st.none(),
  st.text(max_size=5),
  st.lists(st.integers(0, 300), max_size=2),
)
NUMBER = st.integers(-50, 450) | st.floats(-50, 450, allow_nan=False)
# Boxes near the image (400x300), so that a good share are valid (and some are just too small or too thin).
NEAR_BOX = st.builds(
  lambda x1, y1, w, h: [x1, y1, x1 + w, y1 + h], NUMBER, NUMBER, st.integers(-5, 450) | st.floats(20, 40), NUMBER
)
BBOX = st.one_of(st.lists(COORD, max_size=6), st.lists(NUMBER, min_size=4, max_size=4), NEAR_BOX)
CALL_JSON = st.one_of(
  JSON_VALUES,
  st.fixed_dictionaries(
    {"name": st.sampled_from(["image_zoom_in_tool", "image_rotate_tool"]) | JSON_VALUES},
    optional={"arguments": st.fixed_dictionaries({}, optional={"bbox_2d": JSON_VALUES, "label": st.text()})},
  ),
  st.fixed_dictionaries(
    {
      "name": st.just("image_zoom_in_tool"),
      "arguments": st.fixed_dictionaries({"bbox_2d": BBOX}),
    }
  ),
)
ANSWERS = st.sampled_from(
  ["", "<answer>A</answer>", "<answer></answer>", "<answer> </answer>", "<answer>", "</answer>"]
)
FRAMES = st.one_of(
  st.just(("original", None)),
  st.just(("original", None)),
  st.just(("resized", (200, 150))),
  st.tuples(st.just("resized"), st.tuples(st.integers(1, 2000), st.integers(1, 2000))),
)
FUZZ = settings(max_examples=2000, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FUZZ
@given(text=FUZZ_TEXT, frame=FRAMES)
def test_fuzz_arbitrary_text(text, frame):
  _check_outcome(execute_turn(text, FUZZ_IMAGE, frame=frame[0], seen_size=frame[1]), FUZZ_IMAGE)


@FUZZ
@given(call=CALL_JSON, before=ANSWERS, after=ANSWERS, junk=st.text(max_size=10), frame=FRAMES)
def test_fuzz_json_tool_calls(call, before, after, junk, frame):
  text = f"<think>{junk}</think>{before}<tool_call>\n{json.dumps(call)}\n</tool_call>{after}<|im_end|>"
  outcome = execute_turn(text, FUZZ_IMAGE, frame=frame[0], seen_size=frame[1])
  _check_outcome(outcome, FUZZ_IMAGE)
  if outcome.kind == "tool":
    assert outcome.tool_call.status != "json_error"  # json.dumps output always parses back


@FUZZ
@given(bbox=BBOX, frame=FRAMES)
def test_fuzz_bbox_values(bbox, frame):
  outcome = execute_turn(_zoom(json.dumps(bbox)), FUZZ_IMAGE, frame=frame[0], seen_size=frame[1])
  _check_outcome(outcome, FUZZ_IMAGE)
  assert outcome.kind == "tool"
  assert json.dumps(list(outcome.tool_call.bbox_given)) == json.dumps(bbox)
  numbers = len(bbox) == 4 and all(type(v) is int or (type(v) is float and math.isfinite(v)) for v in bbox)
  if not numbers:
    assert outcome.tool_call.status == "invalid_box"
  elif frame[0] == "original":
    x1, y1 = max(0, bbox[0]), max(0, bbox[1])
    x2, y2 = min(400, bbox[2]), min(300, bbox[3])
    valid = x1 < x2 and y1 < y2 and min(x2 - x1, y2 - y1) > 30 and max(x2 - x1, y2 - y1) / min(x2 - x1, y2 - y1) <= 100
    assert (outcome.tool_call.status == "ok") == valid
    if valid:
      assert outcome.tool_call.bbox == (round(x1), round(y1), round(x2), round(y2))
      assert outcome.crop.tobytes() == FUZZ_IMAGE.crop(outcome.tool_call.bbox).tobytes()
