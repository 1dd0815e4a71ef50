"""Ask a DeepEyes / Qwen2.5-VL checkpoint a question about an image and watch it zoom.

    python -m deepeyes_jax.infer --checkpoint DIR --image PATH --question "What is written on the sign?" [--greedy]

Prints every assistant turn and tool call as it happens, then writes to --out (default ./infer_out):
`zooms.png` (the image with each zoom box numbered, next to the crops), `trajectory.html` (the whole
trajectory), and `trajectories.jsonl` + `images/` (the exact tokens, log-probs and images).
The checkpoint directory must hold the HF model files and the tokenizer (as Qwen2.5-VL checkpoints do).
"""

from __future__ import annotations

from deepeyes_jax import cli_env

if __name__ == "__main__":  # before TensorFlow, jax and libtpu load: they read it when they start
  cli_env.quiet_environment()

import os
import time

from absl import app, flags

from deepeyes_jax import run_setup
from deepeyes_jax.agent import prompts
from deepeyes_jax.agent.render import trajectory_html, zoom_figure
from deepeyes_jax.agent.rollout import Task, run_rollouts
from deepeyes_jax.agent.trajectory import save_trajectories
from deepeyes_jax.models import qwen2_5_vl as qvl
from deepeyes_jax.processing import image as improc


def _define_flags() -> None:
  """The command-line flags, defined only when this module runs as a program: importing it defines none, so
  several CLI modules can live in one process (the tests import them)."""
  global _CKPT, _IMAGE, _QUESTION, _OPTIONS, _SEED, _OUT, _MESH, _ROLLOUT
  _CKPT = flags.DEFINE_string("checkpoint", None, "HF checkpoint directory (model + tokenizer)", required=True)
  _IMAGE = flags.DEFINE_string("image", None, "image file", required=True)
  _QUESTION = flags.DEFINE_string("question", None, "the question", required=True)
  _OPTIONS = flags.DEFINE_list("options", None, "multiple-choice options (comma separated): uses the eval prompt")
  _SEED = flags.DEFINE_integer("seed", 0, "PRNG seed")
  _OUT = flags.DEFINE_string("out", "infer_out", "output directory")
  _MESH = flags.DEFINE_string("mesh", None, "data,fsdp,tensor mesh shape (default: one device)")
  _ROLLOUT = run_setup.RolloutFlags()


def main(argv):
  del argv
  run_setup.quiet_frameworks()
  t0 = time.perf_counter()
  mesh = run_setup.parse_mesh(_MESH.value)
  dtype = run_setup.resolve_dtype(_ROLLOUT.dtype.value, mesh)  # auto: float32 on CPU, bfloat16 on GPU / TPU
  model, tokenizer, sampler = run_setup.load_for_inference(_CKPT.value, dtype=dtype, mesh=mesh)
  size = f"{qvl.param_count(model) / 1e6:.1f}M params, {dtype} on {run_setup.device_platform(mesh)}"
  print(f"loaded {_CKPT.value} ({size}) in {time.perf_counter() - t0:.1f} s")
  image = improc.load_image(_IMAGE.value)
  if _OPTIONS.value:
    user_text = prompts.eval_user_text(_QUESTION.value, _OPTIONS.value)
  else:
    user_text = _QUESTION.value + prompts.USER_SUFFIX
  task = Task(task_id=os.path.basename(_IMAGE.value), image=image, user_text=user_text)
  config = _ROLLOUT.agent_config()

  def on_turn(row, turn_no, turn, record):
    print(f"\n--- turn {turn_no} ({turn.num_tokens} tokens, {turn.kind}) ---\n{turn.text}", flush=True)
    if record is not None:
      detail = f"box {record.bbox}" if record.status == "ok" else (record.error or record.status)
      print(f"[tool] {record.name}: {record.status} {detail}", flush=True)

  (traj,) = run_rollouts(sampler, tokenizer, [task], config=config, seed=_SEED.value, on_turn=on_turn)
  print(f"\nanswer: {traj.answer!r} (stop: {traj.stop_reason}, {traj.num_tool_calls} tool calls)")
  os.makedirs(_OUT.value, exist_ok=True)
  fig = zoom_figure(traj)
  fig.save(os.path.join(_OUT.value, "zooms.png"))
  with open(os.path.join(_OUT.value, "trajectory.html"), "w") as f:
    f.write(trajectory_html(traj, fig, title=_QUESTION.value))
  jsonl = os.path.join(_OUT.value, "trajectories.jsonl")
  if os.path.exists(jsonl):  # save_trajectories appends; one run = one file
    os.remove(jsonl)
  save_trajectories([traj], _OUT.value)
  print(f"wrote {_OUT.value}/zooms.png, trajectory.html, trajectories.jsonl ({time.perf_counter() - t0:.1f} s total)")


if __name__ == "__main__":
  _define_flags()
  app.run(main)
