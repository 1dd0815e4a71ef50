"""Multi-process training: 2 `jax.distributed` processes on localhost (CPU, gloo collectives) complete a few
train steps and agree with a single process driving the same number of devices."""

import json
import os
import socket
import subprocess
import sys
from typing import NamedTuple

import pytest
from test_train import ROOT, train_data  # noqa: F401  (fixture)


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _cmd(workdir, ckpt, data, *extra):
  return [
    sys.executable, "-m", "deepeyes_jax.train", f"--config={ROOT}/configs/deepeyes_7b.py:size=tiny",
    f"--workdir={workdir}", f"--config.model.checkpoint={ckpt}", f"--config.data.train={data}",
    "--config.total_steps=2", "--config.checkpoint.every_steps=2", "--config.reward.plugins=reward_plugin", *extra,
  ]  # fmt: skip


def _env(devices: int) -> dict:
  flags = f"--xla_force_host_platform_device_count={devices}" if devices > 1 else ""
  return dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=os.path.join(ROOT, "tests"), XLA_FLAGS=flags)


def _run_single(cmd, devices: int) -> subprocess.CompletedProcess:
  p = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT, env=_env(devices))
  assert p.returncode == 0, p.stderr[-3000:]
  return p


def _run_two_processes(cmd, devices_each: int) -> list[tuple[str, str]]:
  """Runs `cmd` as 2 jax.distributed processes of `devices_each` CPU devices; asserts both exit 0. Returns their
  (stdout, stderr)."""
  port = _free_port()
  procs = []
  for pid in range(2):
    env = dict(
      _env(devices_each), JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(pid)
    )
    procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT))
  outs = []
  try:
    for p in procs:
      outs.append(p.communicate(timeout=600))
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  for p, (_, err) in zip(procs, outs):
    assert p.returncode == 0, err[-3000:]
  return outs


def _metrics(workdir) -> list[dict]:
  return [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]


def test_two_processes_match_one_process(tmp_path, tiny_vlm, train_data):  # noqa: F811
  ckpt = tiny_vlm[0]
  _run_single(_cmd(tmp_path / "single", ckpt, train_data), devices=2)
  outs = _run_two_processes(_cmd(tmp_path / "multi", ckpt, train_data), devices_each=1)
  assert "2 process(es), 2 devices" in outs[0][0]
  a, b = _metrics(tmp_path / "single"), _metrics(tmp_path / "multi")
  assert [r["step"] for r in b] == [1, 2]  # only process 0 writes
  assert all(r["train/grad_norm"] > 0 for r in a)  # real updates, not zero advantages
  for ra, rb in zip(a, b):
    for key in ("reward/mean", "length/response", "tool/calls_per_traj", "train/loss", "train/grad_norm"):
      assert rb[key] == pytest.approx(ra[key], rel=1e-5, abs=1e-7), key
  assert "2" in os.listdir(tmp_path / "multi" / "checkpoints")


@pytest.mark.slow  # 128 s on the 2-core machine: two runs of 3 steps, 4 devices each (compilations, mostly)
def test_off_policy_rollouts_on_sampler_devices_of_every_process(tmp_path, tiny_vlm, train_data):  # noqa: F811
  """rl.off_policy_steps=1 with rl.sampler_devices=2 on 2 processes x 2 devices: each process gives the sampler its
  last device and the learner its first; the weights cross between the two device sets (not a plain device_put:
  JAX refuses cross-host reshards between different device sets) and step 3's rollouts run in the rollout thread
  during update 2, one update stale. The metrics are those of one process driving 4 devices the same way (the same
  meshes' shapes: learner fsdp 2, sampler fsdp 2)."""
  ckpt = tiny_vlm[0]
  extra = (
    "--config.rl.off_policy_steps=1", "--config.rl.sampler_devices=2", "--config.rl.old_logprobs=recompute",
    "--config.total_steps=3", "--config.checkpoint.every_steps=10",
  )  # fmt: skip
  single = _run_single(_cmd(tmp_path / "single", ckpt, train_data, *extra), devices=4)
  outs = _run_two_processes(_cmd(tmp_path / "multi", ckpt, train_data, *extra), devices_each=2)
  assert "2 process(es), 4 devices" in outs[0][0]
  assert "sampler on devices of its own: mesh {'data': 1, 'fsdp': 2, 'tensor': 1}" in outs[0][0]
  assert "sampler on devices of its own" in single.stdout
  a, b = _metrics(tmp_path / "single"), _metrics(tmp_path / "multi")
  assert [r["step"] for r in a] == [r["step"] for r in b] == [1, 2, 3]
  # Step 3 was rolled out during update 2 (step 2 follows checkpoint 1, orbax's first, and is on-policy).
  assert b[2]["mismatch/abs_log_ratio_mean"] > 1e-4 and b[1]["mismatch/abs_log_ratio_mean"] < 1e-4
  assert all(r["train/grad_norm"] > 0 for r in a)
  keys = ("reward/mean", "length/response", "tool/calls_per_traj", "train/loss", "train/grad_norm")
  for ra, rb in zip(a, b):
    for key in (*keys, "mismatch/abs_log_ratio_mean"):
      assert rb[key] == pytest.approx(ra[key], rel=1e-5, abs=1e-7), (rb["step"], key)
  assert "3" in os.listdir(tmp_path / "multi" / "checkpoints")


def test_split_devices_gives_the_sampler_the_last_devices_of_every_process():
  from deepeyes_jax.rl.trainer import split_devices

  class Device(NamedTuple):  # what split_devices reads of a jax.Device
    id: int
    process_index: int

  def devices(processes, each):
    return [Device(p * 100 + i, p) for p in range(processes) for i in range(each)]

  def ids(ds):
    return [d.id for d in ds]

  one = devices(1, 8)  # one process: the last k devices, as before
  assert [ids(x) for x in split_devices(one, 3)] == [[0, 1, 2, 3, 4], [5, 6, 7]]
  four = devices(4, 4)
  learner, sampler = split_devices(four, 8)
  assert ids(sampler) == [2, 3, 102, 103, 202, 203, 302, 303]
  assert ids(learner) == [0, 1, 100, 101, 200, 201, 300, 301]
  with pytest.raises(ValueError, match=r"sampler_devices=6: must be a multiple of the number of processes \(4\)"):
    split_devices(four, 6)
  with pytest.raises(ValueError, match=r"sampler_devices=16: must leave the learner a device on every process"):
    split_devices(four, 16)
  with pytest.raises(ValueError, match=r"sampler_devices=8: must leave the learner a device"):
    split_devices(one, 8)
