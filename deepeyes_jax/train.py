"""GRPO training of the DeepEyes zoom agent.

    python -m deepeyes_jax.train --config configs/deepeyes_7b.py --workdir DIR [--config.a.b=value ...]

Re-running the same command with the same workdir resumes from the latest checkpoint.
"""

from __future__ import annotations

import logging

from absl import app, flags
from ml_collections import config_flags

from deepeyes_jax.rl.trainer import train


def _define_flags() -> None:
  """The command-line flags, defined only when this module runs as a program: importing it defines none, so
  several CLI modules can live in one process (the tests import them)."""
  global _CONFIG, _WORKDIR
  _CONFIG = config_flags.DEFINE_config_file(
    "config", None, "a configs/*.py file (optionally :variant)", lock_config=True
  )
  _WORKDIR = flags.DEFINE_string("workdir", None, "output directory (checkpoints, metrics, TensorBoard)", required=True)
  flags.mark_flags_as_required(["config"])


class _QuietLibraries(logging.Filter):
  """Drops the INFO chatter of orbax (a dozen lines per checkpoint); warnings and errors still show."""

  def filter(self, record: logging.LogRecord) -> bool:
    return record.levelno >= logging.WARNING or "/orbax/" not in record.pathname.replace("\\", "/")


def main(argv):
  del argv
  logging.getLogger("absl").setLevel(logging.INFO)
  logging.getLogger("absl").addFilter(_QuietLibraries())
  train(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
  _define_flags()
  app.run(main)
