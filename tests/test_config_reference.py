"""docs/config_reference.md is generated from configs/*.py and must be up to date; the generator reads fields,
defaults, variants and line comments correctly."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from deepeyes_jax import config_reference as cr

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "config_reference.md"


def test_committed_reference_is_up_to_date():
  expected = cr.render(ROOT / "configs", ROOT)
  current = DOC.read_text() if DOC.exists() else ""
  assert current == expected, (
    f"docs/config_reference.md is out of date with configs/*.py. Regenerate it with `{cr.COMMAND}` (from the repo "
    "root) and commit the result."
  )


def test_every_field_of_every_config_is_documented():
  text = DOC.read_text()
  for path in sorted((ROOT / "configs").glob("*.py")):
    module = cr.load_module(path)
    for v in [None, *cr.variants(module, path)]:
      for field in cr.flatten(module.get_config(v)):
        assert f"| `{field}` |" in text, (path.name, v, field)


SAMPLE = '''
"""A sample config.

    python -m deepeyes_jax.train --config configs/sample.py:mode=fast
    python -m deepeyes_jax.train --config configs/sample.py:mode=slow ...
"""
import ml_collections


def get_config(arg=None):
  mode = arg.split("=")[1] if arg else "normal"
  cfg = ml_collections.ConfigDict()
  cfg.steps = 10  # how many steps | with a pipe
  cfg.opt = ml_collections.ConfigDict()
  cfg.opt.lr = 0.5  # learning rate
  cfg.opt.name = ml_collections.config_dict.placeholder(str)  # optimizer name
  cfg.opt.a, cfg.opt.b = (
    1,
    2,  # a pair
  )
  if mode == "fast":
    cfg.steps = 2  # not the default's comment
    cfg.opt.extra = True  # only in the fast variant
  return cfg
'''


def test_generator_on_a_sample_config(tmp_path):
  (tmp_path / "configs").mkdir()
  (tmp_path / "configs" / "sample.py").write_text(textwrap.dedent(SAMPLE))
  (tmp_path / "configs" / "_private.py").write_text("raise RuntimeError('not a config')\n")  # skipped
  text = cr.render(tmp_path / "configs", tmp_path)
  assert "## `configs/sample.py`" in text and "Variants (`arg` of `get_config`): `mode=fast`, `mode=slow`." in text
  rows = {line.split(" | ")[0].strip("| `"): line for line in text.splitlines() if line.startswith("| `")}
  assert list(rows) == ["steps", "opt.lr", "opt.name", "opt.a", "opt.b", "opt.extra"]  # source order
  assert rows["steps"] == "| `steps` | `10` | mode=fast: `2` | how many steps \\| with a pipe |"
  assert rows["opt.name"] == "| `opt.name` | `None (str)` |  | optimizer name |"
  assert rows["opt.b"].endswith("| a pair |") and rows["opt.a"].endswith("| a pair |")
  assert rows["opt.extra"] == "| `opt.extra` | — | mode=fast: `True` | only in the fast variant |"
  assert rows["opt.lr"] == "| `opt.lr` | `0.5` |  | learning rate |"


def test_generator_names_a_broken_config(tmp_path):
  (tmp_path / "bad.py").write_text("def get_config(arg=None):\n  raise KeyError('size')\n")
  with pytest.raises(cr.ConfigReferenceError, match=r"bad.py: get_config\(\) failed: KeyError"):
    cr.render(tmp_path, tmp_path)


def test_cli_check_and_write(tmp_path):
  (tmp_path / "configs").mkdir()
  (tmp_path / "configs" / "sample.py").write_text(textwrap.dedent(SAMPLE))
  out = tmp_path / "ref.md"
  base = [sys.executable, "-m", "deepeyes_jax.config_reference", f"--configs={tmp_path / 'configs'}", f"--out={out}"]
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  res = subprocess.run(base + ["--check"], capture_output=True, text=True, env=env)
  assert res.returncode == 1 and "out of date: run `python -m deepeyes_jax.config_reference`" in res.stderr
  assert subprocess.run(base, capture_output=True, text=True, env=env).returncode == 0
  assert "| `opt.lr` |" in out.read_text()
  res = subprocess.run(base + ["--check"], capture_output=True, text=True, env=env)
  assert res.returncode == 0, res.stderr
