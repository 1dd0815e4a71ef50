"""Benchmarks: sampling throughput of the JAX sampler against HF transformers."""
