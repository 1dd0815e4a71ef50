"""GRPO advantages and losses against hand-worked values; packing; gradients; sharded and skipped updates."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import image_block, random_pixels, tiny_config

from deepeyes_jax.agent.trajectory import Trajectory
from deepeyes_jax.models import qwen2_5_vl as qvl
from deepeyes_jax.parallel import sharding as shd
from deepeyes_jax.rl import grpo
from deepeyes_jax.rl.packing import assign_rows, pack
from deepeyes_jax.rl.train_step import Learner, LearnerConfig, token_logprobs


# --- advantages --------------------------------------------------------------------------------------------
def test_grpo_advantages_hand_worked():
  # group A: rewards 2.0, 0.8, 0.0, 0.0 -> mean 0.7, unbiased std sqrt(((1.3)^2+(0.1)^2+2*(0.7)^2)/3)
  r = [2.0, 0.8, 0.0, 0.0, 1.0, 1.0]
  g = ["a", "a", "a", "a", "b", "b"]
  adv, keep = grpo.get_advantage_fn("grpo")(r, g)
  std = np.sqrt((1.3**2 + 0.1**2 + 2 * 0.7**2) / 3)
  np.testing.assert_allclose(adv[:4], np.array([1.3, 0.1, -0.7, -0.7]) / (std + 1e-6), rtol=1e-6)
  np.testing.assert_array_equal(adv[4:], [0.0, 0.0])  # zero variance: 0 / (0 + eps)
  assert keep.all()
  _, keep = grpo.get_advantage_fn("grpo")(r, g, drop_zero_variance=True)
  np.testing.assert_array_equal(keep, [1, 1, 1, 1, 0, 0])


def test_other_estimators_and_registry():
  r, g = [3.0, 1.0, 2.0], [0, 0, 0]
  np.testing.assert_allclose(grpo.get_advantage_fn("dr_grpo")(r, g)[0], [1.0, -1.0, 0.0])
  np.testing.assert_allclose(grpo.get_advantage_fn("rloo")(r, g)[0], [3 - 1.5, 1 - 2.5, 2 - 2.0])
  with pytest.raises(KeyError, match="registered"):
    grpo.get_advantage_fn("nope")

  @grpo.register_advantage("constant_test")
  def _c(rewards, group_ids, **_):
    return np.ones(len(rewards), np.float32), np.ones(len(rewards), bool)

  assert grpo.get_advantage_fn("constant_test")(r, g)[0].tolist() == [1, 1, 1]


# --- loss --------------------------------------------------------------------------------------------------
def _reference_ppo(logp, old, adv, mask, lo, hi, c):
  """An independent per-token loop of verl's dual-clip PPO loss."""
  out = []
  for lp, o, a, m in zip(logp.ravel(), old.ravel(), adv.ravel(), mask.ravel()):
    if not m:
      continue
    ratio = np.exp(lp - o)
    loss_t = max(-a * ratio, -a * min(max(ratio, 1 - lo), 1 + hi))
    if a < 0:
      loss_t = min(loss_t, -a * c)
    out.append(loss_t)
  return np.mean(out)


def test_ppo_clip_loss_matches_reference_and_reduces_to_pg_at_ratio_one():
  rng = np.random.default_rng(0)
  logp = rng.normal(-2, 1, (3, 7)).astype(np.float32)
  old = logp + rng.normal(0, 0.5, logp.shape).astype(np.float32)
  adv = rng.normal(0, 1, (3, 1)).repeat(7, 1).astype(np.float32)
  mask = (rng.random((3, 7)) > 0.3).astype(np.float32)
  loss, aux = grpo.ppo_clip_loss(jnp.asarray(logp), jnp.asarray(old), jnp.asarray(adv), jnp.asarray(mask))
  np.testing.assert_allclose(float(loss), _reference_ppo(logp, old, adv, mask, 0.2, 0.2, 3.0), rtol=1e-5)
  assert 0 < float(aux["clip_frac"]) < 1
  # ratio == 1: the clipped loss is the plain policy-gradient loss -mean(A), and its gradient is -A * dlogp.
  f = lambda lp: grpo.ppo_clip_loss(lp, jax.lax.stop_gradient(lp), jnp.asarray(adv), jnp.asarray(mask))[0]
  np.testing.assert_allclose(float(f(jnp.asarray(logp))), -(adv * mask).sum() / mask.sum(), rtol=1e-6)
  np.testing.assert_allclose(np.asarray(jax.grad(f)(jnp.asarray(logp))), -adv * mask / mask.sum(), rtol=1e-6)


def test_loss_gradient_matches_finite_differences():
  rng = np.random.default_rng(1)
  old = rng.normal(-2, 1, (2, 5))
  adv = np.array([[1.5], [-0.7]]).repeat(5, 1)
  mask = np.ones((2, 5))
  mask[1, :2] = 0
  logp = old + rng.normal(0, 0.15, old.shape)  # mostly inside the clip range
  with jax.enable_x64():
    f = lambda lp: grpo.ppo_clip_loss(lp, jnp.asarray(old), jnp.asarray(adv), jnp.asarray(mask))[0]
    g = np.asarray(jax.grad(f)(jnp.asarray(logp)))
    eps = 1e-6
    fd = np.zeros_like(logp)
    for idx in np.ndindex(logp.shape):
      e = np.zeros_like(logp)
      e[idx] = eps
      fd[idx] = (float(f(jnp.asarray(logp + e))) - float(f(jnp.asarray(logp - e)))) / (2 * eps)
  np.testing.assert_allclose(g, fd, atol=1e-6)
  assert np.abs(g).sum() > 0


def test_seq_mean_aggregation():
  x = jnp.array([[1.0, 3.0, 0.0], [2.0, 0.0, 0.0]])
  m = jnp.array([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
  assert float(grpo.aggregate(x, m, "seq_mean")) == pytest.approx((2.0 + 2.0) / 2)
  assert float(grpo.aggregate(x, m, "token_mean")) == pytest.approx(6.0 / 3)


# --- packing and log-probs ---------------------------------------------------------------------------------
def _traj(uid, prompt, gen, grids, seed):
  cfg = tiny_config()
  ids = np.asarray(prompt + gen, np.int32)
  pos, _ = qvl.positions_for_tokens(ids, iter(grids), cfg.image_token_id, 2)
  pv = random_pixels(grids, seed) if grids else None
  pvs, off = [], 0
  for g in grids:
    n = int(np.prod(g))
    pvs.append(pv[off : off + n])
    off += n
  mask = np.r_[np.zeros(len(prompt)), np.ones(len(gen))].astype(np.int8)
  return Trajectory(
    uid=uid, task_id=uid, sample_index=0, token_ids=ids, action_mask=mask,
    logprobs=np.where(mask, -1.0, 0.0).astype(np.float32), position_ids=pos.astype(np.int32), images=[],
    grids=np.asarray(grids, np.int64).reshape(-1, 3), prompt_length=len(prompt), turns=[], tool_calls=[],
    answer=None, stop_reason="answer", image_min_pixels=0, image_max_pixels=0, pixel_values=pvs,
  )  # fmt: skip


TRAJS = [
  ("a", [5, 6] + image_block((1, 4, 6)) + [7], [11, 12, 13, 14, 15], [(1, 4, 6)]),
  ("b", [8] + image_block((1, 6, 4)) + [9, 10] + image_block((1, 2, 4)), [21, 22, 23], [(1, 6, 4), (1, 2, 4)]),
  ("c", [30, 31, 32], [33, 34, 35, 36, 37, 38], []),
]


def test_packed_and_unpacked_logprobs_agree(jax_model):
  trajs = [_traj(u, p, g, gr, i) for i, (u, p, g, gr) in enumerate(TRAJS)]
  adv = np.array([1.0, -1.0, 0.5], np.float32)
  cfg = jax_model.config.vision
  rows = assign_rows([len(t.token_ids) for t in trajs], 64)
  assert len(rows) == 1  # all three share one row
  packed = pack(trajs, adv, rows, row_len=64, vision=cfg)
  lp_packed, _ = token_logprobs(jax_model, jax.tree.map(jnp.asarray, packed))
  for i, t in enumerate(trajs):
    single = pack([t], adv[i : i + 1], [[0]], row_len=len(t.token_ids), vision=cfg)
    lp_single, _ = token_logprobs(jax_model, jax.tree.map(jnp.asarray, single))
    r, s = next((r, k + 1) for r, mem in enumerate(rows) for k, j in enumerate(mem) if j == i)
    sel = np.asarray(packed.segment_ids[r] == s)
    got = np.asarray(lp_packed[r])[sel][t.action_mask == 1]
    want = np.asarray(lp_single[0])[t.action_mask == 1]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    # and both equal the model's plain forward
    logits = jax_model(
      t.token_ids[None],
      pixel_values=np.concatenate(t.pixel_values) if t.pixel_values else None,
      image_grid_thw=t.grids if len(t.grids) else None,
    )
    ref = jax.nn.log_softmax(logits[0], -1)[np.arange(len(t.token_ids) - 1), t.token_ids[1:]]
    np.testing.assert_allclose(want, np.asarray(ref)[t.action_mask[1:] == 1], rtol=1e-5, atol=1e-5)


def test_packing_errors_and_first_fit():
  assert assign_rows([5, 3, 4, 2], 7) == [[0, 3], [2, 1]]
  with pytest.raises(ValueError, match="more than the packing row length"):
    assign_rows([9], 8)


# --- learner -----------------------------------------------------------------------------------------------
def _batches(model, n_micro=2):
  trajs = [_traj(u, p, g, gr, i) for i, (u, p, g, gr) in enumerate(TRAJS * 2)]
  adv = np.array([1.0, -1.0, 0.5, -0.5, 0.8, -0.8], np.float32)
  rows = assign_rows([len(t.token_ids) for t in trajs], 48)
  per = -(-len(rows) // n_micro)
  return [
    pack(trajs, adv, rows[i : i + per], row_len=48, vision=tiny_config().vision, num_rows=per)
    for i in range(0, len(rows), per)
  ]


def test_accumulated_micro_batches_equal_one_batch(hf_checkpoint):
  cfg = LearnerConfig(learning_rate=1e-3)
  a = Learner(qvl.from_pretrained(hf_checkpoint[0], dtype=jnp.float32), cfg)
  b = Learner(qvl.from_pretrained(hf_checkpoint[0], dtype=jnp.float32), cfg)
  m_split = a.update(_batches(a, 2))
  m_one = b.update(_batches(b, 1))
  assert m_split["loss"] == pytest.approx(m_one["loss"], rel=1e-5)
  assert m_split["grad_norm"] == pytest.approx(m_one["grad_norm"], rel=1e-4)
  for x, y in zip(jax.tree.leaves(a.state), jax.tree.leaves(b.state)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-4, atol=5e-5)  # 5% of an Adam step (lr 1e-3)
  assert m_one["skipped"] == 0 and m_one["grad_norm"] > 0


def test_sharded_update_equals_single_device(hf_checkpoint):
  cfg = LearnerConfig(learning_rate=1e-3)
  single = Learner(qvl.from_pretrained(hf_checkpoint[0], dtype=jnp.float32), cfg)
  mesh = shd.make_mesh(2, 2, 2)
  # As the 7B recipe runs: activations constrained to the mesh, images sharded with their rows, layers
  # rematerialised and scanned; the single-device learner runs none of that.
  model = qvl.from_pretrained(hf_checkpoint[0], dtype=jnp.float32, mesh=mesh).set_remat("full", scan_layers=True)
  sharded = Learner(model, cfg, mesh=mesh)
  ms = single.update(_batches(single, 1))
  mm = sharded.update(_batches(sharded, 1))
  assert mm["loss"] == pytest.approx(ms["loss"], rel=1e-5)
  assert mm["grad_norm"] == pytest.approx(ms["grad_norm"], rel=1e-4)
  for x, y in zip(jax.tree.leaves(sharded.state), jax.tree.leaves(single.state)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-4, atol=5e-5)  # 5% of an Adam step (lr 1e-3)
  kernel = sharded.state["language_model"]["layers"][0]["mlp"]["gate_proj"]["weight"].get_value()
  assert len(kernel.sharding.device_set) == 8
  batch = sharded.place(_batches(sharded, 1)[0])
  row_axes = batch.tokens.sharding.spec[0]
  assert row_axes is not None and batch.pixel_values.ndim == 3 and batch.pixel_values.sharding.spec[0] == row_axes


def test_non_finite_update_is_skipped(hf_checkpoint):
  learner = Learner(qvl.from_pretrained(hf_checkpoint[0], dtype=jnp.float32), LearnerConfig(learning_rate=1e-3))
  before = [np.asarray(x).copy() for x in jax.tree.leaves(learner.state)]
  bad = _batches(learner, 1)
  bad[0].advantages[bad[0].loss_mask > 0] = np.nan
  m = learner.update(bad)
  assert m["skipped"] == 1.0
  for x, y in zip(before, jax.tree.leaves(learner.state)):
    np.testing.assert_array_equal(x, np.asarray(y))
  m = learner.update(_batches(learner, 1))  # the run goes on
  assert m["skipped"] == 0.0 and learner.step == 1


def test_frozen_vision_tower_does_not_move(hf_checkpoint):
  learner = Learner(
    qvl.from_pretrained(hf_checkpoint[0], dtype=jnp.float32), LearnerConfig(learning_rate=1e-2, train_vision=False)
  )
  vis_before = [np.asarray(x).copy() for x in jax.tree.leaves(learner.state["visual"])]
  lm_before = np.asarray(learner.state["lm_head"]["weight"].get_value()).copy()
  learner.update(_batches(learner, 1))
  for x, y in zip(vis_before, jax.tree.leaves(learner.state["visual"])):
    np.testing.assert_array_equal(x, np.asarray(y))
  assert not np.array_equal(lm_before, np.asarray(learner.state["lm_head"]["weight"].get_value()))
