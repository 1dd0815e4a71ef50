"""Speed and memory benchmarks (scripts that print tables and write JSON): sampling against HF transformers,
attention kernels, the rollout engines. `python -m deepeyes_jax.perf.<name> --help`."""

import json


def write_json(path: str, result: dict) -> None:
  """The results of a benchmark as JSON (values JSON does not know written with str), and a line saying where."""
  with open(path, "w") as f:
    json.dump(result, f, indent=2, default=str)
  print(f"wrote {path}")
