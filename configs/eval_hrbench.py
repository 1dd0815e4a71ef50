"""HR-Bench 4K / 8K (TSV release) with the zoom agent.

    python -m deepeyes_jax.evaluate --config configs/eval_hrbench.py:res=8k --config.checkpoint=/ckpt/DeepEyes-7B \
        --config.data_path=/data/hr_bench_8k.tsv

The release rotates every question's options cyclically (column cycle_category), so options are shown in release
order by default (shuffle_options=False): the answer letters are already balanced. Variants: `res=4k|8k`,
`size=tiny`, `no_tool=1`.
"""

from deepeyes_jax.config_args import parse_arg
from deepeyes_jax.eval.config import VARIANT_SPEC, apply_variant, base_config


def get_config(arg: str | None = None):
  args = parse_arg(arg, res="4k", **VARIANT_SPEC)
  if args.res not in ("4k", "8k"):
    raise ValueError(f"res must be 4k or 8k, got {args.res!r}")
  c = base_config(f"hrbench_{args.res}")
  c.shuffle_options = False
  if args.res == "8k":
    c.batch_size = 8  # 8K images: more crops per trajectory at native resolution
  return apply_variant(c, args)
