"""The GRPO trainer end to end on the tiny CPU variant: parquet -> rollouts -> rewards -> update -> metrics ->
checkpoint; and a run killed with SIGKILL mid-step resumes to the same metrics as an uninterrupted run."""

import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from deepeyes_jax.agent import prompts
from deepeyes_jax.data.deepeyes import write_deepeyes_parquet

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(ckpt, data, **overrides):
  spec = importlib.util.spec_from_file_location("deepeyes_7b", os.path.join(ROOT, "configs", "deepeyes_7b.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  c = mod.get_config("size=tiny")
  c.model.checkpoint = str(ckpt)
  c.data.train = str(data)
  c.reward.plugins = "reward_plugin"
  for k, v in overrides.items():
    node = c
    *path, leaf = k.split(".")
    for p in path:
      node = node[p]
    node[leaf] = v
  return c


def _records(n=4, seed=0):
  rng = np.random.default_rng(seed)
  out = []
  for i in range(n):
    img = Image.fromarray(rng.integers(0, 255, (160 + 8 * i, 200, 3), dtype=np.uint8))
    q = f"What is the color of object {i}?"
    out.append(
      {
        "data_source": "test_text_hash",  # tests/reward_plugin.py: a reward that varies (see there)
        "prompt": [
          {"role": "system", "content": prompts.SYSTEM_PROMPT},
          {"role": "user", "content": "<image>\n" + q + prompts.USER_SUFFIX},
        ],
        "images": [img],
        "reward_model": {"ground_truth": "A", "style": "model"},
        "extra_info": {"question": q, "answer": "A", "index": i},
        "ability": "perception",
        "env_name": "visual_toolbox_v2",
      }
    )
  return out


@pytest.fixture(scope="module")
def train_data(tmp_path_factory):
  path = tmp_path_factory.mktemp("data") / "train.parquet"
  write_deepeyes_parquet(path, _records())
  return path


def test_tiny_variant_end_to_end(tmp_path, tiny_vlm, train_data):
  from deepeyes_jax.rl.trainer import train

  workdir = tmp_path / "run"
  # Beyond the default (one step on sampler log-probs): 2 epochs x 2 mini-batches on recomputed old log-probs.
  cfg = _config(
    tiny_vlm[0], train_data, **{"rl.ppo_epochs": 2, "rl.num_minibatches": 2, "rl.old_logprobs": "recompute"}
  )
  metrics = train(cfg, str(workdir))
  for key in (
    "reward/mean",
    "accuracy",
    "tool/calls_per_traj",
    "tool/success_rate",
    "turns/mean",
    "length/response",
    "train/loss",
    "train/grad_norm",
    "train/clip_frac",
    "train/entropy",
    "train/learning_rate",
    "time/rollout_s",
    "time/update_s",
    "throughput/rollout_tokens_per_s",
    "mfu",
  ):
    assert key in metrics, key
  assert np.isfinite(metrics["train/loss"]) and metrics["train/grad_norm"] > 0 and metrics["reward/std"] > 0
  # The rollout engine's costs: slots partly idle, the pool grown on demand, nothing restarted or failed.
  assert 0 < metrics["engine/slot_utilisation"] <= 1 and metrics["engine/prefill_tokens"] > 0
  assert 0 < metrics["engine/kv_peak_used_gib"] <= metrics["engine/kv_allocated_gib"]
  assert metrics["engine/restarts"] == metrics["engine/pool_failures"] == 0 and metrics["engine/segments"] >= 1
  rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in rows] == [1, 2]
  assert any(f.startswith("events.out.tfevents") for f in os.listdir(workdir / "tensorboard"))
  assert sorted(os.listdir(workdir / "checkpoints"))[-1] == "2"
  assert (workdir / "rollouts" / "step_000001.jsonl").exists()
  # what `python -m deepeyes_jax.export` reads to find the base checkpoint (tests/test_export.py)
  assert json.loads((workdir / "train_config.json").read_text())["model"]["checkpoint"] == str(tiny_vlm[0])


def _run(workdir, ckpt, data, steps, kill=None):
  launcher = [os.path.join(ROOT, "tests", "kill_hooks.py"), kill] if kill else ["-m"]  # kill: SIGKILL it there
  cmd = [
    sys.executable, *launcher, "deepeyes_jax.train", f"--config={ROOT}/configs/deepeyes_7b.py:size=tiny",
    f"--workdir={workdir}", f"--config.model.checkpoint={ckpt}", f"--config.data.train={data}",
    f"--config.total_steps={steps}", "--config.reward.plugins=reward_plugin",
  ]  # fmt: skip
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="", PYTHONPATH=os.path.join(ROOT, "tests"))
  return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, cwd=ROOT)


def test_sigkill_mid_step_then_resume_matches_uninterrupted(tmp_path, tiny_vlm, train_data):
  ckpt = tiny_vlm[0]
  full = _run(tmp_path / "full", ckpt, train_data, 3)
  assert full.returncode == 0, full.stderr[-3000:]
  killed = _run(tmp_path / "killed", ckpt, train_data, 3, kill="rollouts=3")  # after step 3's rollouts
  assert killed.returncode == -9, killed.stderr[-3000:]
  resumed = _run(tmp_path / "killed", ckpt, train_data, 3)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert "resuming from step 2" in resumed.stderr
  a = [json.loads(x) for x in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
  b = [json.loads(x) for x in (tmp_path / "killed" / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in b] == [1, 2, 3]  # step 3 was killed before logging, then redone
  assert a[1]["train/grad_norm"] > 0 and a[2]["train/grad_norm"] > 0  # real updates happened before the kill
  for key in ("reward/mean", "train/loss", "train/grad_norm", "length/response", "tool/calls_per_traj"):
    assert b[2][key] == pytest.approx(a[2][key], rel=1e-6, abs=1e-9), key


def test_metrics_jsonl_on_resume_keeps_one_row_per_step(tmp_path):
  """A run killed while the checkpoint of its last logged step was still being written resumes from an earlier
  step: the rows it will redo move to metrics.jsonl.discarded (kept, not deleted), the rest stay as they were."""
  from deepeyes_jax.rl.metrics import JsonlWriter

  path = tmp_path / "metrics.jsonl"
  w = JsonlWriter(str(path))
  for s in (1, 2, 3):
    w.write_scalars(s, {"loss": float(s)})
  w.close()
  with open(path, "a") as f:
    f.write('{"step": 4, "lo')  # a line cut short by the kill
  w = JsonlWriter(str(path), resume_step=1)
  w.write_scalars(2, {"loss": 20.0})
  w.close()
  rows = [json.loads(x) for x in path.read_text().splitlines()]
  assert [(r["step"], r["loss"]) for r in rows] == [(1, 1.0), (2, 20.0)]
  discarded = (tmp_path / "metrics.jsonl.discarded").read_text().splitlines()
  assert [json.loads(x)["step"] for x in discarded[:2]] == [2, 3] and discarded[2] == '{"step": 4, "lo'
  JsonlWriter(str(path), resume_step=5).close()  # nothing after step 5: the file is untouched
  assert [json.loads(x)["step"] for x in path.read_text().splitlines()] == [1, 2]


DAMAGE = ["state/_METADATA", "meta/metadata", "data/process_0-of-1.json", "state/manifest.ocdbt"]


@pytest.mark.parametrize("damage", DAMAGE)
def test_resume_skips_a_checkpoint_that_does_not_restore(tmp_path, caplog, damage):
  """An emptied file in the newest checkpoint (a full disk, a copy cut short): resume falls back to the one before,
  says which it skipped and why, and moves the bad one aside (kept), so that the run can save that step again; when
  none restores, the error lists each one."""
  import grain
  import jax.numpy as jnp

  from deepeyes_jax.rl.checkpoint import Checkpointer

  it = iter(grain.MapDataset.range(10).to_iter_dataset())
  ckpt = Checkpointer(str(tmp_path / "ckpt"), async_save=False)
  for step in (1, 2):
    next(it)
    ckpt.save(step, {"w": jnp.full((4,), float(step))}, {"m": jnp.zeros(4)}, learner_step=step, data_iterator=it)
  ckpt.close()
  (tmp_path / "ckpt" / "2" / damage).write_text("")
  like = ({"w": jnp.zeros(4)}, {"m": jnp.ones(4)})
  fresh = iter(grain.MapDataset.range(10).to_iter_dataset())
  ckpt = Checkpointer(str(tmp_path / "ckpt"), async_save=False)
  with caplog.at_level("WARNING"):
    step, params, opt_state, meta = ckpt.restore_latest(*like, lambda s: fresh)
  assert (step, meta["learner_step"]) == (1, 1) and float(params["w"][0]) == 1.0
  assert next(fresh) == 1  # the data iterator continues after step 1's element
  assert "cannot restore the checkpoint of step 2" in caplog.text and "2.unrestorable" in caplog.text
  assert (tmp_path / "ckpt" / "2.unrestorable" / damage).exists()  # kept for inspection
  # The run goes on from step 1: step 2 is saved again (forced, as a last step is), and restores.
  assert ckpt.save(2, {"w": jnp.full((4,), 5.0)}, {"m": jnp.zeros(4)}, learner_step=2, data_iterator=fresh, force=True)
  assert ckpt.restore_latest(*like, lambda s: fresh)[0] == 2
  for step in (1, 2):
    (tmp_path / "ckpt" / str(step) / damage).write_text("")
  with pytest.raises(RuntimeError, match="no checkpoint restores") as err:
    ckpt.restore_latest(*like, lambda s: fresh)
  assert "2.unrestorable.1" in str(err.value) and "1.unrestorable" in str(err.value)
  assert Checkpointer(str(tmp_path / "empty")).restore_latest(*like, lambda s: fresh) is None


# --------------------------------------------------------------------------------------------------------------
# RL algorithms of 2025-26 (docs/training.md, "RL algorithms"): each runs end to end and reports its metrics
# --------------------------------------------------------------------------------------------------------------
MISMATCH_KEYS = ("mismatch/abs_log_ratio_mean", "mismatch/abs_log_ratio_max", "mismatch/kl_k3")


@pytest.mark.parametrize(
  "algo, overrides, keys",
  [
    ("gspo", {}, ("train/clip_frac", *MISMATCH_KEYS)),
    ("grpo_tis", {}, ("train/correction/weight_mean", "train/correction/truncated_frac")),
    (
      "dapo",
      {},
      ("sampling/rounds", "sampling/groups_with_signal", "sampling/batch_filled", "reward/overlong_penalty"),
    ),
  ],
)
def test_algorithms_end_to_end(tmp_path, tiny_vlm, train_data, algo, overrides, keys):
  from deepeyes_jax.rl.trainer import train

  cfg = _config(tiny_vlm[0], train_data, **overrides)
  spec = importlib.util.spec_from_file_location("deepeyes_7b", os.path.join(ROOT, "configs", "deepeyes_7b.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  mod.set_algorithm(cfg, algo)
  metrics = train(cfg, str(tmp_path / "run"))
  for key in (*keys, "tool/calls_ema", "tool/collapse", "mismatch/out_of_band_frac"):
    assert key in metrics, key
  assert np.isfinite(metrics["train/loss"])
  # fp32 sampler and learner on the same weights: the mismatch is rounding only
  assert metrics["mismatch/abs_log_ratio_max"] < 1e-3
  if algo == "dapo":
    assert 1 <= metrics["sampling/rounds"] <= 3
    assert metrics["sampling/groups_with_signal"] <= metrics["sampling/groups_drawn"]


def test_over_turn_masking_leaves_rows_cut_by_the_limits_out_of_the_loss(tmp_path, tiny_vlm, train_data):
  from deepeyes_jax.rl.shaping import OVER_LIMIT_STOPS
  from deepeyes_jax.rl.trainer import train

  # One turn may fill the whole context: the random tiny model runs into max_total_tokens (max_sequence).
  overrides = {"rl.over_turn_masking": True, "total_steps": 1, "rollout.max_tokens_per_turn": 1024}
  cfg = _config(tiny_vlm[0], train_data, **overrides, **{"rollout.max_total_tokens": 1024})
  metrics = train(cfg, str(tmp_path / "run"))
  cut = sum(metrics.get(f"stop/{s}", 0.0) for s in OVER_LIMIT_STOPS)
  assert cut > 0
  assert metrics["sampling/over_turn_masked"] == pytest.approx(cut)
  assert metrics["kept_fraction"] == pytest.approx(1.0 - cut)


def test_off_policy_rollouts_are_one_step_stale_and_resume_exactly(tmp_path, tiny_vlm, train_data):
  """rl.off_policy_steps=1: step n+1's rollouts run during step n's update with the weights before it (measured by
  the mismatch metrics: stale rollouts differ from the learner's old policy, on-policy ones only by rounding); the
  step after a planned checkpoint is on-policy, so a run killed after it resumes to the uninterrupted metrics."""
  ckpt = tiny_vlm[0]
  extra = ["--config.rl.off_policy_steps=1", "--config.checkpoint.every_steps=2", "--config.rl.old_logprobs=recompute"]

  def run(workdir, kill=None):
    launcher = [os.path.join(ROOT, "tests", "kill_hooks.py"), kill] if kill else ["-m"]
    cmd = [
      sys.executable, *launcher, "deepeyes_jax.train", f"--config={ROOT}/configs/deepeyes_7b.py:size=tiny",
      f"--workdir={workdir}", f"--config.model.checkpoint={ckpt}", f"--config.data.train={train_data}",
      "--config.total_steps=4", "--config.reward.plugins=reward_plugin", *extra,
    ]  # fmt: skip
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="", PYTHONPATH=os.path.join(ROOT, "tests"))
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, cwd=ROOT)

  full = run(tmp_path / "full")
  assert full.returncode == 0, full.stderr[-3000:]
  a = [json.loads(x) for x in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in a] == [1, 2, 3, 4]
  # Step index 3 (logged as step 4) was rolled out during step 3's update, one update stale; step index 2 (logged
  # as 3) follows checkpoint 2 and is on-policy.
  stale, fresh = a[3]["mismatch/abs_log_ratio_mean"], a[2]["mismatch/abs_log_ratio_mean"]
  assert fresh < 1e-4 and stale > 100 * max(fresh, 1e-7), (fresh, stale)
  # Killed after the 4th rollout call (step index 3's, made during step 2's update): resumes from checkpoint 2.
  killed = run(tmp_path / "killed", kill="rollouts=4")
  assert killed.returncode == -9, killed.stderr[-3000:]
  resumed = run(tmp_path / "killed")
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert "resuming from step 2" in resumed.stderr
  b = [json.loads(x) for x in (tmp_path / "killed" / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in b] == [1, 2, 3, 4]
  for row_a, row_b in zip(a[2:], b[2:]):
    for key in ("reward/mean", "train/loss", "train/grad_norm", "mismatch/abs_log_ratio_mean"):
      assert row_b[key] == pytest.approx(row_a[key], rel=1e-6, abs=1e-9), key


def test_off_policy_sampler_on_devices_of_its_own(tmp_path, tiny_vlm, train_data, capsys):
  """rl.sampler_devices=4 of the 8 simulated devices: the learner's mesh holds the other 4, the weights are pushed
  across (a resharding transfer) each step, and the rollouts of step 3 (during update 2) are one update stale (step
  2 follows checkpoint 1, orbax's first, and is on-policy)."""
  import jax

  from deepeyes_jax.rl.trainer import _meshes, train

  cfg = _config(
    tiny_vlm[0],
    train_data,
    **{"rl.off_policy_steps": 1, "rl.sampler_devices": 4, "rl.old_logprobs": "recompute", "total_steps": 3},
  )
  cfg.checkpoint.every_steps = 10
  learner_mesh, sampler_mesh = _meshes(cfg)
  assert set(learner_mesh.devices.flat).isdisjoint(sampler_mesh.devices.flat)
  assert len(learner_mesh.devices.flat) + len(sampler_mesh.devices.flat) == jax.device_count()
  metrics = train(cfg, str(tmp_path / "run"))
  assert "sampler on devices of its own" in capsys.readouterr().out
  assert np.isfinite(metrics["train/loss"]) and metrics["train/grad_norm"] > 0
  assert metrics["mismatch/abs_log_ratio_mean"] > 1e-4  # stale by one update


def test_unshaped_rewards_reach_the_advantages_unrounded():
  """Without shaping the advantages see the rewards themselves: float64, not float32-rounded (0.8 + 0.2 + 1.2 in
  float32 moves every GRPO advantage by ~1e-7, enough to change where the embedded default's run ends)."""
  import types

  from deepeyes_jax.rl.trainer import shaped_totals

  rewards = [types.SimpleNamespace(total=0.8 + 0.2 + 1.2), types.SimpleNamespace(total=0.2)]
  config = _config("unused", "unused")
  totals = shaped_totals([], rewards, config)
  assert totals.dtype == np.float64 and totals.tolist() == [0.8 + 0.2 + 1.2, 0.2]
  config.rl.overlong_buffer = 100
  traj = types.SimpleNamespace(response_length=1536 - 20 - 50, prompt_length=20)  # half-way into the buffer
  shaped = shaped_totals([traj, traj], rewards, config)
  assert shaped.tolist() == pytest.approx([2.2 - 0.5, 0.2 - 0.5])
