"""Runs a deepeyes_jax command-line module and SIGKILLs it at a chosen point: how the tests kill runs mid-way.

    python tests/kill_hooks.py rollouts=3 deepeyes_jax.train --config ... --workdir ...
    python tests/kill_hooks.py items=2 deepeyes_jax.evaluate --config ...

- ``rollouts=N``: the trainer is killed right after the rollouts of its N-th GRPO step, i.e. mid-step; every
  checkpoint before it is durable (saves are made synchronous here), so the test knows where the run resumes.
- ``items=N``: the benchmark evaluation is killed once N items' results were written.
- ``term_in_update=N``: the trainer sends itself SIGTERM as its N-th GRPO update starts (a `kill PID` that lands
  while one-step-off-policy rollouts run in the background); the run goes on to its own clean exit. Prefetched
  rollouts (those given a `cancel`) first wait up to 5 s for it, so that the ones a stop drops are still running
  when the trainer drops them, whatever the machine's speed.

The hooks are monkeypatches applied here, so that the package itself holds no test code.
"""

import os
import runpy
import signal
import sys
import time


def _kill() -> None:
  sys.stdout.flush()
  sys.stderr.flush()
  os.kill(os.getpid(), signal.SIGKILL)


def kill_after_rollouts(n: int) -> None:
  from deepeyes_jax.rl import checkpoint, trainer

  save = checkpoint.Checkpointer.save

  def durable_save(self, *args, **kwargs):
    out = save(self, *args, **kwargs)
    self.wait()
    return out

  checkpoint.Checkpointer.save = durable_save
  real, calls = trainer.run_rollouts, [0]

  def rollouts(*args, **kwargs):
    out = real(*args, **kwargs)
    calls[0] += 1
    if calls[0] == n:
      _kill()
    return out

  trainer.run_rollouts = rollouts


def kill_after_items(n: int) -> None:
  from deepeyes_jax.eval import runner

  real, written = runner._write_batch, [0]

  def write_batch(out_dir, settings, trajs, records):
    real(out_dir, settings, trajs, records)
    written[0] += len(records)
    if written[0] >= n:
      _kill()

  runner._write_batch = write_batch


def sigterm_in_update(n: int) -> None:
  from deepeyes_jax.rl import trainer

  real, calls = trainer.learn, [0]

  def learn(*args, **kwargs):
    calls[0] += 1
    if calls[0] == n:
      os.kill(os.getpid(), signal.SIGTERM)  # handled by the trainer's StopSignals: the step goes on
    return real(*args, **kwargs)

  trainer.learn = learn
  real_rollouts = trainer.run_rollouts

  def rollouts(*args, cancel=None, **kwargs):
    deadline = time.monotonic() + 5.0
    while cancel is not None and not cancel() and time.monotonic() < deadline:
      time.sleep(0.01)
    return real_rollouts(*args, cancel=cancel, **kwargs)

  trainer.run_rollouts = rollouts


HOOKS = {"rollouts": kill_after_rollouts, "items": kill_after_items, "term_in_update": sigterm_in_update}


def main() -> None:
  spec, module, *args = sys.argv[1:]
  what, n = spec.split("=")
  HOOKS[what](int(n))
  sys.argv = [module, *args]
  runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
  main()
