"""Speed and memory benchmarks (scripts that print tables and write JSON): sampling against HF transformers,
attention kernels, the rollout engines. `python -m deepeyes_jax.perf.<name> --help`."""
