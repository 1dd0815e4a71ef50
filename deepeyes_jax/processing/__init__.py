"""Host-side input processing (images, text) for the DeepEyes / Qwen2.5-VL JAX port."""
