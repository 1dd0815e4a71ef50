"""Tool-use-oriented data selection for DeepEyes-format data with a checkpoint (deepeyes_jax/eval/selection.py).

    python -m deepeyes_jax.select --checkpoint /ckpt/Qwen2.5-VL-7B-Instruct --data '/data/deepeyes47k/*.parquet' \
        --out /data/selected.parquet [--k 8] [--notool_filter] [--no_tool_max 0.5] [--crop_min 0.5]

Writes the kept records (plus a `selection` column with the statistics) to --out, every item's decision to
<out>.decisions.jsonl, and prints what was kept and why. Bad records are reported and skipped.
"""

from __future__ import annotations

from deepeyes_jax import cli_env

if __name__ == "__main__":  # before TensorFlow, jax and libtpu load: they read it when they start
  cli_env.quiet_environment()

import logging

from absl import app, flags

from deepeyes_jax import run_setup
from deepeyes_jax.data.deepeyes import BadRecord, DeepEyesSource, decode_example
from deepeyes_jax.eval.loop import agent_rollouts
from deepeyes_jax.eval.selection import SelectionConfig, report, select, write_selection
from deepeyes_jax.reward.judge import JudgeConfig, LLMJudge


def _define_flags() -> None:
  """The command-line flags, defined only when this module runs as a program: importing it defines none, so
  several CLI modules can live in one process (the tests import them)."""
  global _CKPT, _DATA, _OUT, _K, _SEED, _BATCH, _TOOL_FILTER, _NO_TOOL_MAX, _CROP_MIN, _MISSING_BOX, _LIMIT, _MESH
  global _JUDGE, _ROLLOUT
  _CKPT = flags.DEFINE_string("checkpoint", None, "HF checkpoint directory (model + tokenizer)", required=True)
  _DATA = flags.DEFINE_list("data", None, "DeepEyes parquet / JSONL paths or globs", required=True)
  _OUT = flags.DEFINE_string("out", None, "output parquet", required=True)
  _K = flags.DEFINE_integer("k", SelectionConfig.k, "samples per question and condition")
  _SEED = flags.DEFINE_integer("seed", SelectionConfig.seed, "PRNG seed")
  _BATCH = flags.DEFINE_integer("batch_size", SelectionConfig.batch_size, "questions per rollout batch")
  _TOOL_FILTER = flags.DEFINE_bool("tool_filter", True, "also require: fails without the tool, solved with the crop")
  _NO_TOOL_MAX = flags.DEFINE_float("no_tool_max", SelectionConfig.no_tool_max, "max solved rate without the tool")
  _CROP_MIN = flags.DEFINE_float("crop_min", SelectionConfig.crop_min, "min solved rate with the ground-truth crop")
  _MISSING_BOX = flags.DEFINE_enum("missing_box", "keep", ["keep", "drop"], "items without extra_info.bbox")
  _LIMIT = flags.DEFINE_integer("limit", 0, "only the first N records (0 = all)")
  _MESH = flags.DEFINE_string("mesh", "1,-1,1", "data,fsdp,tensor mesh shape")
  _JUDGE = flags.DEFINE_string("judge_url", None, "OpenAI-compatible judge endpoint (default: rules only)")
  _ROLLOUT = run_setup.RolloutFlags()


def load_records(paths, limit: int = 0):
  """(raw records, decoded examples) of the good records; bad ones are logged and counted."""
  source = DeepEyesSource(paths)
  records, examples, bad = [], [], 0
  for i in range(len(source) if not limit else min(limit, len(source))):
    rec = source[i]
    try:
      examples.append(decode_example(rec, i, source_name=rec.get("_file", "?")))
      records.append(rec)
    except BadRecord as e:
      logging.warning("skipping %s", e)
      bad += 1
  print(f"{len(examples)} records read from {len(source.paths)} file(s), {bad} bad record(s) skipped", flush=True)
  return records, examples


def main(argv):
  del argv
  run_setup.quiet_frameworks()
  config = SelectionConfig(  # validated before anything loads
    k=_K.value,
    seed=_SEED.value,
    batch_size=_BATCH.value,
    tool_filter=_TOOL_FILTER.value,
    no_tool_max=_NO_TOOL_MAX.value,
    crop_min=_CROP_MIN.value,
    missing_box=_MISSING_BOX.value,
  )
  records, examples = load_records(_DATA.value, _LIMIT.value)
  mesh = run_setup.parse_mesh(_MESH.value)
  _, tokenizer, sampler = run_setup.load_for_inference(_CKPT.value, dtype=_ROLLOUT.dtype.value, mesh=mesh)
  agent = _ROLLOUT.agent_config()
  judge = LLMJudge(JudgeConfig(url=_JUDGE.value)) if _JUDGE.value else None
  decisions = select(
    examples,
    agent_rollouts(sampler, tokenizer, agent),
    agent_rollouts(sampler, tokenizer, agent, one_turn=True),
    tokenizer,
    config,
    judge,
  )
  print(report(decisions), flush=True)
  parquet, jsonl = write_selection(records, decisions, _OUT.value)
  print(f"wrote {parquet} ({sum(d.kept for d in decisions)} records) and {jsonl}", flush=True)


if __name__ == "__main__":
  _define_flags()
  app.run(main)
