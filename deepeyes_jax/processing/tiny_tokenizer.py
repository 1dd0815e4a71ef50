"""A tiny, deterministic stand-in for the Qwen2.5-VL tokenizer, for tests (no model hub access needed).

``build_tiny_tokenizer(out_dir)`` trains a byte-level BPE (HF ``tokenizers``) on a small built-in corpus (DeepEyes-style
prompts, tool calls, ``<think>``/``<answer>`` tags, digits, letters, punctuation) with exactly the text pipeline of
Qwen2's tokenizer.json: NFC normalizer, the Qwen2 split regex (digits are single tokens) then ``ByteLevel``
(no prefix space), ``ByteLevel`` decoder, BPE without unk / byte fallback. It writes a directory that
``transformers.AutoTokenizer.from_pretrained`` loads as ``Qwen2Tokenizer`` (transformers 5: a ``TokenizersBackend``
that rebuilds this same pipeline around the vocab/merges of tokenizer.json), with ``eos_token="<|im_end|>"``,
``pad_token="<|endoftext|>"``, no bos / unk, and the Qwen2.5-VL chat template.

Id layout. Regular (BPE) tokens take ids ``0 .. vocab_size - 1`` (the 256 byte symbols first). The 22 added tokens of
Qwen2.5 follow in their real order, so ``tiny_id = vocab_size + (real_id - 151643)``::

    real id  token                  special     tiny id (vocab_size=512)
    151643   <|endoftext|>          yes         512   (pad)
    151644   <|im_start|>           yes         513
    151645   <|im_end|>             yes         514   (eos)
    151646.. <|object_ref_start|>.. yes         515..
    151652   <|vision_start|>       yes         521
    151653   <|vision_end|>         yes         522
    151654   <|vision_pad|>         yes         523
    151655   <|image_pad|>          yes         524
    151656   <|video_pad|>          yes         525
    151657   <tool_call>            no          526   (ordinary added token, as in the real vocab)
    151658   </tool_call>           no          527
    151659.. <|fim_prefix|>..       no          528..533

so the full vocabulary has ``vocab_size + 22`` entries. ``added_token_ids(vocab_size)`` returns this mapping and
``special_token_ids(tokenizer)`` reads the named ids back from any loaded tokenizer (tiny or real).

Round trip: ``decode(encode(text)) == unicodedata.normalize("NFC", text)`` for any text (byte level: no unknown
tokens), i.e. exact for NFC text. The NFC step is Qwen2's own normalizer, kept for fidelity.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

from deepeyes_jax.processing import chat

# Qwen2's pre-tokenization regex (tokenizer.json "Split" pattern; transformers' tokenization_qwen2.PRETOKENIZE_REGEX).
QWEN2_PRETOKENIZE_REGEX = (
  r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

# The added tokens of the Qwen2.5 / Qwen2.5-VL vocabulary in id order from REAL_FIRST_ADDED_ID: (content, special).
REAL_FIRST_ADDED_ID = 151643
ADDED_TOKENS: tuple[tuple[str, bool], ...] = (
  ("<|endoftext|>", True),
  ("<|im_start|>", True),
  ("<|im_end|>", True),
  ("<|object_ref_start|>", True),
  ("<|object_ref_end|>", True),
  ("<|box_start|>", True),
  ("<|box_end|>", True),
  ("<|quad_start|>", True),
  ("<|quad_end|>", True),
  ("<|vision_start|>", True),
  ("<|vision_end|>", True),
  ("<|vision_pad|>", True),
  ("<|image_pad|>", True),
  ("<|video_pad|>", True),
  ("<tool_call>", False),
  ("</tool_call>", False),
  ("<|fim_prefix|>", False),
  ("<|fim_middle|>", False),
  ("<|fim_suffix|>", False),
  ("<|fim_pad|>", False),
  ("<|repo_name|>", False),
  ("<|file_sep|>", False),
)
REAL_ADDED_TOKEN_IDS: dict[str, int] = {tok: REAL_FIRST_ADDED_ID + i for i, (tok, _) in enumerate(ADDED_TOKENS)}

# Names used by special_token_ids, and their token strings.
SPECIAL_TOKEN_NAMES: dict[str, str] = {
  "endoftext": chat.ENDOFTEXT,
  "im_start": chat.IM_START,
  "im_end": chat.IM_END,
  "vision_start": chat.VISION_START,
  "vision_end": chat.VISION_END,
  "image_pad": chat.IMAGE_PAD,
  "video_pad": chat.VIDEO_PAD,
}

DEFAULT_VOCAB_SIZE = 512  # regular (BPE) tokens; the added tokens come on top
MIN_VOCAB_SIZE = 256  # the byte alphabet
NUM_ADDED_TOKENS = len(ADDED_TOKENS)

_TOOL_SCHEMA = {
  "type": "function",
  "function": {
    "name": "image_zoom_in_tool",
    "description": (
      "Zoom in on a region of the image by cropping it to a bounding box (bbox), optionally naming the object in it."
    ),
    "parameters": {
      "type": "object",
      "properties": {
        "bbox_2d": {
          "type": "array",
          "items": {"type": "number"},
          "minItems": 4,
          "maxItems": 4,
          "description": "The region to zoom in on as [x1, y1, x2, y2]: top-left corner, then bottom-right corner.",
        },
        "label": {"type": "string", "description": "The name of the object inside the bounding box (optional)."},
      },
      "required": ["bbox_2d"],
    },
  },
}

# Written for this module in the style of the DeepEyes prompts (system prompt with the zoom-in tool, user instruction,
# tool response, model turns). Only used as BPE training text; its exact wording does not matter.
_CORPUS_TEXT = (
  """You are a helpful assistant.

# Tools

You may call one or more functions to assist with the user query.

You are provided with function signatures within <tools></tools> XML tags:
<tools>
"""
  + json.dumps(_TOOL_SCHEMA)
  + """
</tools>

# How to call a tool
Return a json object with function name and arguments within <tool_call></tool_call> XML tags:
<tool_call>
{"name": <function-name>, "arguments": <args-json-object>}
</tool_call>

**Example**:
<tool_call>
{"name": "image_zoom_in_tool", "arguments": {"bbox_2d": [10, 20, 100, 200], "label": "the apple on the desk"}}
</tool_call>

Think first, call **image_zoom_in_tool** if needed, then answer. Format strictly as: <think>...</think> \
<tool_call>...</tool_call> (if tools needed) <answer>...</answer>

<think>The question asks for the color of the small sign near the door. The sign is too small to read in the \
full image, so I will zoom in on the region around it.</think>
<tool_call>
{"name": "image_zoom_in_tool", "arguments": {"bbox_2d": [312, 48, 596, 270], "label": "sign"}}
</tool_call>

<tool_response>Here is the zoomed in image for your grounding. Please think again about the question and answer \
it, or call the tool again if you still cannot see the details.</tool_response>

<think>Now I can see the sign clearly. The text on the sign is white and the background is red, so the answer \
is red.</think>
<answer>red</answer>

Question: What is the number written on the bus? Options: (A) 12 (B) 27 (C) 45 (D) 89
<think>The bus is in the lower left part of the image. I need a closer look at the number.</think>
<tool_call>
{"name": "image_zoom_in_tool", "arguments": {"bbox_2d": [0, 410, 233, 640]}}
</tool_call>
<think>The zoomed image shows the number 27 on the front of the bus.</think>
<answer>B</answer>

Question: How many people are standing on the bridge? Answer the question using a single word or phrase.
<think>There are three people on the bridge in the zoomed view.</think>
<answer>3</answer>

Question: Is the cat on the left or on the right of the chair?
<think>The cat sits to the right of the chair, next to the window.</think>
<answer>right</answer>

Question: Which object is closer to the camera, the bottle or the cup?
<think>After zooming in, the cup overlaps the bottle, so the cup is closer.</think>
<answer>the cup</answer>

The answer is correct. The answer is wrong. The format is invalid. Please answer with the option letter.
What time does the clock show? What color is the shirt of the man? What is written on the board?
Where is the dog? Who is holding the umbrella? Why is the road wet? When was the photo taken?

Question: What brand is the laptop on the table? The logo is tiny, so a zoomed crop of the lid helps.
Question: Read the license plate of the white truck parked behind the fence.
Question: Which floor of the building has an open window? Count from the ground floor upward.
Question: What kind of bird is sitting on the wire? Choose between sparrow, pigeon, crow and parrot.
Question: Describe the pattern printed on the woman's dress in the bottom right corner of the picture.
Question: Is the traffic light green, yellow or red? Give a short answer.
Question: What is the price shown on the menu board above the counter?
Question: How many windows does the small house have? Include the ones on the roof.
<think>The first crop was not detailed enough; the text is still blurry. I will zoom in further on the upper half of \
that region to read the letters.</think>
<think>Comparing both crops, the left object is larger and sharper, which means it is nearer to the viewer.</think>
<think>I cannot find the object in the current view. It might be hidden in the shadow near the wall, so I will \
inspect that area.</think>
The image shows a street scene with cars, buses, bicycles, trees, buildings and pedestrians walking along the \
sidewalk during the afternoon. A large poster on the wall advertises a concert next Saturday evening.
Reward: accuracy, format, tool usage. Rollout, trajectory, observation, policy, value, advantage, grounding.
"""
)


def training_corpus() -> list[str]:
  """The built-in BPE training corpus (a fixed list of strings)."""
  lines = _CORPUS_TEXT.split("\n\n")
  letters = "abcdefghijklmnopqrstuvwxyz"
  lines.append(letters + " " + letters.upper() + " " + " ".join(letters) + " " + " ".join(letters.upper()))
  lines.append("0 1 2 3 4 5 6 7 8 9 10 20 100 200 640 480 1024 3.14 -1 +1 1e-6")
  lines.append("! \" # $ % & ' ( ) * + , - . / : ; < = > ? @ [ \\ ] ^ _ ` { | } ~ ... -- ** ## ``` \t \n \r\n")
  for x1, y1, x2, y2 in ((10, 20, 100, 200), (5, 7, 93, 141), (128, 64, 512, 448), (0, 0, 27, 31), (333, 21, 870, 999)):
    call = {"name": "image_zoom_in_tool", "arguments": {"bbox_2d": [x1, y1, x2, y2]}}
    lines.append(f"<tool_call>\n{json.dumps(call)}\n</tool_call>")
  for tag in ("think", "answer", "tool_call", "tool_response", "tools", "image"):
    lines.append(f"<{tag}> </{tag}> <{tag}>\n</{tag}>\n<{tag}></{tag}>")
  lines.append("user assistant system tool image text video Picture Video")
  lines.append("Grüße, café, naïve, 東京, 北京, Ελληνικά, русский, 😀 👍")
  return lines


def added_token_ids(vocab_size: int = DEFAULT_VOCAB_SIZE) -> dict[str, int]:
  """Token string -> id in a tiny tokenizer built with ``vocab_size`` regular tokens (all 22 added tokens)."""
  return {tok: vocab_size + i for i, (tok, _) in enumerate(ADDED_TOKENS)}


def _backend(vocab_size: int, extra_corpus: Sequence[str] = ()) -> Tokenizer:
  tok = Tokenizer(
    models.BPE(
      unk_token=None,
      continuing_subword_prefix="",
      end_of_word_suffix="",
      fuse_unk=False,
      byte_fallback=False,
      ignore_merges=False,
    )
  )
  tok.normalizer = normalizers.NFC()
  tok.pre_tokenizer = pre_tokenizers.Sequence(
    [
      pre_tokenizers.Split(Regex(QWEN2_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
      pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
    ]
  )
  tok.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
  tok.decoder = decoders.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
  trainer = trainers.BpeTrainer(
    vocab_size=vocab_size,
    min_frequency=0,
    show_progress=False,
    special_tokens=[],
    initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
  )
  tok.train_from_iterator([*training_corpus(), *extra_corpus], trainer=trainer)
  got = tok.get_vocab_size()
  if got != vocab_size:
    raise ValueError(f"the built-in corpus supports at most {got} regular tokens, asked for vocab_size={vocab_size}")
  tok.add_tokens(
    [AddedToken(t, single_word=False, lstrip=False, rstrip=False, normalized=False, special=s) for t, s in ADDED_TOKENS]
  )
  return tok


def _tokenizer_config(vocab_size: int) -> dict[str, Any]:
  added = {
    str(i): {
      "content": tok,
      "lstrip": False,
      "normalized": False,
      "rstrip": False,
      "single_word": False,
      "special": special,
    }
    for tok, i, special in ((t, vocab_size + k, s) for k, (t, s) in enumerate(ADDED_TOKENS))
  }
  return {
    "add_bos_token": False,
    "add_prefix_space": False,
    "added_tokens_decoder": added,
    "additional_special_tokens": [t for t, s in ADDED_TOKENS if s and t != chat.ENDOFTEXT],
    "bos_token": None,
    "chat_template": chat.QWEN2_5_VL_CHAT_TEMPLATE,
    "clean_up_tokenization_spaces": False,
    "eos_token": chat.IM_END,
    "errors": "replace",
    "extra_special_tokens": {},
    "model_max_length": 131072,
    "pad_token": chat.ENDOFTEXT,
    "split_special_tokens": False,
    "tokenizer_class": "Qwen2Tokenizer",
    "unk_token": None,
  }


def build_tiny_tokenizer(
  out_dir: str | os.PathLike, vocab_size: int = DEFAULT_VOCAB_SIZE, extra_corpus: Sequence[str] = ()
) -> dict[str, int]:
  """Train the tiny Qwen2.5-VL-style tokenizer and save it to ``out_dir`` (created if needed).

  ``extra_corpus``: more training texts (e.g. ``data.synthetic.corpus()``), so that the merges fit a task's texts.

  Writes ``tokenizer.json`` and ``tokenizer_config.json``; the same arguments always give byte-identical files.
  ``vocab_size`` is the number of regular BPE tokens (``256 <= vocab_size``, bounded by what the corpus supports);
  the 22 Qwen added tokens get ids ``vocab_size ..  vocab_size + 21``.

  Returns:
    ``added_token_ids(vocab_size)``: each added token string -> its id.
  """
  if not isinstance(vocab_size, int) or vocab_size < MIN_VOCAB_SIZE:
    raise ValueError(f"vocab_size must be an int >= {MIN_VOCAB_SIZE} (the byte alphabet), got {vocab_size!r}")
  tok = _backend(vocab_size, tuple(extra_corpus))
  ids = added_token_ids(vocab_size)
  for t, i in ids.items():
    if tok.token_to_id(t) != i:  # cannot happen unless the tokenizers library changes how it assigns ids
      raise RuntimeError(f"added token {t!r} got id {tok.token_to_id(t)}, expected {i}")
  os.makedirs(out_dir, exist_ok=True)
  files = {
    "tokenizer.json": tok.to_str(pretty=True) + "\n",
    "tokenizer_config.json": json.dumps(_tokenizer_config(vocab_size), indent=2, ensure_ascii=False) + "\n",
  }
  for name, text in files.items():
    with open(os.path.join(out_dir, name), "w", encoding="utf-8", newline="\n") as f:
      f.write(text)
  return ids


def special_token_ids(tokenizer: Any) -> dict[str, int]:
  """Name -> id of the Qwen2.5-VL special tokens (``SPECIAL_TOKEN_NAMES``) in a loaded transformers tokenizer.

  Works for the tiny tokenizer and the real one (``image_pad`` is 151655 there). Raises ``ValueError`` when a token
  is missing or does not encode to exactly one id.
  """
  out: dict[str, int] = {}
  for name, token in SPECIAL_TOKEN_NAMES.items():
    ids = tokenizer.encode(token, add_special_tokens=False)
    tid = tokenizer.convert_tokens_to_ids(token)
    if len(ids) != 1 or ids[0] != tid or tid is None or tid == tokenizer.unk_token_id:
      raise ValueError(f"{name} ({token}) is not a single token of this tokenizer (encodes to {ids})")
    out[name] = int(tid)
  return out


def tiny_to_real_ids(vocab_size: int = DEFAULT_VOCAB_SIZE) -> Mapping[int, int]:
  """Tiny id -> real Qwen2.5-VL id, for the added tokens only (regular token ids do not correspond)."""
  return {vocab_size + i: REAL_FIRST_ADDED_ID + i for i in range(NUM_ADDED_TOKENS)}
