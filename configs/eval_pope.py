"""POPE (yes/no object-hallucination probes: adversarial / popular / random) with the zoom agent.

    python -m deepeyes_jax.evaluate --config configs/eval_pope.py --config.checkpoint=/ckpt/DeepEyes-7B \
        --config.data_path=/data/pope/output/coco --config.image_dir=/data/coco/val2014

Scored by the leading yes / no of the answer (the judge only when there is neither). Variants: `size=tiny`,
`no_tool=1`.
"""

from deepeyes_jax.eval.config import apply_variant, base_config


def get_config(arg: str | None = None):
  c = base_config("pope")
  c.rollout.max_tokens_per_turn = 1024
  return apply_variant(c, arg)
