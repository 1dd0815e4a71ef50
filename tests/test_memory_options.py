"""The options that make the 7B recipe fit a TPU slice change memory, never the numbers: per-layer remat and scanned
layers, the row layout of images, fp32 master weights with bf16 compute, and the sampler's weight layout."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import image_block, random_pixels, tiny_config
from flax import nnx

from deepeyes_jax.models import qwen2_5_vl as qvl
from deepeyes_jax.parallel import sharding as shd
from deepeyes_jax.rl.packing import PackedBatch
from deepeyes_jax.rl.train_step import Learner, LearnerConfig, token_logprobs
from deepeyes_jax.sampling import sampler as sampler_lib

GRIDS = [[(1, 8, 8)], [(1, 4, 6), (1, 2, 4)], []]  # per row: two rows with images, one text-only


def learner_shardings(state, mesh):
  """The parameters' own layout (DEFAULT_RULES, as `from_pretrained` places them): the sampler's "learner" one."""
  return sampler_lib.sampling_shardings(state, mesh, "learner")


def _row_batch(cfg) -> PackedBatch:
  """Three packed rows of 64 tokens in the row layout; row 1 holds two sequences."""
  rows = [
    [[4, 5] + image_block(GRIDS[0][0]) + [6, 7, 8]],
    [[9] + image_block(GRIDS[1][0]) + [10, 11], [12] + image_block(GRIDS[1][1]) + [13, 14]],
    [[20, 21, 22, 23, 24, 25]],
  ]
  length = 64
  tokens, seg = np.zeros((3, length), np.int32), np.zeros((3, length), np.int32)
  pos_ids = np.zeros((3, 3, length), np.int32)
  for r, seqs in enumerate(rows):
    off, g = 0, iter(GRIDS[r])
    for s, ids in enumerate(seqs, start=1):
      ids = np.asarray(ids)
      grids = [next(g)] if (ids == cfg.image_token_id).any() else []  # at most one image per sequence here
      p, _ = qvl.positions_for_tokens(ids, iter(grids), cfg.image_token_id, 2)
      tokens[r, off : off + len(ids)], seg[r, off : off + len(ids)] = ids, s
      pos_ids[:, r, off : off + len(ids)] = p
      off += len(ids)
  pvs = [[random_pixels([g], seed=10 * r + k) for k, g in enumerate(grids)] for r, grids in enumerate(GRIDS)]
  n = 256
  mask = (seg > 0).astype(np.float32)
  mask[:, :3] = 0
  return PackedBatch(
    tokens=tokens,
    segment_ids=seg,
    positions=np.broadcast_to(np.arange(length, dtype=np.int32), (3, length)).copy(),
    position_ids=pos_ids,
    loss_mask=mask,
    old_logprobs=np.full((3, length), -2.0, np.float32),
    sampler_logprobs=np.full((3, length), -2.0, np.float32),
    advantages=np.where(mask > 0, np.array([[1.0], [-0.5], [0.7]], np.float32), 0.0).astype(np.float32),
    pixel_values=qvl.row_patches(pvs, n, cfg.vision.patch_dim),
    plan=qvl.make_row_plans(GRIDS, cfg.vision, pad_to=n),
  )


def test_row_layout_image_features_equal_the_concatenated_layout():
  cfg = tiny_config()
  model = qvl.init_random(cfg, seed=1)
  rows = [g for g in GRIDS if g]
  pvs = [[random_pixels([g], seed=7 * r + k) for k, g in enumerate(grids)] for r, grids in enumerate(rows)]
  flat_pv = np.concatenate([p for row in pvs for p in row])
  flat = np.asarray(model.image_features(jnp.asarray(flat_pv), qvl.make_vision_plan(sum(rows, []), cfg.vision)))
  plan = qvl.make_row_plans(rows, cfg.vision, pad_to=128)
  per_row = np.asarray(model.image_features(jnp.asarray(qvl.row_patches(pvs, 128, cfg.vision.patch_dim)), plan))
  assert per_row.shape == (2, 32, cfg.vision.out_hidden_size)
  n0 = sum(int(np.prod(g)) for g in rows[0]) // 4
  np.testing.assert_allclose(per_row[0, :n0], flat[:n0], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(per_row[1, : len(flat) - n0], flat[n0:], rtol=1e-5, atol=1e-5)


def _loss_and_grads(model, batch):
  graphdef, state = nnx.split(model)

  def loss(state):
    lp, _ = token_logprobs(nnx.merge(graphdef, state), batch, chunk=16)
    return jnp.sum(lp * batch.loss_mask), lp

  (_, lp), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(state)
  return np.asarray(lp), grads


@pytest.mark.parametrize("remat,scan", [("full", False), ("full", True), ("dots", True), ("none", True)])
def test_remat_and_scanned_layers_give_the_same_logprobs_and_gradients(remat, scan):
  cfg = tiny_config()
  batch = jax.tree.map(jnp.asarray, _row_batch(cfg))
  lp_ref, g_ref = _loss_and_grads(qvl.init_random(cfg, seed=2), batch)
  lp, g = _loss_and_grads(qvl.init_random(cfg, seed=2).set_remat(remat, scan), batch)
  assert np.abs(lp_ref).sum() > 0
  np.testing.assert_allclose(lp, lp_ref, rtol=1e-5, atol=1e-5)
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(g_ref), jax.tree.leaves(g)):
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=2e-4, atol=1e-6, err_msg=str(path))


def test_remat_policy_is_validated():
  with pytest.raises(ValueError, match="remat policy 'some'"):
    qvl.init_random(tiny_config()).set_remat("some")


def _changed_fraction(param_dtype) -> tuple[float, float]:
  """(fraction of weights changed, max |change|) after one AdamW step at the recipe's lr 1e-6, bf16 compute."""
  cfg = tiny_config()
  model = qvl.init_random(cfg, dtype=jnp.bfloat16, param_dtype=param_dtype, seed=3)
  learner = Learner(model, LearnerConfig(learning_rate=1e-6, weight_decay=0.0))
  before = [np.asarray(x, np.float32) for x in jax.tree.leaves(learner.state)]
  m = learner.update([_row_batch(cfg)])
  assert m["skipped"] == 0 and m["grad_norm"] > 0
  after = [np.asarray(x, np.float32) for x in jax.tree.leaves(learner.state)]
  changed = sum(int((a != b).sum()) for a, b in zip(after, before))
  total = sum(a.size for a in after)
  return changed / total, max(float(np.abs(a - b).max()) for a, b in zip(after, before))


def test_fp32_master_weights_apply_the_recipes_small_updates():
  # bf16 weights of magnitude ~0.02 are spaced ~1e-4 apart: a 1e-6 Adam step rounds back to the same value.
  bf16_fraction, _ = _changed_fraction(jnp.bfloat16)
  fp32_fraction, fp32_max = _changed_fraction(jnp.float32)
  assert bf16_fraction < 0.1, bf16_fraction
  assert fp32_fraction > 0.9, fp32_fraction
  assert fp32_max == pytest.approx(1e-6, rel=0.05)  # Adam's first step: lr x sign(gradient)


def test_fp32_master_weights_compute_as_the_bf16_model():
  cfg = tiny_config()
  batch = jax.tree.map(jnp.asarray, _row_batch(cfg))
  bf16 = qvl.init_random(cfg, dtype=jnp.bfloat16, seed=4)
  mixed = qvl.init_random(cfg, dtype=jnp.bfloat16, param_dtype=jnp.float32, seed=4)
  # Same weights: the bf16 model's values stored in fp32.
  nnx.update(mixed, jax.tree.map(lambda x: x.astype(jnp.float32), nnx.state(bf16)))
  a = np.asarray(token_logprobs(bf16, batch)[0])
  b = np.asarray(token_logprobs(mixed, batch)[0])
  assert {x.dtype for x in jax.tree.leaves(nnx.state(mixed, nnx.Param))} == {jnp.dtype(jnp.float32)}
  np.testing.assert_array_equal(a, b)


def test_sampler_lays_weights_out_tensor_parallel_in_the_compute_dtype():
  cfg = tiny_config()
  mesh = shd.make_mesh(2, 2, 2)
  model = qvl.init_random(cfg, dtype=jnp.bfloat16, param_dtype=jnp.float32, seed=5)
  state = nnx.state(model)
  placed = jax.device_put(state, learner_shardings(state, mesh))
  out = sampler_lib.sampling_layout(placed, jnp.bfloat16, mesh)
  specs = set()
  for x in jax.tree.leaves(out):
    assert x.dtype == jnp.bfloat16
    specs.add(x.sharding.spec)
    assert "fsdp" not in jax.tree.leaves(tuple(x.sharding.spec)), x.sharding.spec
  assert any("tensor" in jax.tree.leaves(tuple(s)) for s in specs)
  for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(placed)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b.astype(jnp.bfloat16)))
  # Nothing to change: the same arrays, no copy.
  bf16 = nnx.state(qvl.init_random(cfg, dtype=jnp.bfloat16, seed=5))
  assert sampler_lib.sampling_layout(bf16, jnp.bfloat16, None) is bf16
  with pytest.raises(ValueError, match="weight_layout"):
    sampler_lib.sampling_layout(bf16, jnp.bfloat16, None, "replicated")


def test_sampler_weight_layouts_sample_the_same_tokens():
  cfg = tiny_config()
  mesh = shd.make_mesh(2, 2, 2)
  prompts = [[4, 5] + image_block((1, 8, 8)) + [6], [7, 8, 9], [10] + image_block((1, 4, 6)), [11, 12]]
  pv = [random_pixels([(1, 8, 8)], 1), None, random_pixels([(1, 4, 6)], 2), None]
  grids = [(1, 8, 8), None, (1, 4, 6), None]
  chunks = [sampler_lib.Chunk(p, [(v, np.asarray(g))] if g else []) for p, v, g in zip(prompts, pv, grids)]
  outs = []
  for layout in ("tensor_parallel", "learner"):
    model = qvl.init_random(cfg, seed=6)
    state = nnx.state(model)
    nnx.update(model, jax.device_put(state, learner_shardings(state, mesh)))
    s = sampler_lib.Sampler(model, mesh=mesh, weight_layout=layout)
    cache = s.init_cache(4, 128)
    cache, logits = s.extend(cache, chunks)
    _, res = s.decode(cache, logits, max_new_tokens=8, params=sampler_lib.rules.GREEDY)
    outs.append((res.tokens, np.concatenate(res.logprobs)))
  assert outs[0][0] == outs[1][0]
  np.testing.assert_allclose(outs[0][1], outs[1][1], rtol=1e-5, atol=1e-5)


def test_sampler_weight_push_compiles_once_and_release_frees_the_copy():
  cfg = tiny_config()
  mesh = shd.make_mesh(2, 2, 2)
  model = qvl.init_random(cfg, dtype=jnp.bfloat16, param_dtype=jnp.float32, seed=7)
  state = nnx.state(model)
  nnx.update(model, jax.device_put(state, learner_shardings(state, mesh)))
  s = sampler_lib.Sampler(model, mesh=mesh, weight_layout="tensor_parallel")
  pushes = len(sampler_lib._CAST_FNS)
  for _ in range(3):  # one jitted cast per layout, reused by every push (a new jit per push recompiled each step)
    s.state = nnx.state(model)
  assert len(sampler_lib._CAST_FNS) == pushes
  s.release()
  with pytest.raises(RuntimeError, match="released"):
    s.extend(s.init_cache(1, 32), [sampler_lib.Chunk([4, 5, 6])])
  s.state = nnx.state(model)
  _, logits = s.extend(s.init_cache(1, 32), [sampler_lib.Chunk([4, 5, 6])])
  assert np.isfinite(np.asarray(logits)).all()
  # The Sampler's own default keeps the model's arrays: no copy (evaluation, inference).
  plain = sampler_lib.Sampler(qvl.init_random(cfg, seed=7))
  assert plain.weight_layout == "learner"


def test_micro_batches_fill_every_row_parallel_group():
  from deepeyes_jax.rl.packing import micro_batch_num_rows, rows_per_micro_batch

  mesh = shd.make_mesh(1, 8, 1)
  assert rows_per_micro_batch(8, None) == 8
  assert rows_per_micro_batch(3, mesh) == 8  # real rows for every fsdp group, not 3 real + 5 padding
  assert micro_batch_num_rows(1, rows_per_micro_batch(3, mesh), mesh) == 8  # a last, short micro-batch still shards
