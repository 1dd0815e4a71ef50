"""GRPO: group-normalised advantages and the clipped policy loss, with registries (as tunix does).

Advantages are computed on the host from per-trajectory rewards (numpy): they are a handful of numbers per step.
Policy losses are jit-friendly functions of per-token arrays.

    adv, keep = ADVANTAGES["grpo"](rewards, group_ids, eps=1e-6)
    loss, aux = POLICY_LOSSES["ppo_clip"](logp, old_logp, adv_tok, mask, clip_low=.2, clip_high=.2, dual_clip=3.)

Add an estimator or loss with `@register_advantage("name")` / `@register_policy_loss("name")`.
"""

from __future__ import annotations

from typing import Callable

import jax
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
# Sequences of packed rows, aggregation
# --------------------------------------------------------------------------------------------------------------
def sequence_ids(segment_ids):
  """(R, L) int32 ids unique to each (row, segment) of packed rows: the sequences of sequence-level estimators (a
  packed row holds several trajectories, one segment each). Padding (segment 0) gets an id of its own per row."""
  r, length = segment_ids.shape
  return segment_ids + (length + 1) * jnp.arange(r, dtype=segment_ids.dtype)[:, None]


def _seq_ids(seq_ids, x):
  """`seq_ids`, or one sequence per row when None (unpacked (N, T) arrays)."""
  if seq_ids is not None:
    return seq_ids
  return jnp.broadcast_to(jnp.arange(x.shape[0], dtype=jnp.int32)[:, None], x.shape)


def seq_total(x, seq_ids):
  """The sum of `x` over each token's sequence, broadcast back to the tokens: (R, L) -> (R, L)."""
  flat = seq_ids.reshape(-1)
  sums = jax.ops.segment_sum(x.reshape(-1), flat, num_segments=flat.shape[0] + seq_ids.shape[0])
  return sums[flat].reshape(x.shape)


def aggregate(x, mask, mode: str, denominator=None, seq_ids=None):
  """token_mean: sum(x*mask) / (denominator or sum(mask)); seq_mean: mean over sequences of per-sequence token
  means (a sequence is a trajectory: a segment of a packed row, `seq_ids`; a row when `seq_ids` is None).

  `denominator` lets micro-batches share the token (sequence) count of the whole mini-batch, so that summing their
  gradients gives exactly the token (sequence) mean over the mini-batch.
  """
  if mode == "token_mean":
    den = jnp.maximum(mask.sum(), 1.0) if denominator is None else denominator
    return (x * mask).sum() / den
  if mode == "seq_mean":
    ids = _seq_ids(seq_ids, x)
    share = mask / jnp.maximum(seq_total(mask, ids), 1.0)  # each sequence's tokens share a weight of 1
    den = jnp.maximum(share.sum(), 1.0) if denominator is None else denominator
    return (x * share).sum() / den
  raise ValueError(f"unknown loss aggregation {mode!r}: 'token_mean' or 'seq_mean'")


# --------------------------------------------------------------------------------------------------------------
# Policy losses: per-token arrays (..., T) -> (scalar loss, aux dict of scalars)
#
# Every loss takes `weights` (per-token, no gradient: the rollout correction's importance weights, 1 = none) that
# multiply its per-token loss, and `seq_ids` (`sequence_ids` of packed rows) for sequence-level terms.
# --------------------------------------------------------------------------------------------------------------
def _weighted(per_token, weights):
  return per_token if weights is None else per_token * jax.lax.stop_gradient(weights)


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
  weights=None,
  seq_ids=None,
):
  """PPO clipped surrogate with asymmetric clip and dual-clip (verl's compute_policy_loss).

  loss_t = max(-A r_t, -A clip(r_t, 1 - clip_low, 1 + clip_high)); for A < 0 it is further capped at -A * c
  (dual clip, c = `dual_clip` > 1). r_t = exp(logp - old_logp). With r = 1 this is the plain policy gradient.
  DAPO's clip-higher is `clip_high` > `clip_low` (0.28 / 0.2).
  """
  agg = lambda v: aggregate(v, mask, aggregation, denominator, seq_ids)  # noqa: E731
  ratio = jnp.exp(logp - old_logp)
  l1 = -advantages * ratio
  l2 = -advantages * jnp.clip(ratio, 1.0 - clip_low, 1.0 + clip_high)
  clipped = jnp.maximum(l1, l2)
  if dual_clip is not None:
    l3 = -advantages * dual_clip
    per_token = jnp.where(advantages < 0, jnp.minimum(clipped, l3), clipped)
    dual_frac = agg(((advantages < 0) & (l3 < clipped)).astype(logp.dtype))
  else:
    per_token = clipped
    dual_frac = jnp.zeros(())
  loss = agg(_weighted(per_token, weights))
  aux = {
    "clip_frac": agg((l2 > l1).astype(logp.dtype)),
    "dual_clip_frac": dual_frac,
    "approx_kl": agg(0.5 * (logp - old_logp) ** 2),
    "ratio_mean": agg(ratio),
  }
  return loss, aux


@register_policy_loss("gspo")
def gspo_loss(
  logp,
  old_logp,
  advantages,
  mask,
  *,
  clip_low: float = 3e-4,
  clip_high: float = 4e-4,
  aggregation: str = "seq_mean",
  denominator=None,
  weights=None,
  seq_ids=None,
  **_,
):
  """GSPO (Zheng et al. 2025, arXiv:2507.18071), in its token form (GSPO-token, as verl and tunix implement it).

  The importance ratio is the sequence's, length-normalised: s_i = exp(mean_t (logp - old_logp) over the sequence's
  action tokens); each token carries s_i,t = sg(s_i) * exp(logp_t - sg(logp_t)) (value s_i, gradient s_i * grad
  logp_t), clipped to [1 - clip_low, 1 + clip_high] (the paper: 3e-4 / 4e-4), so a whole sequence is clipped or
  not. With `aggregation="seq_mean"` (required by config validation, as verl hard-codes it) the gradient is the
  paper's sequence-level one. `dual_clip` does not apply.
  """
  ids = _seq_ids(seq_ids, logp)
  agg = lambda v: aggregate(v, mask, aggregation, denominator, ids)  # noqa: E731
  n = jnp.maximum(seq_total(mask, ids), 1.0)
  seq_log_ratio = seq_total((logp - old_logp) * mask, ids) / n  # (R, L): each token its sequence's mean
  sg = jax.lax.stop_gradient
  log_s = logp - sg(logp) + sg(seq_log_ratio)
  ratio = jnp.exp(jnp.minimum(log_s, 10.0))  # a bound on exp of a wild ratio (verl clamps at 10 too)
  l1 = -advantages * ratio
  l2 = -advantages * jnp.clip(ratio, 1.0 - clip_low, 1.0 + clip_high)
  loss = agg(_weighted(jnp.maximum(l1, l2), weights))
  aux = {
    "clip_frac": agg((l2 > l1).astype(logp.dtype)),
    "approx_kl": agg(0.5 * (logp - old_logp) ** 2),
    "ratio_mean": agg(ratio),
  }
  return loss, aux


@register_policy_loss("nll")
def nll_loss(logp, old_logp, advantages, mask, *, aggregation: str = "token_mean", denominator=None, seq_ids=None, **_):
  """The supervised (warm-start) loss: -advantages * log p over the action tokens; advantages = 1 is plain
  behaviour cloning. `old_logp` and `weights` are not used (no importance ratio)."""
  del old_logp
  loss = aggregate(-advantages * logp, mask, aggregation, denominator, seq_ids)
  return loss, {"nll": aggregate(-logp, mask, aggregation, denominator, seq_ids)}


def kl_k3(logp, ref_logp):
  """Per-token k3 estimator of KL(pi || ref) = exp(ref - logp) - (ref - logp) - 1 (>= 0)."""
  d = ref_logp - logp
  return jnp.exp(d) - d - 1.0


# --------------------------------------------------------------------------------------------------------------
# Rollout correction: the sampler (behaviour policy mu, its log-probs recorded at generation) is not the learner's
# old policy pi_old (recomputed by the learner before the update): other kernels, dtypes, or weights one step stale.
# A correction turns rho = pi_old / mu into per-token weights (no gradient) that multiply any policy loss.
#   (old_logp, sampler_logp, mask, seq_ids, threshold C) -> (weights (R, L), {name: per-token indicator (R, L)})
# The indicators (tokens truncated / dropped) are averaged like the loss by the caller (train_step._loss).
# --------------------------------------------------------------------------------------------------------------
ROLLOUT_CORRECTIONS: Registry[Callable] = Registry("rollout correction")


def register_rollout_correction(name: str, *aliases: str, overwrite: bool = False):
  return ROLLOUT_CORRECTIONS.register(name, *aliases, overwrite=overwrite)


def get_rollout_correction(name: str) -> Callable:
  return ROLLOUT_CORRECTIONS.get(name)


def _log_rho(old_logp, sampler_logp, mask, seq_ids, level: str):
  """log rho per token ("token") or the sequence's sum broadcast to its tokens ("seq"), 0 off the mask."""
  d = (old_logp - sampler_logp) * mask
  return d if level == "token" else seq_total(d, _seq_ids(seq_ids, d))


@register_rollout_correction("none")
def no_correction(old_logp, sampler_logp, mask, seq_ids=None, threshold: float = 2.0):
  del sampler_logp, seq_ids, threshold
  return jnp.ones_like(old_logp), {}


def _tis(level: str):
  def correction(old_logp, sampler_logp, mask, seq_ids=None, threshold: float = 2.0):
    log_rho = _log_rho(old_logp, sampler_logp, mask, seq_ids, level)
    cap = jnp.log(threshold)
    weights = jnp.exp(jnp.minimum(log_rho, cap))
    return weights, {"truncated_frac": (log_rho > cap).astype(weights.dtype)}

  correction.__doc__ = (
    f"Truncated importance sampling, {level} level (Yao et al. 2025, 'Your efficient RL framework secretly brings "
    "you off-policy RL training'): weight min(rho, C), rho = pi_old / mu"
    + (" of the token." if level == "token" else " of the whole sequence (product over its action tokens).")
  )
  return correction


def _mis(level: str):
  def correction(old_logp, sampler_logp, mask, seq_ids=None, threshold: float = 2.0):
    log_rho = _log_rho(old_logp, sampler_logp, mask, seq_ids, level)
    cap = jnp.log(threshold)
    inside = jnp.abs(log_rho) <= cap
    weights = jnp.where(inside, jnp.exp(jnp.clip(log_rho, -cap, cap)), 0.0)
    return weights, {"masked_frac": (~inside).astype(weights.dtype)}

  correction.__doc__ = (
    f"Masked importance sampling, {level} level (Liu et al. 2025, 'When speed kills stability'): weight rho inside "
    "the band [1/C, C], 0 (the "
    + ("token" if level == "token" else "whole sequence")
    + " is dropped from the loss) outside it."
  )
  return correction


register_rollout_correction("token_tis")(_tis("token"))
register_rollout_correction("seq_tis")(_tis("seq"))
register_rollout_correction("token_mis")(_mis("token"))
register_rollout_correction("seq_mis")(_mis("seq"))


def mismatch_metrics(logp, sampler_logp, mask, aggregation: str, denominator=None, seq_ids=None) -> dict:
  """How far the sampler's log-probs are from the learner's, per action token (no gradient): d = logp - sampler_logp.

  abs_log_ratio_mean / _max: |d|; kl_k3: the k3 estimate of KL(mu || pi) = exp(d) - d - 1 (tokens drawn from mu);
  out_of_band_frac: tokens whose ratio exp(d) leaves [1/2, 2]. Averaged like the loss (`aggregation`); the `_max`
  key is a maximum (micro-batches combine it with max, not sum)."""
  d = jax.lax.stop_gradient(logp) - sampler_logp
  agg = lambda v: aggregate(v, mask, aggregation, denominator, seq_ids)  # noqa: E731
  return {
    "abs_log_ratio_mean": agg(jnp.abs(d)),
    "abs_log_ratio_max": jnp.max(jnp.where(mask > 0, jnp.abs(d), 0.0)),
    "kl_k3": agg(jnp.exp(d) - d - 1.0),
    "out_of_band_frac": agg((jnp.abs(d) > jnp.log(2.0)).astype(d.dtype)),
  }
