"""Preemption: SIGTERM (the notice spot / preemptible TPUs get) makes the run checkpoint at the next step all
processes agree on and exit cleanly; re-running the same command resumes from that checkpoint."""

import json
import os
import signal
import subprocess
import sys
import threading

import pytest
from test_multiprocess import _free_port
from test_train import ROOT, train_data  # noqa: F401  (fixture)


def _cmd(workdir, ckpt, data):
  return [
    sys.executable, "-m", "deepeyes_jax.train", f"--config={ROOT}/configs/deepeyes_7b.py:size=tiny",
    f"--workdir={workdir}", f"--config.model.checkpoint={ckpt}", f"--config.data.train={data}",
    "--config.total_steps=4", "--config.checkpoint.every_steps=100", "--config.reward.plugins=reward_plugin",
  ]  # fmt: skip


def _sigterm_after_step_1(cmd, env) -> tuple[str, list[int]]:
  """Runs the train command and sends SIGTERM when step 1's progress line appears; asserts a clean exit. Returns
  the output and the steps of its 'preempted: saved step N' lines."""
  p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
  timer = threading.Timer(600, p.kill)  # bounded: never hang the test suite
  timer.start()
  lines = []
  try:
    for line in p.stdout:
      lines.append(line)
      if line.startswith("step 1/4"):
        p.send_signal(signal.SIGTERM)
    err = p.stderr.read()
    p.wait()
  finally:
    timer.cancel()
  assert p.returncode == 0, err[-3000:]
  saved = [int(x.split("saved step ")[1].split(",")[0]) for x in lines if x.startswith("preempted: saved step")]
  return "".join(lines), saved


def test_sigterm_checkpoints_at_the_sync_point_and_the_rerun_resumes(tmp_path, tiny_vlm, train_data):  # noqa: F811
  env = dict(
    os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="", PYTHONPATH=os.path.join(ROOT, "tests"),
    # a one-process jax.distributed job: the preemption sync manager only exists under jax.distributed
    JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{_free_port()}", JAX_NUM_PROCESSES="1", JAX_PROCESS_ID="0",
  )  # fmt: skip
  workdir = tmp_path / "run"
  out, saved = _sigterm_after_step_1(_cmd(workdir, tiny_vlm[0], train_data), env)
  assert len(saved) == 1 and 2 <= saved[0] <= 3, out
  # every_steps=100: besides orbax's initial save of step 1, only the preemption save exists
  assert max(int(d) for d in os.listdir(workdir / "checkpoints") if d.isdigit()) == saved[0]

  again = subprocess.run(
    _cmd(workdir, tiny_vlm[0], train_data), capture_output=True, text=True, env=env, cwd=ROOT, timeout=600
  )
  assert again.returncode == 0, again.stderr[-3000:]
  assert f"resuming from step {saved[0]}" in again.stderr
  steps = [json.loads(x)["step"] for x in (workdir / "metrics.jsonl").read_text().splitlines()]
  assert steps == [1, 2, 3, 4]


def test_kill_of_a_single_process_run_saves_the_step_in_flight(tmp_path, tiny_vlm, train_data):  # noqa: F811
  """`kill PID` (SIGTERM) of a plain single-process run: the step in flight finishes, is checkpointed, the run
  exits 0; re-running the command resumes there, so at most the step in flight is redone."""
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="", PYTHONPATH=os.path.join(ROOT, "tests"))
  workdir = tmp_path / "run"
  out, saved = _sigterm_after_step_1(_cmd(workdir, tiny_vlm[0], train_data), env)
  assert "SIGTERM: finishing the step in flight" in out
  # The signal comes right after step 1's progress line: during step 1's save or step 2; that step is finished and
  # saved (every_steps=100: no other checkpoint but the last step would exist).
  assert len(saved) == 1 and saved[0] in (1, 2), out
  again = subprocess.run(
    _cmd(workdir, tiny_vlm[0], train_data), capture_output=True, text=True, env=env, cwd=ROOT, timeout=600
  )
  assert again.returncode == 0, again.stderr[-3000:]
  assert f"resuming from step {saved[0]}" in again.stderr
  steps = [json.loads(x)["step"] for x in (workdir / "metrics.jsonl").read_text().splitlines()]
  assert steps == [1, 2, 3, 4]


def test_stop_signals_handlers():
  """First SIGINT: a request (the loop finishes its step); a second one interrupts at once; handlers restored."""
  from deepeyes_jax.rl.trainer import StopSignals

  before = signal.getsignal(signal.SIGINT)
  with StopSignals() as stop:
    os.kill(os.getpid(), signal.SIGINT)
    assert stop.requested == "SIGINT"
    try:
      os.kill(os.getpid(), signal.SIGINT)
      raised = False
    except KeyboardInterrupt:
      raised = True
    assert raised
  assert signal.getsignal(signal.SIGINT) is before


def test_sigterm_of_an_off_policy_run_drops_the_prefetched_rollouts_and_keeps_the_prompts(
  tmp_path,
  tiny_vlm,
  train_data,  # noqa: F811
):
  """rl.off_policy_steps=1: a SIGTERM during step 2's update, while step 3's rollouts run in the background: they
  are cancelled (at their next decode segment) and dropped, step 2 is checkpointed with the data iterator from
  before them, and the resumed run rolls out the same prompts at every step as an uninterrupted run (step 3
  on-policy, docs/training.md)."""
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="", PYTHONPATH=os.path.join(ROOT, "tests"))
  extra = ["--config.rl.off_policy_steps=1", "--config.log.save_trajectories_every=1"]

  def run(workdir, hook=None):
    cmd = _cmd(workdir, tiny_vlm[0], train_data) + extra
    if hook:  # python tests/kill_hooks.py HOOK deepeyes_jax.train ... instead of python -m deepeyes_jax.train ...
      cmd[1:3] = [os.path.join(ROOT, "tests", "kill_hooks.py"), hook, "deepeyes_jax.train"]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)

  full = run(tmp_path / "full")
  assert full.returncode == 0, full.stderr[-3000:]
  workdir = tmp_path / "run"
  stopped = run(workdir, hook="term_in_update=2")
  assert stopped.returncode == 0, stopped.stderr[-3000:]
  assert "preempted: saved step 2" in stopped.stdout, stopped.stdout[-3000:]
  assert "the prefetched rollouts of step 3 were cancelled" in stopped.stderr
  again = run(workdir)
  assert again.returncode == 0, again.stderr[-3000:]
  assert "resuming from step 2" in again.stderr

  def prompts(run_dir):
    return [
      [json.loads(x)["task_id"] for x in (run_dir / "rollouts" / f"step_{s:06d}.jsonl").read_text().splitlines()]
      for s in (1, 2, 3, 4)
    ]

  assert prompts(workdir) == prompts(tmp_path / "full")


def test_off_policy_rollouts_on_shared_devices_are_refused_under_jax_distributed(tmp_path, tiny_vlm, train_data):  # noqa: F811
  """Under jax.distributed, one-step-off-policy rollouts need devices of their own (rl.sampler_devices): two threads
  dispatching programs onto the same devices would order them differently on each process. The run says so, names
  the fields and the fix, before anything loads."""
  env = dict(
    os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="", PYTHONPATH=os.path.join(ROOT, "tests"),
    JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{_free_port()}", JAX_NUM_PROCESSES="1", JAX_PROCESS_ID="0",
  )  # fmt: skip
  cmd = _cmd(tmp_path / "run", tiny_vlm[0], train_data) + ["--config.rl.off_policy_steps=1"]
  p = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
  assert p.returncode != 0
  assert "config.rl.off_policy_steps=1 with config.rl.sampler_devices=0: under jax.distributed" in p.stderr
  assert "set config.rl.sampler_devices to a multiple of the process count (1)" in p.stderr
  assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.slow  # ~100 s on the 2-core machine: three runs
def test_preemption_of_an_off_policy_run_under_jax_distributed(tmp_path, tiny_vlm, train_data):  # noqa: F811
  """rl.off_policy_steps=1 under jax.distributed, the sampler on a device of its own: SIGTERM starts orbax's
  preemption sync; the run stops at the sync point (a step the prefetch did not run past: it asks orbax first), exits
  0, and the resumed run rolls out the same prompts at every step as an uninterrupted run."""

  def env():
    return dict(
      os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=2",
      PYTHONPATH=os.path.join(ROOT, "tests"),
      JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{_free_port()}", JAX_NUM_PROCESSES="1", JAX_PROCESS_ID="0",
    )  # fmt: skip

  extra = ["--config.rl.off_policy_steps=1", "--config.rl.sampler_devices=1", "--config.log.save_trajectories_every=1"]

  def cmd(workdir):
    return _cmd(workdir, tiny_vlm[0], train_data) + extra

  workdir = tmp_path / "run"
  out, saved = _sigterm_after_step_1(cmd(workdir), env())
  assert "sampler on devices of its own" in out
  assert len(saved) == 1 and 2 <= saved[0] <= 3, out
  again = subprocess.run(cmd(workdir), capture_output=True, text=True, env=env(), cwd=ROOT, timeout=600)
  assert again.returncode == 0, again.stderr[-3000:]
  assert f"resuming from step {saved[0]}" in again.stderr
  full = subprocess.run(cmd(tmp_path / "full"), capture_output=True, text=True, env=env(), cwd=ROOT, timeout=600)
  assert full.returncode == 0, full.stderr[-3000:]

  def prompts(run_dir):
    return [
      [json.loads(x)["task_id"] for x in (run_dir / "rollouts" / f"step_{s:06d}.jsonl").read_text().splitlines()]
      for s in (1, 2, 3, 4)
    ]

  assert prompts(workdir) == prompts(tmp_path / "full")
