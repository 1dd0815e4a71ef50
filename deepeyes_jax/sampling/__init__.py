"""KV-cache sampler: jitted `extend` (prefill / append, images included) and `decode` (lax.while_loop)."""

from deepeyes_jax.sampling.cache import KVCache, init_cache
from deepeyes_jax.sampling.rules import GREEDY, SamplingParams, filter_logits, sample, token_logprob
from deepeyes_jax.sampling.sampler import STOP_REASONS, Chunk, DecodeResult, Sampler, bucket, row_keys
