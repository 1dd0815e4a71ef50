"""GRPO: group-normalised advantages and the clipped policy loss, with registries (as tunix does).

Advantages are computed on the host from per-trajectory rewards (numpy): they are a handful of numbers per step.
Policy losses are jit-friendly functions of per-token arrays.

    adv, keep = ADVANTAGES["grpo"](rewards, group_ids, eps=1e-6)
    loss, aux = POLICY_LOSSES["ppo_clip"](logp, old_logp, adv_tok, mask, clip_low=.2, clip_high=.2, dual_clip=3.)

Add an estimator or loss with `@register_advantage("name")` / `@register_policy_loss("name")`.
"""

from __future__ import annotations

from typing import Callable

import jax.numpy as jnp
import numpy as np

from deepeyes_jax.registry import Registry

ADVANTAGES: Registry[Callable] = Registry("advantage estimator")
POLICY_LOSSES: Registry[Callable] = Registry("policy loss")


def register_advantage(name: str, *aliases: str, overwrite: bool = False):
  return ADVANTAGES.register(name, *aliases, overwrite=overwrite)


def register_policy_loss(name: str, *aliases: str, overwrite: bool = False):
  return POLICY_LOSSES.register(name, *aliases, overwrite=overwrite)


def get_advantage_fn(name: str) -> Callable:
  return ADVANTAGES.get(name)


def get_policy_loss(name: str) -> Callable:
  return POLICY_LOSSES.get(name)


# --------------------------------------------------------------------------------------------------------------
# Advantages: (rewards (N,), group_ids (N,)) -> (advantages (N,) float32, keep (N,) bool)
# --------------------------------------------------------------------------------------------------------------
def _per_group(rewards, group_ids, centre, drop_zero_variance: bool):
  """Applies `centre` (group rewards (n,) -> advantages (n,)) to each group; marks constant groups when asked."""
  r = np.asarray(rewards, np.float64)
  _, g = np.unique(np.asarray(group_ids), return_inverse=True)
  adv = np.zeros_like(r)
  keep = np.ones(r.shape, bool)
  for k in np.unique(g):
    idx = g == k
    adv[idx] = centre(r[idx])
    if drop_zero_variance and np.all(r[idx] == r[idx][0]):
      keep[idx] = False
  return adv.astype(np.float32), keep


@register_advantage("grpo")
def grpo_advantages(rewards, group_ids, *, eps: float = 1e-6, drop_zero_variance: bool = False, **_):
  """(R - mean_group) / (std_group + eps), std with ddof=1 (as torch.std). A group of one gets advantage 0.

  drop_zero_variance: mark groups whose rewards are all equal as not kept (they carry no learning signal).
  """
  return _per_group(
    rewards,
    group_ids,
    lambda x: (x - x.mean()) / (x.std(ddof=1) + eps) if len(x) > 1 else np.zeros_like(x),
    drop_zero_variance,
  )


@register_advantage("dr_grpo")
def dr_grpo_advantages(rewards, group_ids, *, drop_zero_variance: bool = False, **_):
  """Dr. GRPO: R - mean_group, no std normalisation."""
  return _per_group(rewards, group_ids, lambda x: x - x.mean(), drop_zero_variance)


@register_advantage("rloo")
def rloo_advantages(rewards, group_ids, *, drop_zero_variance: bool = False, **_):
  """RLOO: R_i - mean of the other rewards of its group (0 for a group of one)."""
  return _per_group(
    rewards,
    group_ids,
    lambda x: x - (x.sum() - x) / (len(x) - 1) if len(x) > 1 else np.zeros_like(x),
    drop_zero_variance,
  )


# --------------------------------------------------------------------------------------------------------------
# Policy losses: per-token arrays (..., T) -> (scalar loss, aux dict of scalars)
# --------------------------------------------------------------------------------------------------------------
def aggregate(x, mask, mode: str, denominator=None):
  """token_mean: sum(x*mask) / (denominator or sum(mask)); seq_mean: mean over rows of per-row token means.

  `denominator` lets micro-batches share the token count of the whole mini-batch, so that summing their
  gradients gives exactly the token mean over the mini-batch.
  """
  if mode == "token_mean":
    den = jnp.maximum(mask.sum(), 1.0) if denominator is None else denominator
    return (x * mask).sum() / den
  if mode == "seq_mean":
    per_row = (x * mask).sum(-1) / jnp.maximum(mask.sum(-1), 1.0)
    rows = (mask.sum(-1) > 0).astype(x.dtype)
    den = jnp.maximum(rows.sum(), 1.0) if denominator is None else denominator
    return (per_row * rows).sum() / den
  raise ValueError(f"unknown loss aggregation {mode!r}: 'token_mean' or 'seq_mean'")


@register_policy_loss("ppo_clip")
def ppo_clip_loss(
  logp,
  old_logp,
  advantages,
  mask,
  *,
  clip_low: float = 0.2,
  clip_high: float = 0.2,
  dual_clip: float | None = 3.0,
  aggregation: str = "token_mean",
  denominator=None,
):
  """PPO clipped surrogate with asymmetric clip and dual-clip (verl's compute_policy_loss).

  loss_t = max(-A r_t, -A clip(r_t, 1 - clip_low, 1 + clip_high)); for A < 0 it is further capped at -A * c
  (dual clip, c = `dual_clip` > 1). r_t = exp(logp - old_logp). With r = 1 this is the plain policy gradient.
  """
  ratio = jnp.exp(logp - old_logp)
  l1 = -advantages * ratio
  l2 = -advantages * jnp.clip(ratio, 1.0 - clip_low, 1.0 + clip_high)
  clipped = jnp.maximum(l1, l2)
  if dual_clip is not None:
    l3 = -advantages * dual_clip
    per_token = jnp.where(advantages < 0, jnp.minimum(clipped, l3), clipped)
    dual_frac = aggregate(((advantages < 0) & (l3 < clipped)).astype(logp.dtype), mask, aggregation, denominator)
  else:
    per_token = clipped
    dual_frac = jnp.zeros(())
  loss = aggregate(per_token, mask, aggregation, denominator)
  aux = {
    "clip_frac": aggregate((l2 > l1).astype(logp.dtype), mask, aggregation, denominator),
    "dual_clip_frac": dual_frac,
    "approx_kl": aggregate(0.5 * (logp - old_logp) ** 2, mask, aggregation, denominator),
    "ratio_mean": aggregate(ratio, mask, aggregation, denominator),
  }
  return loss, aux


@register_policy_loss("nll")
def nll_loss(logp, old_logp, advantages, mask, *, aggregation: str = "token_mean", denominator=None, **_):
  """The supervised (warm-start) loss: -advantages * log p over the action tokens; advantages = 1 is plain
  behaviour cloning. `old_logp` is not used (no importance ratio)."""
  del old_logp
  loss = aggregate(-advantages * logp, mask, aggregation, denominator)
  return loss, {"nll": aggregate(-logp, mask, aggregation, denominator)}


def kl_k3(logp, ref_logp):
  """Per-token k3 estimator of KL(pi || ref) = exp(ref - logp) - (ref - logp) - 1 (>= 0)."""
  d = ref_logp - logp
  return jnp.exp(d) - d - 1.0
