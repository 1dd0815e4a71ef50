"""A tiny Qwen2.5-VL and its tokenizer, made by code: the model of the embedded default (`configs/synthetic.py`).

`build_tiny_checkpoint(out_dir, ...)` writes a transformers-loadable directory -- a byte-level BPE tokenizer with the
22 Qwen added tokens and the Qwen2.5-VL chat template (`processing/tiny_tokenizer.py`), `config.json` and
`model.safetensors` of a randomly initialised Qwen2.5-VL -- which the trainer then loads through the real loader
(`from_pretrained`), exactly as it loads a hub checkpoint. Deterministic: the same arguments give the same files.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from deepeyes_jax.models.qwen2_5_vl.config import Qwen25VLConfig, TextConfig, VisionConfig
from deepeyes_jax.models.qwen2_5_vl.model import init_random
from deepeyes_jax.models.qwen2_5_vl.weights import save_pretrained
from deepeyes_jax.processing import tiny_tokenizer as tokenizer_lib


def tiny_config(
  *,
  vocab_size: int,
  hidden_size: int = 128,
  num_layers: int = 4,
  num_heads: int = 4,
  num_kv_heads: int = 2,
  vision_hidden_size: int = 64,
  vision_depth: int = 2,
  vision_heads: int = 2,
) -> Qwen25VLConfig:
  """A Qwen2.5-VL config with the tiny tokenizer's id layout (`vocab_size` regular tokens + 22 added ones).

  Everything else is the real architecture: GQA, M-RoPE, window + full attention in the vision tower (window 112 px,
  the last block full), the 2x2 patch merger. The defaults with `vocab_size=768` are the embedded default's model,
  the preset "tiny" (`presets.py`).
  """
  head_dim = hidden_size // num_heads
  if head_dim % 8:
    raise ValueError(f"hidden_size / num_heads = {head_dim} must be a multiple of 8 (M-RoPE sections)")
  quarter = head_dim // 8  # M-RoPE sections (t, h, w) over head_dim / 2 frequencies, as 16:24:24 in the 7B
  return Qwen25VLConfig(
    text=TextConfig(
      vocab_size=vocab_size + tokenizer_lib.NUM_ADDED_TOKENS,
      hidden_size=hidden_size,
      intermediate_size=3 * hidden_size,
      num_hidden_layers=num_layers,
      num_attention_heads=num_heads,
      num_key_value_heads=num_kv_heads,
      rope_theta=10000.0,
      mrope_section=(quarter, (head_dim // 2 - quarter) // 2, head_dim // 2 - quarter - (head_dim // 2 - quarter) // 2),
      max_position_embeddings=4096,
    ),
    vision=VisionConfig(
      depth=vision_depth,
      hidden_size=vision_hidden_size,
      intermediate_size=2 * vision_hidden_size,
      num_heads=vision_heads,
      out_hidden_size=hidden_size,
      window_size=112,
      fullatt_block_indexes=(vision_depth - 1,),
    ),
    tie_word_embeddings=False,
    **tokenizer_ids(vocab_size),
  )


def tokenizer_ids(vocab_size: int) -> dict[str, int]:
  """The special-token fields of a config for the tiny tokenizer with `vocab_size` regular tokens."""
  ids = tokenizer_lib.added_token_ids(vocab_size)
  return dict(
    image_token_id=ids["<|image_pad|>"],
    video_token_id=ids["<|video_pad|>"],
    vision_start_token_id=ids["<|vision_start|>"],
    vision_end_token_id=ids["<|vision_end|>"],
    bos_token_id=ids["<|endoftext|>"],
    eos_token_id=ids["<|im_end|>"],
    pad_token_id=ids["<|endoftext|>"],
  )


def with_tiny_tokenizer(config: Qwen25VLConfig, vocab_size: int = tokenizer_lib.DEFAULT_VOCAB_SIZE) -> Qwen25VLConfig:
  """`config`'s shape with the tiny tokenizer's vocabulary (`vocab_size` regular tokens + the 22 added ones) and
  special-token ids: any preset as a model the tiny tokenizer (`build_tiny_tokenizer`) can drive."""
  text = dataclasses.replace(config.text, vocab_size=vocab_size + tokenizer_lib.NUM_ADDED_TOKENS)
  return dataclasses.replace(config, text=text, **tokenizer_ids(vocab_size))


def fan_in_init(model, seed: int = 0):
  """Re-draws every weight for training from scratch: kernels normal(1/sqrt(fan_in)), embeddings normal(1), biases 0.

  `init_random`'s normal(0.02) is the HF convention for checkpoints that will be overwritten; in a 128-wide model
  it gives attention logits near 0 (uniform attention over the whole prompt), and the model takes hundreds of steps
  to leave that saddle. A 1M-parameter model must learn to attend to one small region of an image within minutes
  (data/synthetic.py): with fan-in scaling the query/key products start at O(1). Norm scales stay 1.
  """
  state = nnx.state(model, nnx.Param)
  leaves, treedef = jax.tree_util.tree_flatten_with_path(state)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  out = []
  for (path, x), k in zip(leaves, keys):
    name = next(e.key for e in reversed(path) if isinstance(e, jax.tree_util.DictKey))  # "weight", "bias", ...
    # weight: a Linear's (out, in), fan-in last; kernel: the vision qkv einsum's (in, 3, out).
    std = {"weight": x.shape[-1] ** -0.5, "kernel": x.shape[0] ** -0.5, "embedding": 1.0, "bias": 0.0}.get(name)
    if std is None:  # norm scales stay 1
      out.append(x)
      continue
    # A Linear's weight is drawn as (in, out) and transposed: the numbers of the embedded default's measured runs
    # (docs/synthetic.md), made when dense weights were stored (in, out).
    draw = jax.random.normal(k, x.shape[::-1], jnp.float32).T if name == "weight" else jax.random.normal(k, x.shape)
    out.append((std * draw).astype(x.dtype))
  state = jax.tree_util.tree_unflatten(treedef, out)
  nnx.update(model, state)
  return model


def build_tiny_checkpoint(
  out_dir: str | os.PathLike,
  *,
  vocab_size: int | None = None,
  corpus: Sequence[str] = (),
  seed: int = 0,
  init: str = "normal",
  config: Qwen25VLConfig | None = None,
  **model_kwargs,
) -> Qwen25VLConfig:
  """Writes tokenizer + config + random weights (float32) to `out_dir`. `corpus`: extra tokenizer training texts.

  `init`: "normal" (normal(0.02), the HF convention; tests) or "fan_in" (`fan_in_init`; training from scratch).

  Returns the config: `tiny_config(vocab_size=vocab_size or 768, **model_kwargs)`, or `config` (e.g. a preset) in the
  tiny tokenizer's layout (`with_tiny_tokenizer`) with `vocab_size` regular tokens (default: `config`'s vocabulary
  less the added tokens, for a config already in that layout).
  """
  out_dir = os.fspath(out_dir)
  if config is not None:
    if model_kwargs:
      raise ValueError(f"pass a config or tiny_config's arguments, not both: {sorted(model_kwargs)}")
    if vocab_size is None:
      vocab_size = config.text.vocab_size - tokenizer_lib.NUM_ADDED_TOKENS
    cfg = with_tiny_tokenizer(config, vocab_size)
  else:
    vocab_size = 768 if vocab_size is None else vocab_size
    cfg = tiny_config(vocab_size=vocab_size, **model_kwargs)
  tokenizer_lib.build_tiny_tokenizer(out_dir, vocab_size, corpus)
  model = init_random(cfg, dtype=jnp.float32, seed=seed)
  if init == "fan_in":
    fan_in_init(model, seed)
  elif init != "normal":
    raise ValueError(f"init must be 'fan_in' or 'normal', got {init!r}")
  save_pretrained(model, out_dir)
  with open(os.path.join(out_dir, "generation_config.json"), "w") as f:
    json.dump({"eos_token_id": cfg.eos_token_id, "pad_token_id": cfg.pad_token_id}, f)
  return cfg
