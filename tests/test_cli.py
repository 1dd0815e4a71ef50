"""The command-line programs' start-up (run_setup.quiet_frameworks / parse_flags / config_errors_reported, cli_env):
no framework noise, a config typo answered in one line with the nearest field, config problems named as their flags,
and infer's dtype following the devices."""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
import types
from pathlib import Path

import ml_collections
import numpy as np
import pytest
from absl import flags
from ml_collections import config_flags
from PIL import Image

from deepeyes_jax import cli_env, run_setup

ROOT = Path(__file__).resolve().parents[1]

# What TensorFlow, libtpu (jax[tpu] on a host without a TPU), jax and orbax print at start-up when left alone.
NOISE = [
  "oneDNN custom operations",
  "This TensorFlow binary is optimized",
  "could not determine TPU",
  "Logging before InitGoogle",
  "Source Location Trace",
  "unexpected worker hostname",
  "Unable to initialize backend",
  "_NonBlockingMetadataStore",
  "orbax-checkpoint version",
]


def _user_env(**extra) -> dict:
  """The environment a user's shell has: none of the tests' platform pinning (conftest sets JAX_PLATFORMS=cpu and
  8 host devices), no TPU / TensorFlow logging variables."""
  env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "TPU_", "TF_CPP", "TF_ENABLE"))}
  env["XLA_FLAGS"] = ""
  return dict(env, **extra)


def _cli(module: str, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
  cmd = [sys.executable, "-m", f"deepeyes_jax.{module}", *args]
  return subprocess.run(cmd, capture_output=True, text=True, env=env or _user_env(), cwd=ROOT, timeout=600)


def test_infer_prints_no_framework_noise_and_picks_the_dtype_of_its_devices(tmp_path, tiny_vlm):
  """A real `infer` run, as a user starts it (no JAX_PLATFORMS): only our own lines; --dtype's default "auto" is
  float32 on CPU, bfloat16 on GPU / TPU."""
  Image.new("RGB", (96, 72), (200, 40, 40)).save(tmp_path / "img.png")
  r = _cli(
    "infer", f"--checkpoint={tiny_vlm[0]}", f"--image={tmp_path / 'img.png'}", "--question=What colour?", "--greedy",
    "--max_tokens_per_turn=4", "--max_total_tokens=512", f"--max_pixels={16 * 28 * 28}", f"--out={tmp_path / 'out'}",
  )  # fmt: skip
  output = r.stdout + r.stderr
  assert r.returncode == 0, output[-3000:]
  for line in NOISE:
    assert line not in output, f"{line!r} in:\n{output}"
  m = re.search(r"M params, (\w+) on (\w+)\)", r.stdout)
  assert m, r.stdout
  assert m.group(1) == ("float32" if m.group(2) == "cpu" else "bfloat16"), m.group(0)
  assert "answer:" in r.stdout


@pytest.mark.parametrize(
  "module,args,message",
  [
    (
      "train",
      ["--config", "configs/synthetic.py", "--workdir", "WORKDIR", "--config.rl.grup_size=4"],
      "--config.rl.grup_size: no such field; did you mean rollout.group_size?",
    ),
    (
      "evaluate",
      ["--config", "configs/eval_vstar.py:size=tiny", "--config.model.checkpoint=/ckpt"],
      "--config.model.checkpoint: no such field; did you mean checkpoint?",
    ),
  ],
)
def test_config_typo_is_one_line_naming_the_nearest_field(tmp_path, module, args, message):
  r = _cli(module, *[str(tmp_path) if a == "WORKDIR" else a for a in args])
  assert r.returncode == 2, r.stderr[-3000:]
  assert r.stderr.strip() == message  # one line: no traceback, no framework noise (TensorFlow is imported by now)
  assert r.stdout == ""


def test_config_problems_name_their_flags_without_a_traceback(tmp_path):
  """configs/deepeyes_7b.py needs data.train (and a checkpoint): the error names --config.data.train."""
  r = _cli("train", "--config", "configs/deepeyes_7b.py", "--workdir", str(tmp_path))
  assert r.returncode == 2, r.stderr[-3000:]
  assert "Traceback" not in r.stderr
  lines = r.stderr.strip().splitlines()
  assert lines[0] == "train: training config: 2 problem(s):", r.stderr
  assert "  - --config.data.train='': must be set: parquet / JSONL paths or synthetic:SPLIT" in lines
  assert "  - --config.model.checkpoint=None: must be set (or model.tiny)" in lines


# ----------------------------------------------------------------------------------------------------------------
# In-process: the pieces.


def _config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.checkpoint = ml_collections.config_dict.placeholder(str)
  c.rollout = ml_collections.ConfigDict({"group_size": 8, "page_size": 64, "max_turns": 5})
  c.rl = ml_collections.ConfigDict({"clip_low": 0.2, "clip_high": 0.2})
  c.extra = ml_collections.config_dict.placeholder(ml_collections.ConfigDict)
  return c


@pytest.mark.parametrize(
  "path,problem",
  [
    ("rl.grup_size", "no such field; did you mean rollout.group_size?"),
    ("rolout.max_turns", "no such field; did you mean rollout.max_turns?"),
    ("rl.clip_lo", "no such field; did you mean rl.clip_low?"),
    ("model.checkpoint", "no such field; did you mean checkpoint?"),
    ("zzzzzz", "no such field; the fields are listed in docs/config_reference.md"),
    ("seed.x", "seed is a value (int), not a block of fields"),
    ("checkpoint.x", "checkpoint is a value (str), not a block of fields"),  # an empty placeholder of a str
    ("rollout.group_size", None),
    ("extra.anything", None),  # an empty block: ml_collections fills it
  ],
)
def test_unknown_field(path, problem):
  assert run_setup.unknown_field(_config(), path) == problem


def test_config_override_problem_reads_the_config_file_of_the_command_line(tmp_path):
  cfg = tmp_path / "c.py"
  cfg.write_text(
    "import ml_collections\n"
    "def get_config(arg=None):\n"
    "  return ml_collections.ConfigDict({'rl': {'group_size': 4}, 'data': {'train': ''}})\n"
  )
  fv = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "", flag_values=fv)
  argv = ["prog", "--config", str(cfg), "--config.data.train=x", "--noconfig.rl.grup_size"]
  assert (
    run_setup.config_override_problem(argv, fv) == "--config.rl.grup_size: no such field; did you mean rl.group_size?"
  )
  assert run_setup.config_override_problem(["prog", f"--config={cfg}", "--config.rl.group_size=3"], fv) is None
  # everything after -- is not a flag
  assert run_setup.config_override_problem(["prog", f"--config={cfg}", "--", "--config.nope=1"], fv) is None
  # a config file that does not exist: one line (ml_collections defers it to a traceback at the first use)
  missing = tmp_path / "nope.py"
  assert run_setup.config_file_problem(["prog", "--config", f"{missing}:size=tiny"], fv) == (
    f"--config={missing}:size=tiny: no such config file {missing}"
  )
  assert run_setup.config_file_problem(["prog", f"--config={cfg}:size=tiny"], fv) is None


def _record(name: str, level: int, msg: str, path: str) -> logging.LogRecord:
  return logging.LogRecord(name, level, path, 1, msg, None, None)


def test_framework_noise_filter_keeps_warnings_and_our_lines():
  f = run_setup._FrameworkNoise()
  orbax = "/venv/site-packages/orbax/checkpoint/_src/checkpoint_manager.py"
  assert not f.filter(_record("absl", logging.INFO, "Closing _NonBlockingMetadataStore(...)", orbax))
  assert not f.filter(_record("absl", logging.WARNING, "Given directory is read only=/x", orbax))
  assert f.filter(_record("absl", logging.WARNING, "Waiting for the save to finish", orbax))
  assert f.filter(_record("absl", logging.ERROR, "could not save", orbax))
  xb = "/venv/site-packages/jax/_src/xla_bridge.py"
  assert not f.filter(_record("jax._src.xla_bridge", logging.INFO, "Unable to initialize backend 'tpu': ...", xb))
  assert f.filter(_record("jax._src.xla_bridge", logging.WARNING, "An NVIDIA GPU may be present on this machine", xb))
  ours = str(ROOT / "deepeyes_jax/sampling/sampler.py")
  assert f.filter(_record("absl", logging.INFO, "sampler: compiling ...", ours))


def test_quiet_environment_sets_defaults_only(monkeypatch):
  for name in ("TF_CPP_MIN_LOG_LEVEL", "TF_ENABLE_ONEDNN_OPTS", *cli_env._LIBTPU_TOPOLOGY_VARS):
    monkeypatch.delenv(name, raising=False)
  monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", "0")  # the user's choice wins
  monkeypatch.setattr(cli_env, "may_have_tpu", lambda: False)
  cli_env.quiet_environment()
  assert os.environ["TF_CPP_MIN_LOG_LEVEL"] == "0" and os.environ["TF_ENABLE_ONEDNN_OPTS"] == "0"
  assert os.environ["TPU_HOST_BOUNDS"] == "1,1,1" and os.environ["TPU_WORKER_HOSTNAMES"] == "localhost"
  # A host that may have a TPU chip, or a libtpu topology variable already set: libtpu's environment is left alone.
  for name in ("TPU_HOST_BOUNDS", "TPU_WORKER_HOSTNAMES"):
    monkeypatch.delenv(name)
  monkeypatch.setattr(cli_env, "may_have_tpu", lambda: True)
  cli_env.quiet_environment()
  assert "TPU_HOST_BOUNDS" not in os.environ and "TPU_WORKER_HOSTNAMES" not in os.environ
  monkeypatch.setattr(cli_env, "may_have_tpu", lambda: False)
  monkeypatch.setenv("TPU_ACCELERATOR_TYPE", "v5p-8")
  cli_env.quiet_environment()
  assert "TPU_HOST_BOUNDS" not in os.environ


def test_auto_dtype_follows_the_devices():
  def mesh(platform):
    return types.SimpleNamespace(devices=np.array([types.SimpleNamespace(platform=platform)]))

  assert run_setup.resolve_dtype("auto") == "float32"  # the tests' CPU devices
  assert run_setup.resolve_dtype("auto", mesh("tpu")) == "bfloat16"
  assert run_setup.resolve_dtype("auto", mesh("gpu")) == "bfloat16"
  assert run_setup.resolve_dtype("auto", mesh("cpu")) == "float32"
  assert (
    run_setup.resolve_dtype("bfloat16") == "bfloat16" and run_setup.resolve_dtype("float32", mesh("tpu")) == "float32"
  )
