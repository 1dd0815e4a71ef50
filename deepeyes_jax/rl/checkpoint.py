"""Orbax checkpoints of a training run: parameters, optimizer state, step, and the data iterator state.

All randomness is derived from (config seed, step, row), so these four pieces are everything a killed run needs
to continue with the same numbers. Saves are asynchronous (training continues while the previous step is being
written); a checkpoint that was not finalised (a kill mid-write) is ignored by orbax, and one that is finalised but
does not restore (a file emptied or cut short) is moved aside by `restore_latest`, which says so. The
grain iterator is saved with grain's own orbax handler, one file per process (each process reads its own data shard).
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils

log = logging.getLogger(__name__)

# The run's config as JSON, written to the workdir by `train`: `python -m deepeyes_jax.export` reads the base HF
# checkpoint (model.checkpoint, whose config.json describes the architecture) from it.
TRAIN_CONFIG_FILE = "train_config.json"

_URL = re.compile(r"^[a-z][a-z0-9+.-]*://")  # a URL scheme: gs://bucket/..., s3://...


def normalize_directory(directory: str | os.PathLike) -> str:
  """A local `directory` made absolute (orbax wants absolute paths); a URL (`gs://bucket/run/checkpoints`) unchanged:
  `os.path.abspath` would turn it into `$PWD/gs:/bucket/run/checkpoints`, a local directory."""
  directory = os.fspath(directory)
  return directory if _URL.match(directory) else os.path.abspath(directory)


class Checkpointer:
  def __init__(
    self,
    directory: str,
    *,
    max_to_keep: int = 3,
    keep_period: int | None = None,
    save_interval_steps: int = 1,
    async_save: bool = True,
  ):
    self.directory = normalize_directory(directory)  # orbax takes a str or epath path: local or gs://
    options = ocp.CheckpointManagerOptions(
      max_to_keep=max_to_keep,
      keep_period=keep_period,
      save_interval_steps=save_interval_steps,
      enable_async_checkpointing=async_save,
      create=True,
    )
    self.manager = ocp.CheckpointManager(self.directory, options=options)

  def save(
    self,
    step: int,
    params,
    opt_state,
    *,
    learner_step: int,
    data_iterator,
    extra: dict | None = None,
    force: bool = False,
  ) -> bool:
    return self.manager.save(
      step,
      args=ocp.args.Composite(
        state=ocp.args.StandardSave({"params": params, "opt_state": opt_state}),
        meta=ocp.args.JsonSave({"learner_step": learner_step, **(extra or {})}),
        data=grain.checkpoint.CheckpointSave(data_iterator),
      ),
      force=force,
    )

  def restore(self, step: int, params, opt_state, data_iterator) -> tuple[Any, Any, dict]:
    """Restores params/opt_state into the shardings and dtypes of the given live ones, and the data iterator in
    place."""
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, {"params": params, "opt_state": opt_state})
    out = self.manager.restore(
      step,
      args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract),
        meta=ocp.args.JsonRestore(),
        data=grain.checkpoint.CheckpointRestore(data_iterator),
      ),
    )
    log.info("restored step %d from %s", step, self.directory)
    return out.state["params"], out.state["opt_state"], dict(out.meta)

  def restore_latest(
    self, params, opt_state, data_iterator_for: Callable[[int], Any], max_step: int | None = None
  ) -> tuple[int, Any, Any, dict] | None:
    """Restores the newest checkpoint that restores (see `restore`); None when there is none.

    A checkpoint that fails to restore twice (a truncated or emptied file: a disk filled up, a copy cut short; the
    retry lets a transient read error pass) is moved aside to `STEP.unrestorable` (kept for inspection, out of
    orbax's sight, so that later saves of that step and the steps before it work) with a warning naming it and the
    error, and the one before is tried. When checkpoints exist but none restores, raises RuntimeError listing each
    one's error (a run never restarts from scratch over them silently). `data_iterator_for(step)`: the iterator
    that step's data state restores into (the warm start and GRPO read different ones)."""
    steps = sorted(self.manager.all_steps(), reverse=True)
    if max_step is not None:
      steps = [s for s in steps if s <= max_step]
    errors = []
    for step in steps:
      error = None
      for _ in range(2):
        try:
          return (step, *self.restore(step, params, opt_state, data_iterator_for(step)))
        except Exception as e:  # any failure of this checkpoint: once more, then the one before
          error = e
      where = self._quarantine(step)
      errors.append(f"{where}: {type(error).__name__}: {error}")
      log.warning("cannot restore the checkpoint of step %d: %s: %s; moved it to %s (kept for inspection) and trying "
                  "the one before it", step, type(error).__name__, error, where)  # fmt: skip
    if errors:
      raise RuntimeError("no checkpoint restores:\n  " + "\n  ".join(errors))
    return None

  def _quarantine(self, step: int) -> str:
    """Moves the directory of `step` to `STEP.unrestorable[.N]` (process 0; the others wait) and reloads."""
    src = epath.Path(self.directory) / str(step)
    dst = epath.Path(self.directory) / f"{step}.unrestorable"
    n = 1
    while dst.exists():
      dst, n = epath.Path(self.directory) / f"{step}.unrestorable.{n}", n + 1
    if jax.process_index() == 0 and src.exists():
      src.rename(dst)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices(f"quarantine checkpoint {step}")
    self.manager.reload()
    return str(dst)

  def reached_preemption(self, step: int) -> bool:
    """True at the step all processes agreed to checkpoint at after a preemption notice (SIGTERM)."""
    return self.manager.reached_preemption(step)

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()
