"""`generate` end to end (chat template, tokenizer from a local directory, image processing, sampler) vs HF."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from PIL import Image
from transformers import Qwen2VLImageProcessorPil

from deepeyes_jax import sampling as smp
from deepeyes_jax.models import qwen2_5_vl as qvl
from deepeyes_jax.processing.tokenizer import load_tokenizer
from deepeyes_jax.sampling.generate import generate

MAXPIX = 64 * 28 * 28


def _image(seed, size):
  return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (*size[::-1], 3), dtype=np.uint8))


def _hf_reference(hf, tok, messages, images, max_new_tokens):
  """HF path: the tokenizer's own chat template, HF's PIL image processor, HF generate."""
  ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
  ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
  proc = Qwen2VLImageProcessorPil(size={"shortest_edge": 4 * 28 * 28, "longest_edge": MAXPIX})
  kw = {}
  if images:
    out = proc(images=images, return_tensors="np")
    counts = [int(np.prod(g)) // 4 for g in out["image_grid_thw"]]
    pad = tok.convert_tokens_to_ids("<|image_pad|>")
    expanded, k = [], 0
    for t in ids:
      if t == pad:
        expanded += [pad] * counts[k]
        k += 1
      else:
        expanded.append(t)
    ids = expanded
    kw = dict(
      pixel_values=torch.tensor(out["pixel_values"]),
      image_grid_thw=torch.tensor(out["image_grid_thw"]),
      mm_token_type_ids=torch.tensor([[int(t == pad) for t in ids]]),
    )
  hf.generation_config.eos_token_id = [
    tok.convert_tokens_to_ids("<|im_end|>"),
    tok.convert_tokens_to_ids("<|endoftext|>"),
  ]
  with torch.no_grad():
    gen = hf.generate(
      input_ids=torch.tensor([ids]),
      attention_mask=torch.ones(1, len(ids), dtype=torch.long),
      max_new_tokens=max_new_tokens,
      do_sample=False,
      suppress_tokens=[tok.convert_tokens_to_ids("<|image_pad|>"), tok.convert_tokens_to_ids("<|video_pad|>")],
      pad_token_id=tok.convert_tokens_to_ids("<|endoftext|>"),
      **kw,
    )[0, len(ids) :].tolist()
  stops = set(hf.generation_config.eos_token_id)
  if gen and gen[-1] in stops:
    gen = gen[:-1]
  return tok.decode(gen, skip_special_tokens=False)


def test_generate_matches_hf_pipeline(tiny_vlm):
  path, hf, cfg = tiny_vlm
  tok = load_tokenizer(str(path))
  model = qvl.from_pretrained(path, dtype=jnp.float32)
  assert model.config == cfg
  img_a, img_b = _image(1, (200, 120)), _image(2, (90, 300))
  conversations = [
    [{"role": "user", "content": [{"type": "image", "image": img_a}, {"type": "text", "text": "What is shown?"}]}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Count to five."}],
    [
      {
        "role": "user",
        "content": [
          {"type": "text", "text": "Compare"},
          {"type": "image", "image": img_b},
          {"type": "image", "image": img_a},
        ],
      },
    ],
  ]
  texts = generate(smp.Sampler(model), tok, conversations, max_new_tokens=20, max_pixels=MAXPIX)
  for conv, text in zip(conversations, texts):
    images = [
      it["image"] for m in conv if isinstance(m["content"], list) for it in m["content"] if it["type"] == "image"
    ]
    assert text == _hf_reference(hf, tok, conv, images, 20)
  assert all(isinstance(t, str) and t for t in texts)


def test_generate_rejects_image_items_without_data(tiny_vlm):
  path, _, _ = tiny_vlm
  tok = load_tokenizer(str(path))
  model = qvl.from_pretrained(path, dtype=jnp.float32)
  with pytest.raises(ValueError, match="message 0: an image item needs an 'image' field"):
    generate(smp.Sampler(model), tok, [[{"role": "user", "content": [{"type": "image"}]}]], max_new_tokens=2)
