"""GRPO training of the DeepEyes zoom agent.

    python -m deepeyes_jax.train --config configs/deepeyes_7b.py --workdir DIR [--config.a.b=value ...]

Re-running the same command with the same workdir resumes from the latest checkpoint.
"""

from __future__ import annotations

from deepeyes_jax import cli_env

if __name__ == "__main__":  # before TensorFlow, jax and libtpu load: they read it when they start
  cli_env.quiet_environment()

import logging

from absl import app, flags
from ml_collections import config_flags

from deepeyes_jax import run_setup
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


def main(argv):
  del argv
  run_setup.quiet_frameworks()
  logging.getLogger("absl").setLevel(logging.INFO)
  with run_setup.config_errors_reported("train"):
    train(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
  _define_flags()
  app.run(main, flags_parser=run_setup.parse_flags)
