"""Chat rendering (deepeyes_jax.processing.chat) and the tiny Qwen2.5-VL test tokenizer (processing.tiny_tokenizer)."""

import os
import subprocess
import sys
import unicodedata

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from deepeyes_jax.processing import chat
from deepeyes_jax.processing import tiny_tokenizer as tk

# ----------------------------------------------------------------------------------------------------------------------
# Fixtures


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
  path = tmp_path_factory.mktemp("tiny_tokenizer")
  ids = tk.build_tiny_tokenizer(path)
  return path, ids


@pytest.fixture(scope="module")
def hf_tok(tiny_dir):
  import transformers

  return transformers.AutoTokenizer.from_pretrained(tiny_dir[0])


@pytest.fixture(scope="module")
def raw_tok(tiny_dir):
  from tokenizers import Tokenizer

  return Tokenizer.from_file(str(tiny_dir[0] / "tokenizer.json"))


def _template(tok, messages, add_generation_prompt, **kw):
  return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt, **kw)


# ----------------------------------------------------------------------------------------------------------------------
# render(): hand-written expectations (from the chat format facts, not from the code)


def test_render_hand_written_text_only_default_system():
  messages = [{"role": "user", "content": "What is 2+2?"}]
  expected = (
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n"
    "<|im_start|>assistant\n"
  )
  assert chat.render(messages) == expected
  assert chat.render(messages, add_generation_prompt=False) == expected[: -len("<|im_start|>assistant\n")]


CASE_MULTI_TURN = [
  {"role": "system", "content": "Think step by step."},
  {
    "role": "user",
    "content": [{"type": "image", "image": "file:///a.png"}, {"type": "text", "text": "What is on the sign?"}],
  },
  {
    "role": "assistant",
    "content": '<think>Zoom.</think>\n<tool_call>\n{"name": "image_zoom_in_tool"}\n</tool_call>',
  },
  {
    "role": "user",
    "content": [
      {"type": "text", "text": "<tool_response>"},
      {"type": "image"},
      {"type": "text", "text": "</tool_response>"},
    ],
  },
]
EXPECTED_MULTI_TURN = (
  "<|im_start|>system\nThink step by step.<|im_end|>\n"
  "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>What is on the sign?<|im_end|>\n"
  '<|im_start|>assistant\n<think>Zoom.</think>\n<tool_call>\n{"name": "image_zoom_in_tool"}\n</tool_call><|im_end|>\n'
  "<|im_start|>user\n<tool_response><|vision_start|><|image_pad|><|vision_end|></tool_response><|im_end|>\n"
)


def test_render_hand_written_system_images_multi_turn():
  assert chat.render(CASE_MULTI_TURN, add_generation_prompt=False) == EXPECTED_MULTI_TURN
  assert chat.render(CASE_MULTI_TURN) == EXPECTED_MULTI_TURN + "<|im_start|>assistant\n"


def test_string_image_placeholder_is_not_special():
  text = chat.render([{"role": "user", "content": "<image>\nWhat is this?"}])
  assert "<image>\nWhat is this?<|im_end|>" in text
  assert chat.IMAGE_PAD not in text and chat.VISION_START not in text


# ----------------------------------------------------------------------------------------------------------------------
# render() == the real Qwen2.5-VL chat template (as shipped in the tiny tokenizer)

CONVERSATIONS = {
  "text_only_no_system": [{"role": "user", "content": "Hello"}],
  "system_given": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
  "image_then_text": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe it."}]}],
  "hf_style_image": [
    {"role": "user", "content": [{"type": "image", "image": "http://x/y.png"}, {"type": "text", "text": "Q?"}]}
  ],
  "image_url_and_video": [
    {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "u"}}, {"type": "video"}]},
  ],
  "multi_turn_with_assistant": CASE_MULTI_TURN,
  "system_list_content_and_tool": [
    {"role": "system", "content": [{"type": "text", "text": "S"}]},
    {"role": "user", "content": "a"},
    {"role": "assistant", "content": "b"},
    {"role": "tool", "content": [{"type": "image"}, {"type": "image"}]},
    {"role": "assistant", "content": ""},
  ],
  "empty_list_content": [{"role": "user", "content": []}],
  "assistant_first_unicode": [{"role": "assistant", "content": "东京 😀\n\n  <image> {{ x }}"}],
}


@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
def test_render_matches_apply_chat_template(hf_tok, name, add_generation_prompt):
  messages = CONVERSATIONS[name]
  assert chat.render(messages, add_generation_prompt) == _template(hf_tok, messages, add_generation_prompt)


def test_render_add_vision_id_matches_template(hf_tok):
  messages = CONVERSATIONS["system_list_content_and_tool"] + CONVERSATIONS["image_url_and_video"]
  got = chat.render(messages, add_vision_id=True)
  assert got == _template(hf_tok, messages, True, add_vision_id=True)
  assert "Picture 2: <|vision_start|>" in got and "Picture 3: " in got and "Video 1: " in got


_item = st.one_of(
  st.builds(lambda t: {"type": "text", "text": t}, st.text(max_size=12)),
  st.just({"type": "image"}),
  st.builds(lambda s: {"type": "image", "image": s}, st.text(max_size=4)),
  st.just({"type": "video"}),
)
_message = st.builds(
  lambda role, content: {"role": role, "content": content},
  st.sampled_from(chat.ROLES),
  st.one_of(st.text(max_size=20), st.lists(_item, max_size=4)),
)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(messages=st.lists(_message, min_size=1, max_size=5), add_generation_prompt=st.booleans())
def test_render_matches_template_random_conversations(hf_tok, messages, add_generation_prompt):
  assert chat.render(messages, add_generation_prompt) == _template(hf_tok, messages, add_generation_prompt)


@pytest.mark.parametrize(
  "messages, match",
  [
    ([], "empty"),
    ([{"role": "user", "content": "a"}, {"role": "robot", "content": "b"}], r"message 1: unknown role 'robot'"),
    ([{"content": "b"}], r"message 0: unknown role None"),
    (
      [
        {"role": "user", "content": "a"},
        {"role": "user", "content": [{"type": "text", "text": "x"}, {"type": "audio"}]},
      ],
      r"message 1, content item 1: unknown content type 'audio'",
    ),
    ([{"role": "user", "content": [{"text": "no type"}]}], r"message 0, content item 0: unknown content type None"),
    ([{"role": "user", "content": [{"type": "text"}]}], r"message 0, content item 0: a text item needs a str 'text'"),
    ([{"role": "user", "content": [{"type": "text", "text": "t", "image": 1}]}], r"message 0, content item 0"),
    ([{"role": "user", "content": [{"type": "image_url"}]}], r"message 0, content item 0: an image_url item needs"),
    ([{"role": "user", "content": ["just a string"]}], r"message 0, content item 0: a content item must be a dict"),
    ([{"role": "user", "content": None}], r"message 0: content must be a str or a list"),
    ([{"role": "user", "content": 3}], r"message 0: content must be a str or a list"),
    ("hello", r"messages must be a list"),
    (["hello"], r"message 0: must be a dict"),
  ],
)
def test_render_errors(messages, match):
  with pytest.raises(ValueError, match=match):
    chat.render(messages)


# ----------------------------------------------------------------------------------------------------------------------
# expand_image_pads


def test_expand_image_pads():
  pad, vs, ve = 9, 7, 8
  ids = [1, vs, pad, ve, 2, 3, vs, pad, ve, 4]
  assert chat.expand_image_pads(ids, [3, 1], pad) == [1, vs, pad, pad, pad, ve, 2, 3, vs, pad, ve, 4]
  assert chat.expand_image_pads(ids, [1, 2], pad) == [1, vs, pad, ve, 2, 3, vs, pad, pad, ve, 4]
  assert chat.expand_image_pads([1, 2, 3], [], pad) == [1, 2, 3]
  assert chat.expand_image_pads((x for x in [pad]), [2], pad) == [pad, pad]  # any iterable of ints


@pytest.mark.parametrize(
  "ids, counts, match",
  [
    ([1, 9, 2, 9], [4], r"found 2 image pad token\(s\) \(id 9\) in token_ids but got 1 image token count"),
    ([1, 2], [4], r"found 0 image pad token\(s\) \(id 9\) in token_ids but got 1"),
    ([9], [], r"found 1 image pad token\(s\) \(id 9\) in token_ids but got 0"),
    ([9, 9], [2, 0], r"image_token_counts\[1\] = 0: must be a positive integer"),
    ([9], [1.5], r"image_token_counts\[0\] = 1.5"),
  ],
)
def test_expand_image_pads_errors(ids, counts, match):
  with pytest.raises(ValueError, match=match):
    chat.expand_image_pads(ids, counts, 9)


def test_render_encode_expand_end_to_end(hf_tok):
  ids = hf_tok.encode(chat.render(CASE_MULTI_TURN), add_special_tokens=False)
  sp = tk.special_token_ids(hf_tok)
  out = chat.expand_image_pads(ids, [4, 6], sp["image_pad"])
  assert len(out) == len(ids) + 3 + 5
  starts = [i for i, t in enumerate(out) if t == sp["vision_start"]]
  assert [out[s + 1 : s + 1 + n] for s, n in zip(starts, [4, 6])] == [[sp["image_pad"]] * 4, [sp["image_pad"]] * 6]
  assert [out[s + 1 + n] for s, n in zip(starts, [4, 6])] == [sp["vision_end"]] * 2
  assert hf_tok.decode(out).count(chat.IMAGE_PAD) == 10


# ----------------------------------------------------------------------------------------------------------------------
# The tiny tokenizer


def test_tiny_tokenizer_is_deterministic(tmp_path, tiny_dir):
  """Same bytes when built again in this process and in a fresh process (Rust hash maps are seeded per process)."""
  here, fresh = tmp_path / "again", tmp_path / "fresh"
  tk.build_tiny_tokenizer(here)
  code = f"from deepeyes_jax.processing import tiny_tokenizer as tk; tk.build_tiny_tokenizer({str(fresh)!r})"
  subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "PYTHONHASHSEED": "random"})
  names = sorted(os.listdir(tiny_dir[0]))
  assert names == ["tokenizer.json", "tokenizer_config.json"]
  for other in (here, fresh):
    assert sorted(os.listdir(other)) == names
    for name in names:
      assert (other / name).read_bytes() == (tiny_dir[0] / name).read_bytes(), name


def test_tiny_tokenizer_vocab_size_argument(tmp_path):
  ids = tk.build_tiny_tokenizer(tmp_path / "v1024", vocab_size=1024)
  assert ids[chat.IMAGE_PAD] == 1024 + 12 and ids[chat.ENDOFTEXT] == 1024
  from tokenizers import Tokenizer

  raw = Tokenizer.from_file(str(tmp_path / "v1024" / "tokenizer.json"))
  assert raw.get_vocab_size(with_added_tokens=False) == 1024
  assert raw.get_vocab_size(with_added_tokens=True) == 1024 + tk.NUM_ADDED_TOKENS
  with pytest.raises(ValueError, match="at most"):
    tk.build_tiny_tokenizer(tmp_path / "huge", vocab_size=100_000)
  with pytest.raises(ValueError, match="vocab_size must be"):
    tk.build_tiny_tokenizer(tmp_path / "small", vocab_size=100)


def test_autotokenizer_loads_qwen2_tokenizer(hf_tok, tiny_dir):
  _, ids = tiny_dir
  assert type(hf_tok).__name__ == "Qwen2Tokenizer"
  assert hf_tok.is_fast
  assert len(hf_tok) == tk.DEFAULT_VOCAB_SIZE + tk.NUM_ADDED_TOKENS
  assert hf_tok.eos_token == "<|im_end|>" and hf_tok.eos_token_id == ids["<|im_end|>"]
  assert hf_tok.pad_token == "<|endoftext|>" and hf_tok.pad_token_id == ids["<|endoftext|>"]
  assert hf_tok.bos_token is None and hf_tok.unk_token is None
  assert hf_tok.chat_template == chat.QWEN2_5_VL_CHAT_TEMPLATE
  assert hf_tok.encode("hi", add_special_tokens=True) == hf_tok.encode("hi", add_special_tokens=False)  # no bos/eos


def test_added_tokens_ids_and_specialness(hf_tok, tiny_dir):
  _, ids = tiny_dir
  assert ids == tk.added_token_ids(tk.DEFAULT_VOCAB_SIZE)
  assert list(ids.values()) == list(range(tk.DEFAULT_VOCAB_SIZE, tk.DEFAULT_VOCAB_SIZE + 22))
  decoder = hf_tok.added_tokens_decoder
  for (token, special), (token2, i) in zip(tk.ADDED_TOKENS, ids.items()):
    assert token == token2
    assert hf_tok.encode(token, add_special_tokens=False) == [i], token
    assert decoder[i].content == token and decoder[i].special == special, token
  # As in the real Qwen2.5 vocab: tool-call and FIM markers are ordinary (non-special) added tokens.
  non_special = {"<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>"}
  non_special |= {"<|repo_name|>", "<|file_sep|>"}
  assert {t.content for t in decoder.values() if not t.special} == non_special
  assert len(decoder) == 22 and "<tool_call>" not in hf_tok.all_special_tokens
  assert hf_tok.decode([ids["<tool_call>"], ids[chat.IMAGE_PAD]], skip_special_tokens=True) == "<tool_call>"
  # the real Qwen2.5-VL ids, via the documented offset
  real = tk.tiny_to_real_ids(tk.DEFAULT_VOCAB_SIZE)
  assert real[ids[chat.IMAGE_PAD]] == 151655 and real[ids[chat.IM_END]] == 151645
  assert real[ids[chat.VISION_START]] == 151652 and real[ids["<tool_call>"]] == 151657
  assert tk.REAL_ADDED_TOKEN_IDS[chat.VIDEO_PAD] == 151656 and tk.REAL_ADDED_TOKEN_IDS[chat.ENDOFTEXT] == 151643


def test_special_token_ids(hf_tok, tiny_dir):
  _, ids = tiny_dir
  sp = tk.special_token_ids(hf_tok)
  assert sp == {name: ids[token] for name, token in tk.SPECIAL_TOKEN_NAMES.items()}
  assert set(sp) == {"image_pad", "vision_start", "vision_end", "im_start", "im_end", "endoftext", "video_pad"}
  assert hf_tok.encode(chat.IMAGE_PLACEHOLDER, add_special_tokens=False) == [
    sp["vision_start"],
    sp["image_pad"],
    sp["vision_end"],
  ]
  assert hf_tok.encode("a" + chat.IMAGE_PAD * 3 + "b", add_special_tokens=False)[1:4] == [sp["image_pad"]] * 3


def test_special_token_ids_rejects_a_tokenizer_without_them():
  class NoVision:
    unk_token_id = None

    def encode(self, text, add_special_tokens=False):
      return [1] if text == chat.ENDOFTEXT else [2, 3]

    def convert_tokens_to_ids(self, token):
      return 1 if token == chat.ENDOFTEXT else None

  with pytest.raises(ValueError, match=r"im_start \(<\|im_start\|>\) is not a single token"):
    tk.special_token_ids(NoVision())


def test_deepeyes_tags_are_few_tokens(hf_tok):
  for tag in ("<think>", "</think>", "<answer>", "</answer>"):
    assert len(hf_tok.encode(tag, add_special_tokens=False)) <= 3, tag
  for tag in ("<tool_call>", "</tool_call>"):
    assert len(hf_tok.encode(tag, add_special_tokens=False)) == 1, tag
  call = '{"name": "image_zoom_in_tool", "arguments": {"bbox_2d": [10, 20, 100, 200]}}'
  assert len(hf_tok.encode(call, add_special_tokens=False)) < len(call) // 2


def test_loaded_tokenizer_matches_tokenizer_json(hf_tok, raw_tok):
  """transformers 5 rebuilds Qwen2Tokenizer's pipeline in code; it must agree with the saved tokenizer.json."""
  text = chat.render(CASE_MULTI_TURN) + " Grüße 123 \r\n\t  東京😀 it's"
  assert hf_tok.encode(text, add_special_tokens=False) == raw_tok.encode(text).ids
  assert hf_tok.encode("2024", add_special_tokens=False) == [raw_tok.token_to_id(c) for c in "2024"]  # digit split


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(max_size=64))
def test_encode_decode_round_trip(hf_tok, raw_tok, text):
  assume("<|" not in text and "tool_call>" not in text)  # literal added tokens are tested separately
  ids = hf_tok.encode(text, add_special_tokens=False)
  assert ids == raw_tok.encode(text).ids
  assert all(0 <= i < tk.DEFAULT_VOCAB_SIZE for i in ids)
  assert hf_tok.decode(ids) == unicodedata.normalize("NFC", text)


def test_round_trip_with_special_tokens(hf_tok):
  text = chat.render(CASE_MULTI_TURN) + "<|file_sep|>x<|box_start|>(1,2)<|box_end|>"
  ids = hf_tok.encode(text, add_special_tokens=False)
  assert hf_tok.decode(ids) == text
  assert hf_tok.decode(ids, skip_special_tokens=True).startswith("system\nThink step by step.\nuser\nWhat is on")
