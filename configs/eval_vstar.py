"""V* Bench (191 questions, categories direct_attributes / relative_position) with the zoom agent.

    python -m deepeyes_jax.evaluate --config configs/eval_vstar.py --config.checkpoint=/ckpt/DeepEyes-7B \
        --config.data_path=/data/vstar_bench
    ... --config.shuffle_options=False     # the original protocol: the correct option is always A
    ... --config.no_tool=True              # baseline row: plain prompt, one turn
    ... --config.num_samples=8 --config.rollout.temperature=1.0   # avg@8 / pass@8

Variants: `:size=tiny` (CPU tests), `:no_tool=1`.
"""

from deepeyes_jax.eval.config import apply_variant, base_config


def get_config(arg: str | None = None):
  return apply_variant(base_config("vstar"), arg)
