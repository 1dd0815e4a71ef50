"""Multi-process training: 2 `jax.distributed` processes on localhost (CPU, gloo collectives) complete a few
train steps and agree with a single process driving the same number of devices."""

import json
import os
import socket
import subprocess
import sys

import pytest
from test_train import ROOT, train_data  # noqa: F401  (fixture)


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _cmd(workdir, ckpt, data):
  return [
    sys.executable, "-m", "deepeyes_jax.train", f"--config={ROOT}/configs/deepeyes_7b.py:size=tiny",
    f"--workdir={workdir}", f"--config.model.checkpoint={ckpt}", f"--config.data.train={data}",
    "--config.total_steps=2", "--config.checkpoint.every_steps=2", "--config.reward.plugins=reward_plugin",
  ]  # fmt: skip


def test_two_processes_match_one_process(tmp_path, tiny_vlm, train_data):  # noqa: F811
  ckpt = tiny_vlm[0]
  base = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=os.path.join(ROOT, "tests"))
  single = subprocess.run(
    _cmd(tmp_path / "single", ckpt, train_data), capture_output=True, text=True, timeout=600, cwd=ROOT,
    env=dict(base, XLA_FLAGS="--xla_force_host_platform_device_count=2"),
  )  # fmt: skip
  assert single.returncode == 0, single.stderr[-3000:]

  port = _free_port()
  procs = []
  for pid in range(2):
    env = dict(
      base, XLA_FLAGS="", JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(pid)
    )
    procs.append(
      subprocess.Popen(
        _cmd(tmp_path / "multi", ckpt, train_data),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=ROOT,
      )
    )
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
  assert "2 process(es), 2 devices" in outs[0][0]
  a = [json.loads(x) for x in (tmp_path / "single" / "metrics.jsonl").read_text().splitlines()]
  b = [json.loads(x) for x in (tmp_path / "multi" / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in b] == [1, 2]  # only process 0 writes
  assert all(r["train/grad_norm"] > 0 for r in a)  # real updates, not zero advantages
  for ra, rb in zip(a, b):
    for key in ("reward/mean", "length/response", "tool/calls_per_traj", "train/loss", "train/grad_norm"):
      assert rb[key] == pytest.approx(ra[key], rel=1e-5, abs=1e-7), key
  assert "2" in os.listdir(tmp_path / "multi" / "checkpoints")
