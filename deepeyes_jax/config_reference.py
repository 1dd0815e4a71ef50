"""Generates docs/config_reference.md from configs/*.py: every field, its default, its value in each variant, and
the comment written on its line in the config file.

    python -m deepeyes_jax.config_reference            # rewrite docs/config_reference.md
    python -m deepeyes_jax.config_reference --check    # exit 1 if the committed file is out of date

Variants of a config file are the `arg` strings of `get_config(arg)`: the module's `VARIANTS` tuple when it defines
one, else every `configs/NAME.py:ARG` written in its docstring. tests/test_config_reference.py fails when the
committed page differs from what this module generates, so a changed or new config file needs a re-run.
"""

from __future__ import annotations

import ast
import importlib.util
import io
import os
import re
import sys
import tokenize
from pathlib import Path
from typing import Any

import ml_collections
from absl import app, flags

ROOT = Path(__file__).resolve().parents[1]
COMMAND = "python -m deepeyes_jax.config_reference"
_MISSING = object()


class ConfigReferenceError(ValueError):
  """A config file that cannot be imported or evaluated: names the file and the variant."""


def load_module(path: Path):
  spec = importlib.util.spec_from_file_location(f"_config_{path.stem}", path)
  module = importlib.util.module_from_spec(spec)
  try:
    spec.loader.exec_module(module)
  except Exception as e:
    raise ConfigReferenceError(f"{path}: import failed: {type(e).__name__}: {e}") from e
  if not callable(getattr(module, "get_config", None)):
    raise ConfigReferenceError(f"{path}: no get_config(arg=None) function")
  return module


def variants(module, path: Path) -> list[str]:
  """`module.VARIANTS`, else the `configs/NAME.py:ARG` examples of the docstring, in order, without repeats."""
  if hasattr(module, "VARIANTS"):
    return list(module.VARIANTS)
  found = re.findall(rf"{re.escape(path.name)}:(\S+)", module.__doc__ or "")
  return list(dict.fromkeys(found))


def flatten(cfg: ml_collections.ConfigDict, prefix: str = "") -> dict[str, tuple[Any, type | None]]:
  """{dotted field: (value, declared type)}; the type matters for placeholders, whose value is None."""
  out = {}
  for key, value in cfg.items():
    name = f"{prefix}{key}"
    if isinstance(value, ml_collections.ConfigDict):
      out.update(flatten(value, name + "."))
    else:
      out[name] = (value, cfg.get_type(key))
  return out


def _dotted(node: ast.AST) -> list[str] | None:
  """`c.a.b` -> ["a", "b"] (the root variable's name dropped); None for anything else."""
  parts = []
  while isinstance(node, ast.Attribute):
    parts.append(node.attr)
    node = node.value
  return parts[::-1] if isinstance(node, ast.Name) and parts else None


def field_comments(source: str) -> tuple[dict[str, str], dict[str, int]]:
  """({field: comment on its assignment's lines}, {field: line of its first assignment}) from a config file.

  The first assignment in source order wins, i.e. the default rather than a variant's override, unless only a
  variant sets the field.
  """
  comments: dict[int, str] = {}
  for tok in tokenize.generate_tokens(io.StringIO(source).readline):
    if tok.type == tokenize.COMMENT:
      comments[tok.start[0]] = tok.string.lstrip("#").strip()
  found: dict[str, tuple[int, str]] = {}
  for node in ast.walk(ast.parse(source)):
    if not isinstance(node, (ast.Assign, ast.AnnAssign)):
      continue
    targets = node.targets if isinstance(node, ast.Assign) else [node.target]
    names = []
    for t in targets:
      for elt in t.elts if isinstance(t, ast.Tuple) else [t]:
        parts = _dotted(elt)
        if parts:
          names.append(".".join(parts))
    text = next((comments[i] for i in range(node.lineno, node.end_lineno + 1) if i in comments), "")
    for name in names:
      if name not in found or node.lineno < found[name][0]:
        found[name] = (node.lineno, text)
  return {k: c for k, (_, c) in found.items()}, {k: line for k, (line, _) in found.items()}


def _fmt(value, typ=None) -> str:
  if value is _MISSING:
    return "—"
  text = f"None ({typ.__name__})" if value is None and typ is not None else repr(value)
  return "`" + text.replace("|", "\\|").replace("`", "'") + "`"


def _cell(text: str) -> str:
  return text.replace("|", "\\|").replace("\n", " ")


def render_config(path: Path, root: Path = ROOT) -> str:
  module = load_module(path)
  rel = path.relative_to(root) if path.is_relative_to(root) else path
  names = variants(module, path)
  try:
    base = flatten(module.get_config())
  except Exception as e:
    raise ConfigReferenceError(f"{path}: get_config() failed: {type(e).__name__}: {e}") from e
  per_variant = {}
  for v in names:
    try:
      per_variant[v] = flatten(module.get_config(v))
    except Exception as e:
      raise ConfigReferenceError(f"{path}: get_config({v!r}) failed: {type(e).__name__}: {e}") from e
  comments, lines = field_comments(path.read_text())
  fields = list(base)
  for flat in per_variant.values():
    fields += [f for f in flat if f not in fields]
  fields.sort(key=lambda f: (lines.get(f, sys.maxsize), f))

  doc = (module.__doc__ or "").strip()
  out = [f"## `{rel}`", ""]
  if doc:
    out += ["```", doc, "```", ""]
  usage = f"--config {rel}" + (f"[:{'|'.join(names)}]" if names else "")
  entry = "train" if any(f.startswith("rl.") for f in base) else "evaluate"  # evaluation configs have no `rl` block
  out += [f"Use: `python -m deepeyes_jax.{entry} {usage}`; override any field with `--config.FIELD=VALUE`.", ""]
  if names:
    out += ["Variants (`arg` of `get_config`): " + ", ".join(f"`{v}`" for v in names) + ".", ""]
  groups: dict[str, list[str]] = {}
  for f in fields:
    groups.setdefault(f.split(".")[0] if "." in f else "", []).append(f)
  for group, members in groups.items():
    out += [f"### `{group}`" if group else "### top level", ""]
    out += ["| field | default | in variants | comment |", "|---|---|---|---|"]
    for f in members:
      value, typ = base.get(f, (_MISSING, None))
      changed = []
      for v, flat in per_variant.items():
        vv, vt = flat.get(f, (_MISSING, None))
        if vv is not value and vv != value:
          changed.append(f"{v}: {_fmt(vv, vt)}")
      out.append(f"| `{f}` | {_fmt(value, typ)} | {'; '.join(changed)} | {_cell(comments.get(f, ''))} |")
    out.append("")
  return "\n".join(out)


def render(configs_dir: Path = ROOT / "configs", root: Path = ROOT) -> str:
  paths = sorted(p for p in Path(configs_dir).glob("*.py") if not p.name.startswith("_"))
  if not paths:
    raise ConfigReferenceError(f"{configs_dir}: no config files (*.py)")
  head = [
    "# Config reference",
    "",
    f"<!-- Generated by `{COMMAND}` from configs/*.py. Do not edit by hand: edit the config",
    "files (the comment on a field's line is its description here) and re-run the command. -->",
    "",
    "Every field of every config file, its default, the value each variant sets where it differs, and the comment",
    "on the field's line in the config file. Any field can be set on the command line: `--config.rl.clip_low=0.1`.",
    "",
  ]
  return "\n".join(head + [render_config(p, root) for p in paths]).rstrip() + "\n"


def _define_flags() -> None:
  """The command-line flags, defined only when this module runs as a program: importing it defines none, so
  several CLI modules can live in one process (the tests import them)."""
  global _CONFIGS, _OUT, _CHECK
  _CONFIGS = flags.DEFINE_string("configs", str(ROOT / "configs"), "directory of config files")
  _OUT = flags.DEFINE_string("out", str(ROOT / "docs" / "config_reference.md"), "markdown file to write")
  _CHECK = flags.DEFINE_bool("check", False, "only compare: exit 1 if --out differs from what would be written")


def main(argv):
  del argv
  text = render(Path(_CONFIGS.value))
  if _CHECK.value:
    current = Path(_OUT.value).read_text() if os.path.exists(_OUT.value) else ""
    if current != text:
      print(f"{_OUT.value} is out of date: run `{COMMAND}`", file=sys.stderr)
      sys.exit(1)
    print(f"{_OUT.value} is up to date")
    return
  Path(_OUT.value).write_text(text)
  print(f"wrote {_OUT.value}")


if __name__ == "__main__":
  _define_flags()
  app.run(main)
