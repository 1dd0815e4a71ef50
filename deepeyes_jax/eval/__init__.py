"""Benchmark evaluation with the zoom agent (see deepeyes_jax/evaluate.py and docs/evaluation.md)."""
