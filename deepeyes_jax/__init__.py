"""deepeyes_jax: DeepEyes ("thinking with images" learned by RL) on Qwen2.5-VL in JAX/Flax."""

__version__ = "0.1.0"
