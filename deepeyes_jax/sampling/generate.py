"""`generate`: chat messages with images in, text out — the sampler end to end.

    tok = processing.tokenizer.load_tokenizer(checkpoint_dir)   # transformers tokenizer from a local directory
    texts = generate(sampler, tok, [[{"role": "user", "content": [{"type": "image", "image": pil},
                                                                  {"type": "text", "text": "What is this?"}]}]])

Messages are rendered with the Qwen2.5-VL chat template (`processing.chat.render`, identical to the tokenizer's
own template), tokenised (special tokens recognised in the template's markup only, never in message text), and
each `<|image_pad|>` is expanded to the image's t*h*w/4 tokens; images go through `processing.image.preprocess`.
Generation stops at `<|im_end|>` / `<|endoftext|>`.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from deepeyes_jax.processing import chat
from deepeyes_jax.processing import image as improc
from deepeyes_jax.sampling import rules
from deepeyes_jax.sampling.sampler import Chunk, Sampler, bucket, row_keys


def message_images(messages: Sequence[dict]) -> list[Any]:
  """The images of a conversation in order: the `image` field of each {"type": "image"} item."""
  out = []
  for i, m in enumerate(messages):
    content = m.get("content")
    if isinstance(content, list):
      for item in content:
        if isinstance(item, dict) and item.get("type") == "image":
          if "image" not in item:
            raise ValueError(f"message {i}: an image item needs an 'image' field (PIL image, path or bytes)")
          out.append(item["image"])
  return out


def encode_conversation(
  tokenizer, messages: Sequence[dict], *, image_token_id: int, min_pixels: int, max_pixels: int
) -> Chunk:
  """Token ids (image pads expanded) and preprocessed images of one conversation + generation prompt.

  Message text is data (`chat.encode_parts`): a question that spells `<|image_pad|>` or `<|im_start|>` gets
  ordinary tokens; only the template's own markup (role headers, each image item's placeholder) is special. A
  DeepEyes record's `<image>` is an image item by then (`data.deepeyes` turns each into one), so it stays an image.
  """
  ids = chat.encode_parts(tokenizer, chat.render_parts(messages, add_generation_prompt=True))
  images = []
  for src in message_images(messages):
    pv, grid = improc.preprocess(improc.load_image(src), min_pixels=min_pixels, max_pixels=max_pixels)
    images.append((pv, grid))
  counts = [improc.num_image_tokens(g) for _, g in images]
  return Chunk(chat.expand_image_pads(ids, counts, image_token_id), images)


def generate(
  sampler: Sampler,
  tokenizer,
  conversations: Sequence[Sequence[dict]],
  *,
  max_new_tokens: int = 256,
  params: rules.SamplingParams = rules.GREEDY,
  seed: int = 0,
  min_pixels: int = improc.MIN_PIXELS,
  max_pixels: int = improc.MAX_PIXELS,
) -> list[str]:
  """Generates one assistant reply per conversation (batched). Returns the decoded texts, stop token removed."""
  cfg = sampler.config
  chunks = [
    encode_conversation(
      tokenizer, msgs, image_token_id=cfg.image_token_id, min_pixels=min_pixels, max_pixels=max_pixels
    )
    for msgs in conversations
  ]
  capacity = bucket(max(len(c.tokens) for c in chunks) + max_new_tokens, 256)
  cache, logits = sampler.extend(sampler.init_cache(len(chunks), capacity), chunks)
  stops = [tokenizer.convert_tokens_to_ids(t) for t in (chat.IM_END, chat.ENDOFTEXT)]
  keys = None if params.greedy else row_keys(seed, len(chunks))
  _, out = sampler.decode(cache, logits, max_new_tokens=max_new_tokens, stop_tokens=stops, params=params, keys=keys)
  texts = []
  for toks, reason in zip(out.tokens, out.stop_reason):
    if reason == "stop_token":
      toks = toks[:-1]
    texts.append(tokenizer.decode(np.asarray(toks, np.int64).tolist(), skip_special_tokens=False))
  return texts
