"""Qwen2.5-VL chat formatting in plain Python (no Jinja, no transformers).

``render`` produces exactly the text of the Qwen2.5-VL-Instruct chat template (``QWEN2_5_VL_CHAT_TEMPLATE``,
kept verbatim below) for the message shapes DeepEyes uses::

    <|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n      (only if messages[0] is not a system turn)
    <|im_start|>{role}\\n{content}<|im_end|>\\n                         (one per message)
    <|im_start|>assistant\\n                                            (add_generation_prompt=True)

An image item in a message's content list renders as ``<|vision_start|><|image_pad|><|vision_end|>`` with ONE
``<|image_pad|>``; after tokenization ``expand_image_pads`` repeats the k-th pad ``t * h * w / 4`` times (the number of
merged vision tokens of the k-th image).

String content is copied verbatim. In particular a literal ``<image>`` placeholder in a string is NOT an image: the
DeepEyes data pipeline replaces ``<image>`` by an image item (``{"type": "image"}``) before the chat template runs,
and this module does the same as the real template, i.e. nothing.

Text is data, never markup. ``render_parts`` returns the same text cut into ``(text, is_markup)`` parts: markup is
what the template writes (role headers, ``<|im_end|>``, the image placeholder of an image item), data is every
message's text. ``encode_parts`` tokenises them so that special tokens (``<|im_start|>``, ``<|image_pad|>``, ...) are
recognised in markup only: a question, a system prompt or a model's echoed tool name that spells ``<|image_pad|>`` or
``<|im_start|>system`` becomes ordinary tokens, and cannot add an image or a turn. For text without such spellings
the ids are exactly those of tokenising the whole rendered string.

``render`` is stricter than the template (which renders any role and silently drops unknown content items): unknown
roles, unknown content types and malformed items raise ``ValueError`` naming the message (and item) index.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

ENDOFTEXT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
VISION_START = "<|vision_start|>"
VISION_END = "<|vision_end|>"
VISION_PAD = "<|vision_pad|>"
IMAGE_PAD = "<|image_pad|>"
VIDEO_PAD = "<|video_pad|>"
TOOL_CALL_START = "<tool_call>"
TOOL_CALL_END = "</tool_call>"

DEFAULT_SYSTEM_MESSAGE = "You are a helpful assistant."
IMAGE_PLACEHOLDER = VISION_START + IMAGE_PAD + VISION_END
VIDEO_PLACEHOLDER = VISION_START + VIDEO_PAD + VISION_END
GENERATION_PROMPT = IM_START + "assistant\n"

ROLES = ("system", "user", "assistant", "tool")
CONTENT_TYPES = ("text", "image", "image_url", "video")

# The chat template of Qwen/Qwen2.5-VL-7B-Instruct (tokenizer_config.json "chat_template", identical to the
# processor's chat_template.json), verbatim. The tiny test tokenizer ships it so that apply_chat_template behaves like
# the real one; tests check ``render`` against it.
QWEN2_5_VL_CHAT_TEMPLATE = (
  "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}{% for message in messages %}"
  "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
  "{% endif %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}"
  "<|im_end|>\n{% else %}{% for content in message['content'] %}{% if content['type'] == 'image' or 'image' in content"
  " or 'image_url' in content %}{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture "
  "{{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] == 'video'"
  " or 'video' in content %}{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}Video "
  "{{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>{% elif 'text' in content %}"
  "{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}"
  "<|im_start|>assistant\n{% endif %}"
)

Message = Mapping[str, Any]


def _item_kind(item: Any, where: str) -> str:
  """'text', 'image' or 'video' for one content item, with the template's precedence (image, video, text)."""
  if not isinstance(item, Mapping):
    raise ValueError(f"{where}: a content item must be a dict, got {type(item).__name__}")
  kind = item.get("type")
  if kind not in CONTENT_TYPES:
    raise ValueError(f"{where}: unknown content type {kind!r} (expected one of {', '.join(CONTENT_TYPES)})")
  if kind == "text":
    if "image" in item or "image_url" in item or "video" in item:
      raise ValueError(f"{where}: a text item must not carry an 'image', 'image_url' or 'video' key")
    if not isinstance(item.get("text"), str):
      raise ValueError(f"{where}: a text item needs a str 'text', got {type(item.get('text')).__name__}")
    return "text"
  if kind == "video":
    if "image" in item or "image_url" in item:
      raise ValueError(f"{where}: a video item must not carry an 'image' or 'image_url' key")
    return "video"
  if kind == "image_url" and "image_url" not in item:
    raise ValueError(f"{where}: an image_url item needs an 'image_url' key")
  return "image"  # "image" (optionally with the HF-style "image" payload) or "image_url"


Part = tuple[str, bool]  # (text, is_markup)


def render(
  messages: Sequence[Message],
  add_generation_prompt: bool = True,
  add_vision_id: bool = False,
) -> str:
  """The Qwen2.5-VL chat-template text of ``messages``.

  Args:
    messages: ``{"role": ..., "content": ...}`` dicts; ``role`` is one of ``ROLES``; ``content`` is a str (copied
      verbatim, ``<image>`` included) or a list of items: ``{"type": "text", "text": str}``, ``{"type": "image"}``
      (an HF-style ``"image"`` payload, or ``{"type": "image_url", ...}``, is accepted and ignored here) or
      ``{"type": "video"}``.
    add_generation_prompt: append ``<|im_start|>assistant\\n``.
    add_vision_id: prefix every image with ``Picture {n}: `` (and video with ``Video {n}: ``), as the template does.

  Returns:
    The same string as ``tokenizer.apply_chat_template(messages, tokenize=False, ...)`` with the real template.
  """
  return "".join(text for text, _ in render_parts(messages, add_generation_prompt, add_vision_id))


def render_parts(
  messages: Sequence[Message],
  add_generation_prompt: bool = True,
  add_vision_id: bool = False,
) -> list[Part]:
  """``render``'s text as ``(text, is_markup)`` parts: the template's own text is markup, message text is data."""
  if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
    raise ValueError(f"messages must be a list of dicts, got {type(messages).__name__}")
  if not messages:
    raise ValueError("messages is empty: need at least one message")
  parts: list[Part] = []
  images = videos = 0
  for i, message in enumerate(messages):
    if not isinstance(message, Mapping):
      raise ValueError(f"message {i}: must be a dict, got {type(message).__name__}")
    role = message.get("role")
    if role not in ROLES:
      raise ValueError(f"message {i}: unknown role {role!r} (expected one of {', '.join(ROLES)})")
    if i == 0 and role != "system":
      parts.append((f"{IM_START}system\n{DEFAULT_SYSTEM_MESSAGE}{IM_END}\n", True))
    parts.append((f"{IM_START}{role}\n", True))
    content = message.get("content")
    if isinstance(content, str):
      parts.append((content, False))
    elif isinstance(content, Sequence) and not isinstance(content, (bytes, bytearray)):
      for j, item in enumerate(content):
        kind = _item_kind(item, f"message {i}, content item {j}")
        if kind == "image":
          images += 1
          parts.append(((f"Picture {images}: " if add_vision_id else "") + IMAGE_PLACEHOLDER, True))
        elif kind == "video":
          videos += 1
          parts.append(((f"Video {videos}: " if add_vision_id else "") + VIDEO_PLACEHOLDER, True))
        else:
          parts.append((item["text"], False))
    else:
      raise ValueError(f"message {i}: content must be a str or a list of items, got {type(content).__name__}")
    parts.append((f"{IM_END}\n", True))
  if add_generation_prompt:
    parts.append((GENERATION_PROMPT, True))
  return parts


def encode_parts(tokenizer, parts: Sequence[Part]) -> list[int]:
  """Token ids of ``"".join(text for text, _ in parts)`` where special tokens are recognised in markup parts only.

  The tokenizer's special tokens (``added_tokens_decoder`` entries marked special) are cut out of the markup parts;
  the text between two of them (markup and data joined, so that word pieces merge across part boundaries as they
  would in the whole string) is tokenised with ``split_special_tokens=True``: a special token spelled in data stays
  ordinary text. Ordinary added tokens (``<tool_call>``) are matched everywhere, as in the whole string. The
  tokenizer splits at special tokens before anything else, so for data that spells none the ids equal
  ``tokenizer(whole_text, add_special_tokens=False)``.
  """
  specials = sorted({t.content for t in tokenizer.added_tokens_decoder.values() if t.special}, key=len, reverse=True)
  split = re.compile("(" + "|".join(map(re.escape, specials)) + ")") if specials else None
  ids: list[int] = []
  run: list[str] = []

  def flush():
    text = "".join(run)
    run.clear()
    if text:
      ids.extend(tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"])

  for text, markup in parts:
    if not markup or split is None:
      run.append(text)
      continue
    for k, piece in enumerate(split.split(text)):
      if k % 2:  # a special token of the template
        flush()
        ids.append(int(tokenizer.convert_tokens_to_ids(piece)))
      else:
        run.append(piece)
  flush()
  return ids


def expand_image_pads(
  token_ids: Sequence[int],
  image_token_counts: Sequence[int],
  image_token_id: int,
) -> list[int]:
  """Replace the k-th single ``<|image_pad|>`` id in ``token_ids`` by ``image_token_counts[k]`` copies of it.

  ``token_ids`` must be the unexpanded ids of ``render`` output (one pad per image): every occurrence of
  ``image_token_id`` counts as one image. ``image_token_counts[k]`` is ``t * h * w // 4`` of the k-th image's grid.

  Raises:
    ValueError: the number of pads differs from ``len(image_token_counts)``, or a count is not a positive int.
  """
  counts = [int(c) for c in image_token_counts]
  for k, (c, raw) in enumerate(zip(counts, image_token_counts)):
    if c != raw or c < 1:
      raise ValueError(f"image_token_counts[{k}] = {raw!r}: must be a positive integer")
  image_token_id = int(image_token_id)
  ids = [int(t) for t in token_ids]
  num_pads = sum(1 for t in ids if t == image_token_id)
  if num_pads != len(counts):
    raise ValueError(
      f"found {num_pads} image pad token(s) (id {image_token_id}) in token_ids but got {len(counts)} image token "
      "count(s); expected one unexpanded pad per image"
    )
  out: list[int] = []
  k = 0
  for t in ids:
    if t == image_token_id:
      out.extend([t] * counts[k])
      k += 1
    else:
      out.append(t)
  return out
