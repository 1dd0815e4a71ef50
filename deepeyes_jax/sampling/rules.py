"""Sampling rules: greedy, temperature, top-k, top-p (nucleus), and the log-probs the sampler reports.

All functions work on one row's logits (V,) or a batch (B, V) and are jit-friendly; the parameters are static.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

NEG_INF = -1e30


@dataclasses.dataclass(frozen=True)
class SamplingParams:
  """temperature 0 = greedy. top_k 0 = off. top_p 1.0 = off. Hashable: used as a static jit argument."""

  temperature: float = 1.0
  top_k: int = 0
  top_p: float = 1.0

  def __post_init__(self):
    if self.temperature < 0:
      raise ValueError(f"temperature must be >= 0, got {self.temperature}")
    if self.top_k < 0:
      raise ValueError(f"top_k must be >= 0, got {self.top_k}")
    if not 0.0 < self.top_p <= 1.0:
      raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")

  @property
  def greedy(self) -> bool:
    return self.temperature == 0.0


GREEDY = SamplingParams(temperature=0.0)


def scaled(logits: jax.Array, params: SamplingParams) -> jax.Array:
  """logits / temperature in fp32 (temperature 0 leaves them unscaled)."""
  logits = logits.astype(jnp.float32)
  return logits if params.greedy else logits / params.temperature


def filter_logits(logits: jax.Array, params: SamplingParams) -> jax.Array:
  """Temperature-scaled logits with everything outside top-k and the top-p nucleus set to -inf (-1e30).

  top-p keeps the smallest set of highest-probability tokens whose mass reaches p (the token that crosses p is
  kept), applied after top-k, as in HF's TopKLogitsWarper -> TopPLogitsWarper.
  """
  x = scaled(logits, params)
  if params.top_k > 0 and params.top_k < x.shape[-1]:
    kth = jax.lax.top_k(x, params.top_k)[0][..., -1:]
    x = jnp.where(x < kth, NEG_INF, x)
  if params.top_p < 1.0:
    sorted_x = -jnp.sort(-x, axis=-1)
    probs = jax.nn.softmax(sorted_x, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs  # mass of strictly better tokens
    # The smallest kept logit; ties with it are kept too (the reference breaks such exact ties by sort order).
    cutoff = jnp.min(jnp.where(mass_before < params.top_p, sorted_x, jnp.inf), axis=-1, keepdims=True)
    x = jnp.where(x < cutoff, NEG_INF, x)
  return x


def sample(key: jax.Array, logits: jax.Array, params: SamplingParams) -> jax.Array:
  """One token id per row: argmax when greedy, else a draw from softmax(filter_logits(logits))."""
  if params.greedy:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  return jax.random.categorical(key, filter_logits(logits, params), axis=-1).astype(jnp.int32)


def token_logprob(logits: jax.Array, token: jax.Array, params: SamplingParams) -> jax.Array:
  """log p(token) under softmax(logits / temperature), no top-k/top-p filtering (temperature 0 -> 1).

  This is the behaviour policy's log-prob that RL importance ratios need; with DeepEyes' rollout settings
  (temperature 1, top_p 1) it is exactly the model's log-prob.
  """
  logp = jax.nn.log_softmax(scaled(logits, params), axis=-1)
  return jnp.take_along_axis(logp, token[..., None], axis=-1)[..., 0]
