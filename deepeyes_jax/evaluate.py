"""Evaluate a checkpoint on a benchmark with the zoom agent.

    python -m deepeyes_jax.evaluate --config configs/eval_vstar.py --config.checkpoint=DIR --config.data_path=DIR

Writes to config.out_dir (default eval_runs/<benchmark>...): results.jsonl (one line per item, appended as items
finish), trajectories.jsonl + images/, summary.json and summary.md (accuracy by category, comparison with the
published numbers). Re-running the same command after a kill continues without redoing finished items.
See docs/evaluation.md.
"""

from __future__ import annotations

from deepeyes_jax import cli_env

if __name__ == "__main__":  # before TensorFlow, jax and libtpu load: they read it when they start
  cli_env.quiet_environment()

import logging
import os
import time

import jax
import ml_collections
from absl import app, flags
from ml_collections import config_flags

from deepeyes_jax import run_setup
from deepeyes_jax.config_args import dataclass_from
from deepeyes_jax.data.benchmarks import load_benchmark
from deepeyes_jax.eval import config as eval_config
from deepeyes_jax.eval.loop import agent_rollouts
from deepeyes_jax.eval.runner import EvalSettings, evaluate_benchmark, summary_markdown


def _define_flags() -> None:
  """The command-line flags, defined only when this module runs as a program: importing it defines none, so
  several CLI modules can live in one process (the tests import them)."""
  global _CONFIG
  _CONFIG = config_flags.DEFINE_config_file("config", None, "a configs/eval_*.py file (optionally :variant)")


def out_dir(config: ml_collections.ConfigDict) -> str:
  if config.out_dir:
    return config.out_dir
  name = config.benchmark + ("_notool" if config.no_tool else "") + ("" if config.shuffle_options else "_unshuffled")
  return os.path.join("eval_runs", name)


# Rollout fields that change speed and memory, never the trajectories (the engines give the same tokens whatever
# their slots, pages and segments: tests/test_rollout_engine.py): a resumed evaluation may change them.
ENGINE_KNOBS = ("engine", "max_concurrent_rows", "page_size", "kv_pages", "segment_steps", "segment_release")


def settings(config: ml_collections.ConfigDict) -> EvalSettings:
  if config.num_samples > 1 and config.rollout.temperature == 0.0:
    raise ValueError("num_samples > 1 needs sampling: set --config.rollout.temperature (e.g. 1.0)")
  checkpoint = os.path.abspath(config.checkpoint) if config.checkpoint else ""
  rollout = {k: v for k, v in config.rollout.to_dict().items() if k not in ENGINE_KNOBS}
  return dataclass_from(EvalSettings, config, checkpoint=checkpoint, rollout=rollout)


def run(config: ml_collections.ConfigDict) -> dict:
  """Validates the config, loads the benchmark and the model, evaluates (resuming), prints and returns the
  summary."""
  eval_config.validate(config)  # every bad field named at once, before anything loads or compiles
  s = settings(config)
  run_setup.maybe_init_distributed()
  items, report = load_benchmark(config.benchmark, config.data_path, image_dir=config.image_dir)
  print(report.summary(), flush=True)
  if config.limit:
    items = items[: config.limit]
  t0 = time.perf_counter()
  mesh = run_setup.make_mesh(config.mesh)
  _, tokenizer, sampler = run_setup.load_for_inference(
    config.checkpoint,
    dtype=config.dtype,
    mesh=mesh,
    attention_impl=config.attention_impl,
    tokenizer=config.tokenizer,
  )
  print(f"loaded {config.checkpoint} on mesh {dict(mesh.shape)} in {time.perf_counter() - t0:.1f} s", flush=True)
  # no_tool: one answer turn (a tool call in it is not executed)
  rollout_fn = agent_rollouts(sampler, tokenizer, run_setup.agent_config(config), one_turn=config.no_tool)
  directory = out_dir(config)
  judge = run_setup.make_judge(config, directory) if config.reward.use_judge else None
  try:
    summary = evaluate_benchmark(
      items,
      rollout_fn,
      directory,
      s,
      tokenizer=tokenizer,
      judge=judge,
      load_report=report,
      write=jax.process_index() == 0,
    )
  finally:  # the verdicts a gs:// cache still holds in memory (a killed run keeps those written before)
    if judge is not None:
      judge.close()
  if jax.process_index() == 0:
    print(summary_markdown(summary), flush=True)
    print(f"wrote {directory}/results.jsonl, summary.json, summary.md", flush=True)
  return summary


def main(argv):
  del argv
  run_setup.quiet_frameworks()
  logging.getLogger("absl").setLevel(logging.INFO)
  with run_setup.config_errors_reported("evaluate"):
    run(_CONFIG.value)


if __name__ == "__main__":
  _define_flags()
  flags.mark_flags_as_required(["config"])
  app.run(main, flags_parser=run_setup.parse_flags)
