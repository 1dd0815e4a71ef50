"""The 2025-26 RL algorithms against numpy references written from their papers' definitions: sequence-mean
aggregation over packed rows, PPO clip / dual clip and GSPO (values and gradients), rollout corrections (TIS / MIS,
token and sequence level), mismatch metrics, DAPO's overlong shaping, over-turn masking, dynamic-sampling groups,
tool-collapse monitoring, the new rollout metrics, micro-batch accumulation in `Learner.update`, and the config
checks of the combinations (`train_config.validate`, `algo=` variants)."""

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from PIL import Image

from deepeyes_jax import config_reference as cr
from deepeyes_jax.agent.trajectory import STOP_REASONS, ToolRecord, Trajectory
from deepeyes_jax.config_check import ConfigError
from deepeyes_jax.reward.rewards import RewardResult
from deepeyes_jax.rl import grpo, metrics, shaping, train_config, train_step
from deepeyes_jax.rl.packing import PackedBatch
from deepeyes_jax.rl.train_step import Learner, LearnerConfig, num_sequences

ROOT = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------------------------------------------
# Packed layout: sequences (trajectories) of different lengths, several per row, plus the same sequences unpacked.
# ----------------------------------------------------------------------------------------------------------------
# (row, number of tokens, loss-mask pattern): a 0 = prompt / observation token, 1 = action token.
SEQS = [
  (0, [0, 0, 1, 1, 1]),
  (0, [0, 1, 1]),
  (0, [0, 0, 1, 0, 1, 1, 1]),
  (1, [0, 1, 1, 1, 1, 1, 1, 1]),
  (1, [0, 1]),
  (2, [0, 0, 1, 1, 0, 1]),
]
ROW_LEN = 18


def _layout():
  """segment ids (R, L), loss mask (R, L), and for each sequence the (row, columns) of its tokens."""
  n_rows = max(r for r, _ in SEQS) + 1
  seg = np.zeros((n_rows, ROW_LEN), np.int32)
  mask = np.zeros((n_rows, ROW_LEN), np.float32)
  where, fill = [], [0] * n_rows
  for row, pattern in SEQS:
    cols = np.arange(fill[row], fill[row] + len(pattern))
    seg[row, cols] = seg[row].max() + 1
    mask[row, cols] = pattern
    fill[row] += len(pattern)
    where.append((row, cols))
  assert all(f < ROW_LEN for f in fill)  # every row ends with padding (segment 0)
  return seg, mask, where


def _scatter(values_per_seq, where, shape, fill=0.0):
  """Per-sequence token values -> a packed (R, L) array."""
  out = np.full(shape, fill, np.float64)
  for v, (row, cols) in zip(values_per_seq, where):
    out[row, cols] = v
  return out


def _unpacked(values_per_seq, width):
  """Per-sequence token values -> (N, width), one sequence per row, right-padded with 0."""
  out = np.zeros((len(values_per_seq), width), np.float64)
  for i, v in enumerate(values_per_seq):
    out[i, : len(v)] = v
  return out


def _np_seq_mean(x_per_seq, m_per_seq):
  """Mean over sequences with action tokens of each one's token mean over its mask."""
  means = [np.sum(x * m) / np.sum(m) for x, m in zip(x_per_seq, m_per_seq) if np.sum(m) > 0]
  return float(np.mean(means))


def _masks():
  return [np.asarray(p, np.float64) for _, p in SEQS]


def _f32(x):
  return jnp.asarray(np.asarray(x, np.float32))


# ----------------------------------------------------------------------------------------------------------------
# sequence_ids, seq_total, aggregate
# ----------------------------------------------------------------------------------------------------------------
def test_sequence_ids_are_unique_per_row_and_segment():
  seg, _, where = _layout()
  ids = np.asarray(grpo.sequence_ids(jnp.asarray(seg)))
  seq_id = [ids[row, cols] for row, cols in where]
  for s in seq_id:  # one id per sequence
    assert len(np.unique(s)) == 1
  assert len({int(s[0]) for s in seq_id}) == len(SEQS)  # distinct across sequences, even segment 1 of each row
  pads = [ids[r][seg[r] == 0] for r in range(seg.shape[0])]
  for r, p in enumerate(pads):  # a row's padding: its own id, shared with no sequence and no other row's padding
    assert len(np.unique(p)) == 1
    assert int(p[0]) not in {int(s[0]) for s in seq_id}
  assert len({int(p[0]) for p in pads}) == seg.shape[0]


def test_seq_total_sums_each_sequence_and_broadcasts():
  seg, _, where = _layout()
  rng = np.random.default_rng(0)
  x = rng.normal(size=seg.shape).astype(np.float32)
  got = np.asarray(grpo.seq_total(jnp.asarray(x), grpo.sequence_ids(jnp.asarray(seg))))
  for row, cols in where:
    np.testing.assert_allclose(got[row, cols], np.full(len(cols), x[row, cols].sum()), rtol=1e-5, atol=1e-6)
  for r in range(seg.shape[0]):
    pad = seg[r] == 0
    np.testing.assert_allclose(got[r][pad], x[r][pad].sum(), rtol=1e-5, atol=1e-6)


def test_aggregate_token_and_seq_mean_packed_equal_unpacked_and_reference():
  seg, mask, where = _layout()
  rng = np.random.default_rng(1)
  xs = [rng.normal(size=len(p)) * (i + 1) for i, (_, p) in enumerate(SEQS)]  # sequences of different scales
  ms = _masks()
  x_packed = _scatter(xs, where, seg.shape, fill=123.0)  # garbage off the sequences: masked out
  ids = grpo.sequence_ids(jnp.asarray(seg))

  want_seq = _np_seq_mean(xs, ms)
  want_tok = sum(np.sum(x * m) for x, m in zip(xs, ms)) / sum(m.sum() for m in ms)
  assert abs(want_seq - want_tok) > 1e-2  # the two modes differ on this data: the test tells them apart

  got_packed = grpo.aggregate(_f32(x_packed), _f32(mask), "seq_mean", seq_ids=ids)
  width = max(len(p) for _, p in SEQS)
  got_unpacked = grpo.aggregate(_f32(_unpacked(xs, width)), _f32(_unpacked(ms, width)), "seq_mean")
  np.testing.assert_allclose(float(got_packed), want_seq, rtol=1e-5)
  np.testing.assert_allclose(float(got_unpacked), want_seq, rtol=1e-5)

  np.testing.assert_allclose(float(grpo.aggregate(_f32(x_packed), _f32(mask), "token_mean")), want_tok, rtol=1e-5)
  # Without seq_ids a packed row would be ONE sequence: a different (wrong for packing) value.
  per_row = [np.sum(x_packed[r] * mask[r]) / mask[r].sum() for r in range(seg.shape[0])]
  np.testing.assert_allclose(float(grpo.aggregate(_f32(x_packed), _f32(mask), "seq_mean")), np.mean(per_row), 1e-5)
  assert abs(np.mean(per_row) - want_seq) > 1e-2

  with pytest.raises(ValueError, match="token_mean"):
    grpo.aggregate(_f32(x_packed), _f32(mask), "sum")


@pytest.mark.parametrize("mode", ["token_mean", "seq_mean"])
def test_aggregate_shared_denominator_splits_a_batch_exactly(mode):
  """Micro-batches normalised by the whole batch's token (sequence) count sum to the whole batch's mean."""
  seg, mask, _ = _layout()
  x = np.random.default_rng(2).normal(size=seg.shape)
  ids = grpo.sequence_ids(jnp.asarray(seg))
  whole = float(grpo.aggregate(_f32(x), _f32(mask), mode, seq_ids=ids))
  den = float(mask.sum()) if mode == "token_mean" else float(len(SEQS))
  parts = [
    grpo.aggregate(_f32(x[s]), _f32(mask[s]), mode, jnp.float32(den), grpo.sequence_ids(jnp.asarray(seg[s])))
    for s in (slice(0, 1), slice(1, 3))
  ]
  np.testing.assert_allclose(float(sum(parts)), whole, rtol=1e-5)


# ----------------------------------------------------------------------------------------------------------------
# PPO clip with dual clip
# ----------------------------------------------------------------------------------------------------------------
def _np_ppo(delta, adv, cl, ch, c):
  """Per-token loss and its derivative w.r.t. logp (delta = logp - old), numpy float64 (verl compute_policy_loss)."""
  r = np.exp(delta)
  l1, l2 = -adv * r, -adv * np.clip(r, 1 - cl, 1 + ch)
  inside = (r > 1 - cl) & (r < 1 + ch)
  d1, d2 = -adv * r, np.where(inside, -adv * r, 0.0)
  clipped = np.maximum(l1, l2)
  dclipped = np.where(l1 > l2, d1, np.where(l2 > l1, d2, 0.5 * (d1 + d2)))
  if c is None:
    return clipped, dclipped
  l3 = -adv * c
  capped = (adv < 0) & (l3 < clipped)
  return np.where(capped, l3, clipped), np.where(capped, 0.0, dclipped)


# logp - old_logp per token: away from the kinks at log 0.8 = -0.223, log 1.2 = 0.182, log 1.28 = 0.247, log 3.
DELTAS = np.array([-1.3, -0.6, -0.3, -0.12, 0.0, 0.08, 0.12, 0.21, 0.3, 0.6, 1.25, 1.5])


def _ppo_case():
  seg, mask, where = _layout()
  rng = np.random.default_rng(3)
  delta = rng.choice(DELTAS, size=seg.shape)
  old = rng.uniform(-3.0, -0.2, size=seg.shape)
  adv_seq = [1.3, -0.7, 0.4, -1.6, 2.0, -0.2]  # one advantage per trajectory, both signs
  adv = _scatter([np.full(len(p), a) for a, (_, p) in zip(adv_seq, SEQS)], where, seg.shape)
  weights = rng.uniform(0.3, 1.7, size=seg.shape)
  return seg, mask, where, old + delta, old, adv, weights


@pytest.mark.parametrize("aggregation", ["token_mean", "seq_mean"])
@pytest.mark.parametrize("clip_low,clip_high,dual_clip", [(0.2, 0.2, 3.0), (0.2, 0.28, None)])
def test_ppo_clip_value_and_gradient_match_numpy(aggregation, clip_low, clip_high, dual_clip):
  seg, mask, where, logp, old, adv, weights = _ppo_case()
  ids = grpo.sequence_ids(jnp.asarray(seg))
  per, dper = _np_ppo(logp - old, adv, clip_low, clip_high, dual_clip)
  # Every regime occurs on the action tokens: unclipped, clipped (zero gradient), dual-clipped.
  on = mask > 0
  r = np.exp(logp - old)
  assert np.any(on & (dper != 0)) and np.any(on & (dper == 0) & ~((adv < 0) & (r > 3)))
  if dual_clip is not None:
    assert np.any(on & (adv < 0) & (r > dual_clip))
  if aggregation == "token_mean":
    share = mask / mask.sum()
  else:
    share = np.zeros_like(mask)
    for row, cols in where:
      share[row, cols] = mask[row, cols] / mask[row, cols].sum() / len(SEQS)
  want = np.sum(per * weights * share)
  want_grad = dper * weights * share

  def loss(lp):
    return grpo.ppo_clip_loss(
      lp, _f32(old), _f32(adv), _f32(mask), clip_low=clip_low, clip_high=clip_high, dual_clip=dual_clip,
      aggregation=aggregation, weights=_f32(weights), seq_ids=ids,
    )  # fmt: skip

  (value, aux), grad = jax.value_and_grad(loss, has_aux=True)(_f32(logp))
  np.testing.assert_allclose(float(value), want, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(np.asarray(grad), want_grad, rtol=1e-4, atol=1e-7)

  # The analytic numpy gradient is itself checked by central differences of the numpy loss (float64).
  def np_loss(lp):
    return np.sum(_np_ppo(lp - old, adv, clip_low, clip_high, dual_clip)[0] * weights * share)

  eps = 1e-6
  for row, col in zip(*np.nonzero(on)):
    e = np.zeros_like(logp)
    e[row, col] = eps
    fd = (np_loss(logp + e) - np_loss(logp - e)) / (2 * eps)
    np.testing.assert_allclose(fd, want_grad[row, col], rtol=1e-5, atol=1e-9)

  # clip_frac: the tokens where the clipped term wins; dual_clip_frac: the tokens the dual clip caps.
  l1, l2 = -adv * r, -adv * np.clip(r, 1 - clip_low, 1 + clip_high)
  np.testing.assert_allclose(float(aux["clip_frac"]), np.sum((l2 > l1) * share), rtol=1e-5, atol=1e-7)
  if dual_clip is not None:
    dual = (adv < 0) & (-adv * dual_clip < np.maximum(l1, l2))
    np.testing.assert_allclose(float(aux["dual_clip_frac"]), np.sum(dual * share), rtol=1e-5, atol=1e-7)


def test_ppo_clip_weights_carry_no_gradient_and_ratio_one_is_plain_pg():
  seg, mask, _, _, old, adv, weights = _ppo_case()
  # weights only scale the loss: the gradient w.r.t. them (through stop_gradient) is zero
  gw = jax.grad(lambda w: grpo.ppo_clip_loss(_f32(old), _f32(old), _f32(adv), _f32(mask), weights=w)[0])(_f32(weights))
  np.testing.assert_array_equal(np.asarray(gw), 0.0)
  # at logp = old: loss = -mean(A w), gradient -A w / n (the REINFORCE gradient)
  value, grad = jax.value_and_grad(
    lambda lp: grpo.ppo_clip_loss(lp, _f32(old), _f32(adv), _f32(mask), weights=_f32(weights))[0]
  )(_f32(old))
  n = mask.sum()
  np.testing.assert_allclose(float(value), np.sum(-adv * weights * mask) / n, rtol=1e-5)
  np.testing.assert_allclose(np.asarray(grad), -adv * weights * mask / n, rtol=1e-5, atol=1e-8)


# ----------------------------------------------------------------------------------------------------------------
# GSPO
# ----------------------------------------------------------------------------------------------------------------
def _np_gspo(logp_seqs, old_seqs, mask_seqs, adv_seqs, cl, ch):
  """The paper's sequence-level objective (eq. 5/7 negated) and its gradient per token, numpy float64."""
  n = len(logp_seqs)
  value, grads = 0.0, []
  for lp, old, m, a in zip(logp_seqs, old_seqs, mask_seqs, adv_seqs):
    s = np.exp(np.sum((lp - old) * m) / m.sum())
    l1, l2 = -a * s, -a * np.clip(s, 1 - cl, 1 + ch)
    value += max(l1, l2) / n
    unclipped = l1 >= l2
    grads.append(np.where(m > 0, -a * s / m.sum() / n if unclipped else 0.0, 0.0))
  return value, grads


@pytest.mark.parametrize("clip_low,clip_high", [(0.2, 0.28), (3e-4, 4e-4)])
def test_gspo_matches_the_sequence_level_objective_on_packed_rows(clip_low, clip_high):
  seg, mask, where = _layout()
  ids = grpo.sequence_ids(jnp.asarray(seg))
  rng = np.random.default_rng(4)
  ms = _masks()
  # Each sequence's mean log-ratio over its action tokens, chosen to put it in a known regime (scaled to the clip).
  k = clip_high / 0.28
  targets = np.array([0.5, 0.05, -0.5, 0.5, -0.05, -0.5]) * k  # with A: clipped / not clipped, both signs
  adv_seq = np.array([1.0, -0.8, -1.2, -0.5, 1.5, 0.7])
  olds, logps = [], []
  for m, t in zip(ms, targets):
    old = rng.uniform(-3.0, -0.5, size=len(m))
    noise = rng.normal(scale=0.1 * k, size=len(m))
    noise -= np.sum(noise * m) / m.sum()  # mean 0 over the action tokens: the sequence's mean log-ratio is t
    lp = old + t + noise + (1 - m) * rng.normal(size=len(m))  # off-mask tokens: anything, they must not count
    olds.append(old)
    logps.append(lp)
  want, want_grads = _np_gspo(logps, olds, ms, adv_seq, clip_low, clip_high)
  # both clipped and unclipped sequences occur
  nonzero = [bool(np.any(g != 0)) for g in want_grads]
  assert 0 < sum(nonzero) < len(SEQS)

  logp, old = _scatter(logps, where, seg.shape), _scatter(olds, where, seg.shape)
  adv = _scatter([np.full(len(m), a) for a, m in zip(adv_seq, ms)], where, seg.shape)

  def loss(lp):
    return grpo.gspo_loss(lp, _f32(old), _f32(adv), _f32(mask), clip_low=clip_low, clip_high=clip_high, seq_ids=ids)

  (value, aux), grad = jax.value_and_grad(loss, has_aux=True)(_f32(logp))
  np.testing.assert_allclose(float(value), want, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(np.asarray(grad), _scatter(want_grads, where, seg.shape), rtol=1e-4, atol=1e-7)
  # clip_frac (seq_mean): the share of sequences clipped
  np.testing.assert_allclose(float(aux["clip_frac"]), 1 - np.mean(nonzero), rtol=1e-5, atol=1e-7)

  # Unpacked (one sequence per row, seq_ids None): the same value and gradients.
  width = max(len(m) for m in ms)
  (v2, _), g2 = jax.value_and_grad(
    lambda lp: grpo.gspo_loss(
      lp, _f32(_unpacked(olds, width)), _f32(_unpacked([np.full(len(m), a) for a, m in zip(adv_seq, ms)], width)),
      _f32(_unpacked(ms, width)), clip_low=clip_low, clip_high=clip_high,
    ),
    has_aux=True,
  )(_f32(_unpacked(logps, width)))  # fmt: skip
  np.testing.assert_allclose(float(v2), want, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(np.asarray(g2), _unpacked(want_grads, width), rtol=1e-4, atol=1e-7)


def test_gspo_gradient_equals_finite_differences_of_the_sequence_objective():
  """The numpy analytic gradient used above is the derivative of the sequence-level objective (float64 FD)."""
  ms = _masks()
  rng = np.random.default_rng(5)
  olds = [rng.uniform(-2, -0.5, size=len(m)) for m in ms]
  logps = [o + t + rng.normal(scale=0.02, size=len(o)) for o, t in zip(olds, [0.4, 0.02, -0.4, 0.4, -0.02, -0.4])]
  adv = [1.0, -0.8, -1.2, -0.5, 1.5, 0.7]
  _, grads = _np_gspo(logps, olds, ms, adv, 0.2, 0.28)
  eps = 1e-6
  for i, m in enumerate(ms):
    for t in range(len(m)):
      up = [lp.copy() for lp in logps]
      dn = [lp.copy() for lp in logps]
      up[i][t] += eps
      dn[i][t] -= eps
      fd = (_np_gspo(up, olds, ms, adv, 0.2, 0.28)[0] - _np_gspo(dn, olds, ms, adv, 0.2, 0.28)[0]) / (2 * eps)
      np.testing.assert_allclose(fd, grads[i][t], rtol=1e-5, atol=1e-9)


# ----------------------------------------------------------------------------------------------------------------
# Rollout corrections
# ----------------------------------------------------------------------------------------------------------------
C = 2.0
# log rho per token (old - sampler): straddling log C = 0.693 and -log C on both sides.
LOG_RHO = np.array([-0.9, -0.7, -0.68, -0.3, 0.0, 0.2, 0.5, 0.68, 0.71, 1.1])


def _correction_case():
  seg, mask, where = _layout()
  rng = np.random.default_rng(6)
  sampler = rng.uniform(-3.0, -0.2, size=seg.shape)
  log_rho = rng.choice(LOG_RHO, size=seg.shape)
  old = sampler + log_rho
  # off-mask tokens get huge ratios: they must count neither in a token's weight nor in a sequence's product
  old = np.where(mask > 0, old, sampler + 5.0)
  return seg, mask, where, old, sampler


def _seq_rho(old, sampler, mask, where):
  """Per sequence: the product over its action tokens of rho_t."""
  return [np.prod(np.exp((old[r, c] - sampler[r, c])[mask[r, c] > 0])) for r, c in where]


def test_rollout_correction_none_is_ones():
  seg, mask, _, old, sampler = _correction_case()
  w, ind = grpo.get_rollout_correction("none")(_f32(old), _f32(sampler), _f32(mask), None, C)
  np.testing.assert_array_equal(np.asarray(w), np.ones(seg.shape))
  assert ind == {}


def test_token_tis_and_token_mis_against_numpy():
  seg, mask, _, old, sampler = _correction_case()
  ids = grpo.sequence_ids(jnp.asarray(seg))
  on = mask > 0
  rho = np.exp(old - sampler)
  assert np.any(on & (rho > C)) and np.any(on & (rho < 1 / C)) and np.any(on & (rho > 1 / C) & (rho < C))

  w, ind = grpo.get_rollout_correction("token_tis")(_f32(old), _f32(sampler), _f32(mask), ids, C)
  np.testing.assert_allclose(np.asarray(w)[on], np.minimum(rho, C)[on], rtol=1e-5)
  np.testing.assert_array_equal(np.asarray(ind["truncated_frac"])[on], (rho > C)[on])
  np.testing.assert_array_equal(np.asarray(ind["truncated_frac"])[~on], 0.0)  # off-mask tokens: not truncated

  w, ind = grpo.get_rollout_correction("token_mis")(_f32(old), _f32(sampler), _f32(mask), ids, C)
  inside = (rho >= 1 / C) & (rho <= C)
  np.testing.assert_allclose(np.asarray(w)[on], np.where(inside, rho, 0.0)[on], rtol=1e-5)
  np.testing.assert_array_equal(np.asarray(ind["masked_frac"])[on], (~inside)[on])
  np.testing.assert_array_equal(np.asarray(ind["masked_frac"])[~on], 0.0)


def test_seq_tis_and_seq_mis_use_the_product_over_each_sequences_action_tokens():
  seg, mask, where, old, sampler = _correction_case()
  ids = grpo.sequence_ids(jnp.asarray(seg))
  # Sequence log-ratios chosen to straddle the band: rescale each sequence's action-token deltas to a target sum.
  targets = [1.2, 0.6, -0.4, -0.9, 0.0, 0.75]
  for (r, c), t in zip(where, targets):
    on = mask[r, c] > 0
    d = old[r, c] - sampler[r, c]
    d = np.where(on, d - d[on].mean() + t / on.sum(), d)
    old[r, c] = sampler[r, c] + d
  seq_rho = np.array(_seq_rho(old, sampler, mask, where))
  np.testing.assert_allclose(np.log(seq_rho), targets, atol=1e-9)

  w, ind = grpo.get_rollout_correction("seq_tis")(_f32(old), _f32(sampler), _f32(mask), ids, C)
  w, trunc = np.asarray(w), np.asarray(ind["truncated_frac"])
  for (r, c), rho in zip(where, seq_rho):  # every token of the sequence, action or not, carries its weight
    np.testing.assert_allclose(w[r, c], np.full(len(c), min(rho, C)), rtol=1e-5)
    np.testing.assert_array_equal(trunc[r, c], np.full(len(c), float(rho > C)))

  w, ind = grpo.get_rollout_correction("seq_mis")(_f32(old), _f32(sampler), _f32(mask), ids, C)
  w, dropped = np.asarray(w), np.asarray(ind["masked_frac"])
  for (r, c), rho in zip(where, seq_rho):
    inside = 1 / C <= rho <= C
    np.testing.assert_allclose(w[r, c], np.full(len(c), rho if inside else 0.0), rtol=1e-5)
    np.testing.assert_array_equal(dropped[r, c], np.full(len(c), float(not inside)))

  # seq_ids None: one sequence per row (an unpacked batch): the row's product
  w, _ = grpo.get_rollout_correction("seq_tis")(_f32(old[2:]), _f32(sampler[2:]), _f32(mask[2:]), None, C)
  r, c = where[-1]
  np.testing.assert_allclose(np.asarray(w)[0, c], min(seq_rho[-1], C), rtol=1e-5)


def test_an_unknown_rollout_correction_names_the_known_ones():
  with pytest.raises(Exception, match="token_tis"):
    grpo.get_rollout_correction("nope")


# ----------------------------------------------------------------------------------------------------------------
# Mismatch metrics
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("aggregation", ["token_mean", "seq_mean"])
def test_mismatch_metrics_against_numpy(aggregation):
  seg, mask, where = _layout()
  rng = np.random.default_rng(7)
  sampler = rng.uniform(-3, -0.2, size=seg.shape)
  d = rng.choice([-1.0, -0.72, -0.66, -0.2, 0.0, 0.1, 0.5, 0.68, 0.71, 0.9], size=seg.shape)
  logp = np.where(mask > 0, sampler + d, sampler + 9.0)  # off-mask: a huge |d| that must not count
  ids = grpo.sequence_ids(jnp.asarray(seg))
  got = grpo.mismatch_metrics(_f32(logp), _f32(sampler), _f32(mask), aggregation, seq_ids=ids)
  dd = logp - sampler

  def agg(v):
    if aggregation == "token_mean":
      return np.sum(v * mask) / mask.sum()
    return _np_seq_mean([v[r, c] for r, c in where], [mask[r, c] for r, c in where])

  on = mask > 0
  np.testing.assert_allclose(float(got["abs_log_ratio_mean"]), agg(np.abs(dd)), rtol=1e-5)
  np.testing.assert_allclose(float(got["abs_log_ratio_max"]), np.abs(dd)[on].max(), rtol=1e-5)
  np.testing.assert_allclose(float(got["kl_k3"]), agg(np.exp(dd) - dd - 1), rtol=1e-4)
  np.testing.assert_allclose(float(got["out_of_band_frac"]), agg((np.abs(dd) > np.log(2)).astype(float)), 1e-5)
  assert 0 < float(got["out_of_band_frac"]) < 1
  assert float(got["kl_k3"]) > 0


# ----------------------------------------------------------------------------------------------------------------
# Shaping (host side)
# ----------------------------------------------------------------------------------------------------------------
def _np_overlong(length, budget, buffer, factor):
  """DAPO eq. 13 with L_max = budget, L_cache = buffer, times the factor."""
  if buffer == 0:
    return 0.0
  if length <= budget - buffer:
    return 0.0
  if length <= budget:
    return factor * ((budget - buffer) - length) / buffer
  return -factor


@pytest.mark.parametrize("buffer,factor", [(40, 1.0), (40, 0.5), (1, 2.0), (0, 1.0)])
def test_overlong_penalty_is_dapo_eq13(buffer, factor):
  lengths = [0, 50, 60, 61, 70, 80, 99, 100, 101, 250, 30, 45]
  budgets = [100, 100, 100, 100, 100, 100, 100, 100, 100, 100, 50, 50]
  got = shaping.overlong_penalty(lengths, budgets, buffer=buffer, factor=factor)
  assert got.shape == (len(lengths),) and got.dtype == np.float32
  want = [_np_overlong(n, b, buffer, factor) for n, b in zip(lengths, budgets)]
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
  if buffer == 40:  # the ramp: 0 at budget - buffer, -factor/2 half way, -factor at the budget
    np.testing.assert_allclose(got[[2, 5, 7, 8]], [0.0, -0.5 * factor, -factor, -factor], atol=1e-7)


def test_over_turn_marks_only_the_limit_stops():
  limits = {"max_turns", "max_images", "max_sequence"}  # not turn_length: one runaway turn keeps its penalty
  got = shaping.over_turn(list(STOP_REASONS))
  np.testing.assert_array_equal(got, [s in limits for s in STOP_REASONS])
  assert got.dtype == bool and got.sum() == 3
  assert shaping.over_turn([]).shape == (0,)


def test_groups_with_signal():
  totals = [1.0, 1.0, 0.0, 2.0, 2.0, 5.0, 3.0, 3.0, 7.0, 0.5]
  gids = ["b", "b", "a", "a", "c", "c", "d", "d", "e", "f"]
  ok = [True, True, True, True, True, False, True, True, True, True]
  got = shaping.groups_with_signal(totals, gids, ok)
  # b equal, a differs, c's only different row failed (one ok row left), d equal, e and f groups of one
  assert got == {"b": False, "a": True, "c": False, "d": False, "e": False, "f": False}
  assert list(got) == ["b", "a", "c", "d", "e", "f"]  # in order of first appearance
  assert shaping.groups_with_signal(totals, gids)["c"] is True  # ok=None: every row counts


# ----------------------------------------------------------------------------------------------------------------
# Tool health and rollout metrics
# ----------------------------------------------------------------------------------------------------------------
def _np_tool_health(calls, fraction, smoothing, min_peak, ema=None, peak=0.0):
  out = []
  for x in calls:
    ema = x if ema is None else smoothing * ema + (1 - smoothing) * x
    peak = max(peak, ema)
    out.append((ema, peak, fraction > 0 and peak >= min_peak and ema < fraction * peak))
  return out


CALLS = [0.0, 0.05, 0.3, 1.2, 1.5, 1.4, 0.6, 0.2, 0.0, 0.0, 0.0, 0.8, 1.5, 1.5]


@pytest.mark.parametrize("fraction,smoothing,min_peak", [(0.5, 0.8, 0.1), (0.25, 0.5, 0.1), (0.5, 0.8, 5.0)])
def test_tool_health_ema_peak_and_collapse_flag(fraction, smoothing, min_peak):
  th = metrics.ToolHealth(fraction, smoothing=smoothing, min_peak=min_peak)
  want = _np_tool_health(CALLS, fraction, smoothing, min_peak)
  got = [th.update(x) for x in CALLS]
  for g, (ema, peak, flag) in zip(got, want):
    np.testing.assert_allclose(g["tool/calls_ema"], ema, rtol=1e-12)
    np.testing.assert_allclose(g["tool/calls_peak"], peak, rtol=1e-12)
    assert g["tool/collapse"] == float(flag)
  flags = [g["tool/collapse"] for g in got]
  if min_peak > 1.5:  # the peak never reaches min_peak: never flagged
    assert not any(flags)
  else:
    assert any(flags) and not all(flags)


def test_tool_health_off_and_state_round_trip():
  th = metrics.ToolHealth(0.0)
  assert not any(th.update(x)["tool/collapse"] for x in CALLS)
  for k in range(len(CALLS)):
    a = metrics.ToolHealth(0.5)
    for x in CALLS[:k]:
      a.update(x)
    b = metrics.ToolHealth(0.5, state=dict(a.state()))  # a resumed run
    assert [b.update(x) for x in CALLS[k:]] == [a.update(x) for x in CALLS[k:]]
  # and the restored instance flags the steps the uninterrupted one flagged
  full = [f for _, _, f in _np_tool_health(CALLS, 0.5, 0.8, 0.1)]
  a = metrics.ToolHealth(0.5)
  for x in CALLS[:7]:
    a.update(x)
  b = metrics.ToolHealth(0.5, state=a.state())
  assert [bool(b.update(x)["tool/collapse"]) for x in CALLS[7:]] == full[7:]
  assert any(full[7:])


def _tool(status, bbox):
  return ToolRecord(turn=0, content="", name="zoom", bbox_given=bbox, bbox=bbox, status=status, error=None)


def _trajectory(uid, tool_calls, images):
  ids = np.arange(12, dtype=np.int32)
  mask = np.r_[np.zeros(4), np.ones(8)].astype(np.int8)
  return Trajectory(
    uid=uid, task_id=uid, sample_index=0, token_ids=ids, action_mask=mask, logprobs=np.zeros(12, np.float32),
    position_ids=np.zeros((3, 12), np.int32), images=images, grids=np.zeros((0, 3), np.int64), prompt_length=4,
    turns=[], tool_calls=tool_calls, answer="a", stop_reason="answer", image_min_pixels=0, image_max_pixels=0,
  )  # fmt: skip


def _reward(acc):
  return RewardResult(total=acc, acc=acc, fmt=0.0, tool=0.0, answer="a")


def test_rollout_metrics_crop_area_and_accuracy_with_and_without_tool():
  big, small = Image.new("RGB", (200, 100)), Image.new("RGB", (40, 40))
  trajs = [
    _trajectory("a", [_tool("ok", [0, 0, 50, 50]), _tool("ok", [10, 10, 110, 60])], [big]),  # 2500, 5000 / 20000
    _trajectory("b", [_tool("json_error", None)], [big]),  # a failed call: no crop, not "with tool"
    _trajectory("c", [], [big]),
    _trajectory("d", [_tool("ok", [0, 0, 40, 20])], [small]),  # 800 / 1600
    _trajectory("e", [], [small]),
  ]
  rewards = [_reward(a) for a in (1.0, 0.0, 1.0, 0.0, 1.0)]
  m = metrics.rollout_metrics(trajs, rewards)
  np.testing.assert_allclose(m["tool/crop_area_frac"], np.mean([2500 / 20000, 5000 / 20000, 800 / 1600]))
  np.testing.assert_allclose(m["tool/acc_with_tool"], np.mean([1.0, 0.0]))  # a, d
  np.testing.assert_allclose(m["tool/acc_without_tool"], np.mean([0.0, 1.0, 1.0]))  # b, c, e
  np.testing.assert_allclose(m["tool/calls_per_traj"], 4 / 5)
  np.testing.assert_allclose(m["tool/success_rate"], 3 / 4)

  # No crops, nobody used the tool: the keys that have no data are absent (not 0).
  m = metrics.rollout_metrics(trajs[1:3], rewards[1:3])
  assert "tool/crop_area_frac" not in m and "tool/acc_with_tool" not in m
  np.testing.assert_allclose(m["tool/acc_without_tool"], 0.5)
  m = metrics.rollout_metrics([trajs[0]], [rewards[0]])
  assert "tool/acc_without_tool" not in m and m["tool/acc_with_tool"] == 1.0


# ----------------------------------------------------------------------------------------------------------------
# Learner: micro-batch accumulation, sequence counts, config checks
# ----------------------------------------------------------------------------------------------------------------
def _packed(seg, mask, old, sampler, adv):
  r, length = seg.shape
  return PackedBatch(
    tokens=np.ones((r, length), np.int32), segment_ids=seg.astype(np.int32),
    positions=np.tile(np.arange(length, dtype=np.int32), (r, 1)), position_ids=np.zeros((3, r, length), np.int32),
    loss_mask=mask.astype(np.float32), old_logprobs=old.astype(np.float32),
    sampler_logprobs=sampler.astype(np.float32), advantages=adv.astype(np.float32), pixel_values=None, plan=None,
  )  # fmt: skip


def test_num_sequences_counts_row_segments_with_loss_tokens():
  seg, mask, _ = _layout()
  z = np.zeros(seg.shape)
  assert num_sequences(_packed(seg, mask, z, z, z)) == len(SEQS)
  mask2 = mask.copy()
  mask2[seg == 2] = 0  # segment 2 of rows 0 and 1 loses its action tokens: 2 sequences fewer
  assert num_sequences(_packed(seg, mask2, z, z, z)) == len(SEQS) - 2
  assert num_sequences(_packed(seg, np.zeros_like(mask), z, z, z)) == 0


class _Scalar(nnx.Module):
  def __init__(self):
    self.theta = nnx.Param(jnp.zeros((), jnp.float32))


@pytest.mark.parametrize("aggregation", ["token_mean", "seq_mean"])
def test_learner_update_sums_metrics_over_micro_batches_and_maxes_the_max(monkeypatch, aggregation):
  """A real Learner (real _loss, jit, accumulation, AdamW apply) on a one-parameter stand-in policy: log p =
  old_logp + theta * feature. At theta = 0 the ratio is 1, so the loss is -aggregate(A) over the WHOLE mini-batch;
  the mismatch max is the max over both micro-batches (a sum would be wrong)."""
  seg, mask, where = _layout()
  rng = np.random.default_rng(8)
  old = rng.uniform(-3, -0.2, size=seg.shape) * mask
  d = np.zeros(seg.shape)
  d[0] = np.where(mask[0] > 0, rng.uniform(-0.3, 0.3, ROW_LEN), 0.0)
  d[0, where[0][1][-1]] = 0.9  # the largest |logp - sampler| is in micro-batch 1 ...
  d[1:] = np.where(mask[1:] > 0, rng.uniform(-0.5, 0.5, (2, ROW_LEN)), 0.0)  # ... micro-batch 2's is < 0.5
  sampler = old - d
  adv = _scatter([np.full(len(p), a) for a, (_, p) in zip([1.0, -0.5, 0.3, -1.2, 0.8, 2.0], SEQS)], where, seg.shape)
  feature = rng.normal(size=seg.shape)

  def fake_logprobs(model, batch, **_):
    lp = batch.old_logprobs + model.theta[...] * batch.tokens.astype(jnp.float32)
    return lp, jnp.zeros_like(lp)

  monkeypatch.setattr(train_step, "token_logprobs", fake_logprobs)
  learner = Learner(_Scalar(), LearnerConfig(aggregation=aggregation, grad_clip=None))
  tokens = (feature * 100).round().astype(np.int32)  # the feature travels as tokens (ints): feature / 100 scale
  whole = _packed(seg, mask, old, sampler, adv)
  whole.tokens = tokens
  mbs = [_packed(seg[s], mask[s], old[s], sampler[s], adv[s]) for s in (slice(0, 1), slice(1, 3))]
  for mb, s in zip(mbs, (slice(0, 1), slice(1, 3))):
    mb.tokens = tokens[s]
  m = learner.update(mbs)

  ms = [mask[r, c] for r, c in where]

  def agg(v):
    if aggregation == "token_mean":
      return np.sum(v * mask) / mask.sum()
    return _np_seq_mean([v[r, c] for r, c in where], ms)

  np.testing.assert_allclose(m["loss"], agg(-adv), rtol=1e-5)
  np.testing.assert_allclose(m["pg_loss"], agg(-adv), rtol=1e-5)
  np.testing.assert_allclose(m["mismatch/abs_log_ratio_max"], 0.9, rtol=1e-5)
  np.testing.assert_allclose(m["mismatch/abs_log_ratio_mean"], agg(np.abs(d)), rtol=1e-5)
  np.testing.assert_allclose(m["mismatch/kl_k3"], agg(np.exp(d) - d - 1), rtol=1e-4, atol=1e-7)
  np.testing.assert_allclose(m["ratio_mean"], 1.0, rtol=1e-5)
  # d loss / d theta = sum_t share_t * (-A_t) * tokens_t (the ratio's derivative at theta = 0 is the token)
  if aggregation == "token_mean":
    share = mask / mask.sum()
  else:
    share = _scatter([m_ / m_.sum() / len(SEQS) for m_ in ms], where, seg.shape)
  np.testing.assert_allclose(m["grad_norm"], abs(np.sum(share * -adv * tokens)), rtol=1e-4)
  assert m["skipped"] == 0.0 and learner.step == 1
  assert float(learner.state["theta"][...]) != 0.0  # it moved

  # the same update over one micro-batch gives the same metrics
  one = Learner(_Scalar(), LearnerConfig(aggregation=aggregation, grad_clip=None)).update([whole])
  for k in ("loss", "mismatch/abs_log_ratio_max", "mismatch/abs_log_ratio_mean", "grad_norm"):
    np.testing.assert_allclose(m[k], one[k], rtol=1e-5)


def test_combine_maxes_max_keys_and_sums_the_rest():
  a, b = jnp.float32(0.9), jnp.float32(0.4)
  assert float(train_step._combine("mismatch/abs_log_ratio_max", a, b)) == pytest.approx(0.9)
  assert float(train_step._combine("mismatch/abs_log_ratio_max", b, a)) == pytest.approx(0.9)
  assert float(train_step._combine("loss", a, b)) == pytest.approx(1.3)


def test_learner_config_refuses_unknown_correction_and_threshold_one():
  with pytest.raises(ValueError, match="rollout_correction") as e:
    LearnerConfig(rollout_correction="nope")
  for name in ("none", "token_tis", "seq_tis", "token_mis", "seq_mis"):
    assert name in str(e.value)
  with pytest.raises(ValueError, match="rollout_correction_threshold"):
    LearnerConfig(rollout_correction_threshold=1.0)
  LearnerConfig(rollout_correction="seq_mis", rollout_correction_threshold=1.5)  # accepted


# ----------------------------------------------------------------------------------------------------------------
# train_config.validate and the algo= variants
# ----------------------------------------------------------------------------------------------------------------
def _config(name, arg=None):
  config = cr.load_module(ROOT / "configs" / f"{name}.py").get_config(arg)
  if not config.model.checkpoint and not config.model.get("tiny"):
    config.model.checkpoint = "/ckpt/Qwen2.5-VL-7B-Instruct"
  if not config.data.train:
    config.data.train = "/data/deepeyes/*.parquet"
  return config


def _problem_fields(config):
  with pytest.raises(ConfigError) as e:
    train_config.validate(config)
  return {p.split("=")[0].removeprefix("config.") for p in e.value.problems}, e.value


@pytest.mark.parametrize(
  "changes,field",
  [
    ({"policy_loss": "gspo", "aggregation": "token_mean", "old_logprobs": "recompute"}, "rl.aggregation"),
    ({"policy_loss": "gspo", "aggregation": "seq_mean", "old_logprobs": "sampler"}, "rl.old_logprobs"),
    ({"dynamic_sampling": True, "group_size": 1}, "rl.dynamic_sampling"),
    ({"rollout_correction": "token_tis", "old_logprobs": "sampler"}, "rl.old_logprobs"),
    ({"rollout_correction": "seq_mis", "old_logprobs": "sampler"}, "rl.old_logprobs"),
    ({"overlong_buffer": 256}, "rl.overlong_buffer"),  # = the response budget 512 - 256
    ({"overlong_buffer": 1000}, "rl.overlong_buffer"),
    ({"off_policy_steps": 2}, "rl.off_policy_steps"),
    ({"sampler_devices": 1, "off_policy_steps": 0}, "rl.sampler_devices"),
    ({"rollout_correction": "nope", "old_logprobs": "recompute"}, "rl.rollout_correction"),
    ({"rollout_correction_threshold": 1.0}, "rl.rollout_correction_threshold"),
  ],
)
def test_validate_names_the_bad_algorithm_combination(changes, field):
  config = _config("synthetic")
  assert train_config.validate(config) == []
  for k, v in changes.items():
    (config.rollout if k == "group_size" else config.rl)[k] = v
  fields, err = _problem_fields(config)
  assert fields == {field}, str(err)


@pytest.mark.parametrize(
  "changes",
  [
    {"policy_loss": "gspo", "aggregation": "seq_mean", "old_logprobs": "recompute"},
    {"rollout_correction": "token_tis", "old_logprobs": "recompute"},
    {"overlong_buffer": 255},
    {"sampler_devices": 1, "off_policy_steps": 1},
  ],
)
def test_validate_accepts_the_good_combinations(changes):
  config = _config("synthetic")
  for k, v in changes.items():
    config.rl[k] = v
  assert train_config.validate(config) == []


BASE_RL = {
  "policy_loss": "ppo_clip", "aggregation": "token_mean", "clip_low": 0.2, "clip_high": 0.2, "dual_clip": 3.0,
  "old_logprobs": "sampler", "rollout_correction": "none", "dynamic_sampling": False, "overlong_buffer": 0,
}  # fmt: skip
ALGO_RL = {
  "grpo": {},
  "gspo": {
    "policy_loss": "gspo", "aggregation": "seq_mean", "clip_low": 3e-4, "clip_high": 4e-4, "dual_clip": 0.0,
    "old_logprobs": "recompute",
  },
  "dapo": {
    "clip_low": 0.2, "clip_high": 0.28, "dual_clip": 0.0, "aggregation": "token_mean", "dynamic_sampling": True,
    "dynamic_sampling_max_rounds": 3, "old_logprobs": "recompute", "overlong_buffer": "budget/5",
  },
  "grpo_tis": {"rollout_correction": "token_tis", "rollout_correction_threshold": 2.0, "old_logprobs": "recompute"},
}  # fmt: skip


@pytest.mark.parametrize("name", ["synthetic", "deepeyes_7b"])
@pytest.mark.parametrize("algo", ["grpo", "gspo", "dapo", "grpo_tis"])
def test_algo_variants_validate_and_set_their_fields(name, algo):
  config = _config(name, f"algo={algo}")
  assert train_config.validate(config) == []
  want = {**BASE_RL, **ALGO_RL[algo]}
  budget = config.rollout.max_total_tokens - config.rollout.max_prompt_tokens
  if want["overlong_buffer"] == "budget/5":
    want["overlong_buffer"] = budget // 5
    assert 0 < want["overlong_buffer"] < budget
  for k, v in want.items():
    assert config.rl[k] == v, (name, algo, k)
  # the rest of the recipe is untouched by algo=
  base = _config(name)
  for k in base.rl:
    if k not in want:
      assert config.rl[k] == base.rl[k], (name, algo, k)
  with pytest.raises(ValueError, match="algo must be one of"):
    _config(name, "algo=ppo")
