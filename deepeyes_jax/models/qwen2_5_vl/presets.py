"""Named Qwen2.5-VL shapes: the real models and every small model the tests, benchmarks, notebooks and CLIs build.

    from deepeyes_jax.models.qwen2_5_vl.presets import preset
    cfg = preset("7b")        # Qwen/Qwen2.5-VL-7B-Instruct's config.json
    preset("7B")              # UnknownNameError (a KeyError and a ValueError): ... registered: ...; did you mean '7b'?

The real models (the hub config.json of each Instruct model; tests/test_config.py pins 3B and 7B):

- ``3b``, ``7b``, ``32b``: Qwen2.5-VL-3B / 7B / 32B-Instruct (3.75B / 8.29B / 33.5B parameters).
  `python -m deepeyes_jax.aot` compiles them by name (`--model`, or `model.size` of configs/deepeyes_7b.py).

Small models, random weights (each keeps the exact shape of the place it came from: tests compare against
transformers with these shapes, and recorded results depend on them):

- ``test`` (0.18M parameters): text 2 x 64 (4 heads / 2 KV heads, head_dim 16), vocabulary 256 with
  the special tokens at 250-253; vision 3 blocks x 32 with 56 px windows (several windows per image) and one
  full-attention block. The unit tests' model (tests/conftest.py `tiny_config`, and the `tiny_vlm` checkpoint: the
  same shape in the tiny tokenizer's layout).
- ``tiny`` (1.25M): `tiny.tiny_config(vocab_size=768)`: text 4 x 128 (head_dim 32), vision 2 x 64, the tiny
  tokenizer's 768 + 22 ids. The embedded default's model (configs/synthetic.py `model.tiny`), what
  `python -m deepeyes_jax.aot --model tiny` and the recipe's `size=tiny` variant compile (tests/test_aot.py).
- ``smoke`` (5.2M, nearly all embeddings): the real vocabulary (151,936) and special-token ids around a text 2 x 32
  and a vision 4 x 64 tower; tied embeddings. The random checkpoint of `python -m deepeyes_jax.models.qwen2_5_vl`.
- ``quickstart`` (0.18M): text 2 x 64, vision 2 x 32, tied, the tiny tokenizer's 512 + 22 ids. colab/quickstart.ipynb.
- ``sampling_bench`` (161M) and ``sampling_bench_quick`` (1.1M): `python -m deepeyes_jax.perf.sampling`
  (and `--quick`): text 8 x 1024 (16 heads / 4 KV, head_dim 64), vocabulary 32,000, vision 4 x 256; quick: text
  2 x 128, vocabulary 2,048, vision 2 x 64. Special tokens at the top of the vocabulary.
- ``rollout_bench`` (2.1M) and ``rollout_bench_quick`` (0.25M): `python -m deepeyes_jax.perf.rollout` (and
  `--quick`): `tiny_config` shapes with the tiny tokenizer's 512 + 22 ids, text 2 x 256 (head_dim 64; `--layers`
  changes the depth) and vision 2 x 64; quick: text 2 x 64, vision 2 x 32.

Add one with ``PRESETS.register("name")(config)``.
"""

from __future__ import annotations

from deepeyes_jax.models.qwen2_5_vl.config import Qwen25VLConfig, TextConfig, VisionConfig
from deepeyes_jax.models.qwen2_5_vl.tiny import tiny_config, tokenizer_ids
from deepeyes_jax.processing import tiny_tokenizer as tokenizer_lib
from deepeyes_jax.registry import Registry

PRESETS: Registry[Qwen25VLConfig] = Registry("model preset")


def preset(name: str) -> Qwen25VLConfig:
  """The config registered as `name`; UnknownNameError naming the known presets otherwise."""
  return PRESETS.get(name)


def names() -> list[str]:
  return PRESETS.names()


# --- the real models -------------------------------------------------------------------------------------------
_7B = Qwen25VLConfig()  # the dataclass defaults are Qwen2.5-VL-7B-Instruct's
PRESETS.register("7b")(_7B)
PRESETS.register("3b")(
  _7B.replace(
    text=TextConfig(
      vocab_size=151936,
      hidden_size=2048,
      intermediate_size=11008,
      num_hidden_layers=36,
      num_attention_heads=16,
      num_key_value_heads=2,
    ),
    vision=VisionConfig(out_hidden_size=2048),
    tie_word_embeddings=True,
  )
)
PRESETS.register("32b")(
  _7B.replace(
    text=TextConfig(
      hidden_size=5120,
      intermediate_size=27648,
      num_hidden_layers=64,
      num_attention_heads=40,
      num_key_value_heads=8,
    ),
    vision=VisionConfig(intermediate_size=3456, out_hidden_size=5120),
  )
)

# --- small models ----------------------------------------------------------------------------------------------
PRESETS.register("test")(
  Qwen25VLConfig(
    text=TextConfig(
      vocab_size=256,
      hidden_size=64,
      intermediate_size=96,
      num_hidden_layers=2,
      num_attention_heads=4,
      num_key_value_heads=2,
      rms_norm_eps=1e-6,
      rope_theta=1e6,
      mrope_section=(2, 3, 3),
      max_position_embeddings=4096,
    ),
    vision=VisionConfig(
      depth=3,
      hidden_size=32,
      intermediate_size=48,
      num_heads=2,
      out_hidden_size=64,
      window_size=56,
      fullatt_block_indexes=(1,),
    ),
    tie_word_embeddings=False,
    image_token_id=250,
    video_token_id=251,
    vision_start_token_id=252,
    vision_end_token_id=253,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
  )
)
PRESETS.register("tiny")(tiny_config(vocab_size=768))
PRESETS.register("smoke")(
  Qwen25VLConfig(
    text=TextConfig(
      vocab_size=151936,
      hidden_size=32,
      intermediate_size=64,
      num_hidden_layers=2,
      num_attention_heads=4,
      num_key_value_heads=2,
      mrope_section=(1, 1, 2),
    ),
    vision=VisionConfig(
      depth=4, hidden_size=64, intermediate_size=128, num_heads=4, out_hidden_size=32, fullatt_block_indexes=(1, 3)
    ),
    tie_word_embeddings=True,
  )
)
PRESETS.register("quickstart")(
  Qwen25VLConfig(
    text=TextConfig(
      vocab_size=tokenizer_lib.DEFAULT_VOCAB_SIZE + tokenizer_lib.NUM_ADDED_TOKENS,
      hidden_size=64,
      intermediate_size=96,
      num_hidden_layers=2,
      num_attention_heads=4,
      num_key_value_heads=2,
      mrope_section=(2, 3, 3),  # sums to head_dim / 2 = 8
    ),
    vision=VisionConfig(
      depth=2, hidden_size=32, intermediate_size=48, num_heads=2, out_hidden_size=64, fullatt_block_indexes=(1,)
    ),
    tie_word_embeddings=True,
    **tokenizer_ids(tokenizer_lib.DEFAULT_VOCAB_SIZE),
  )
)


def _top_of_vocabulary(text: TextConfig, vision: VisionConfig) -> Qwen25VLConfig:
  """Special tokens at the top of the vocabulary (the sampling benchmark draws prompts below them)."""
  v = text.vocab_size
  return Qwen25VLConfig(
    text=text,
    vision=vision,
    tie_word_embeddings=False,
    image_token_id=v - 4,
    video_token_id=v - 3,
    vision_start_token_id=v - 2,
    vision_end_token_id=v - 1,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
  )


def _sampling_bench(text: dict, vision: dict) -> Qwen25VLConfig:
  """A sampling-benchmark model from the text fields (vocab_size, hidden_size, intermediate_size, num_hidden_layers,
  num_attention_heads, num_key_value_heads, mrope_section, max_position_embeddings) and the vision ones."""
  return _top_of_vocabulary(TextConfig(**text), VisionConfig(**vision))


_TEXT = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
_TEXT += ("num_key_value_heads", "mrope_section", "max_position_embeddings")
_VISION = ("depth", "hidden_size", "intermediate_size", "num_heads", "out_hidden_size", "fullatt_block_indexes")
PRESETS.register("sampling_bench")(
  _sampling_bench(
    dict(zip(_TEXT, (32000, 1024, 2816, 8, 16, 4, (8, 12, 12), 32768))),
    dict(zip(_VISION, (4, 256, 512, 4, 1024, (1, 3)))),
  )
)
PRESETS.register("sampling_bench_quick")(
  _sampling_bench(
    dict(zip(_TEXT, (2048, 128, 256, 2, 4, 2, (4, 6, 6), 4096))),
    dict(zip(_VISION, (2, 64, 128, 2, 128, (1,)))),
  )
)
PRESETS.register("rollout_bench")(
  tiny_config(vocab_size=tokenizer_lib.DEFAULT_VOCAB_SIZE, hidden_size=256, num_layers=2)
)
PRESETS.register("rollout_bench_quick")(
  tiny_config(vocab_size=tokenizer_lib.DEFAULT_VOCAB_SIZE, hidden_size=64, num_layers=2, vision_hidden_size=32)
)
