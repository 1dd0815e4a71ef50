"""Every command the docs tell a user to run is audited as written (issue #22), without running anything heavy.

Where commands are found (`extract`): README.md, docs/*.md, launch/README.md and the markdown and code cells of
colab/*.ipynb:
- fenced ```bash / ```sh blocks: every logical line (`\\` continuations joined, a quote left open continued on the
  next line; a line that starts with `...` continues the block's previous command);
- unlabelled ``` blocks (the config files' docstrings in docs/config_reference.md): their 4-space-indented lines,
  and any line that starts like a command;
- ```python blocks: the whole snippet;
- a fenced block that starts with `#!` is a script a launcher writes (the sbatch script of launch/README.md);
- inline `code` spans that start with `python -m`, `python -c`, `launch/`, `pip install` or `.venv/bin/` (a span may
  wrap lines);
- notebook code cells: `%pip` / `!` lines, and `subprocess` / `os.system` calls;
- the examples of `launch/tpu.sh --help` and `launch/slurm.sh --help`.

How each is audited (`audit`), one test per (file, line) so that a failure names the doc location:
- `python -m deepeyes_jax.MOD ARGS`: the module exists; every flag is one that MOD defines (its absl flags, defined
  the way the program defines them, or its argparse parser), with a value its parser accepts; `--config
  FILE[:ARGS]` loads and every `--config.X=V` override names a field (absl and ml_collections parse the command
  line exactly as the program does); the config passes the program's own validation, which runs before anything
  loads (`rl/train_config.validate` for train, `eval/config.validate` and `evaluate.settings` for evaluate; the
  slice, functions, model options and mesh for aot). None of them checks that a path exists (they check that it is
  set), so placeholder paths such as /ckpt/DeepEyes-7B need no special case.
- `launch/tpu.sh` / `launch/slurm.sh`: run with `--dry-run` (the doc's shell variables, e.g. `L="--name $NAME ..."`,
  expanded), exit status 0, and the `python -m deepeyes_jax...` command lines they generate audited as above; the
  script a doc shows as written by `launch/slurm.sh` is compared with what it writes.
- `pip install`: each extra of `.[...]` exists in pyproject.toml; other requirements parse.
- python snippets compile, and every `deepeyes_jax` import and `module.attribute` they use exists.
`[--flag v]` is an optional flag (audited too); `FILE[:a|b]` audits FILE, FILE:a and FILE:b; a standalone `...` means
"more flags": it is dropped, and the command is then partial, as an inline mention of a program is: a required flag
or a config field that must be set may be missing, nothing else may be wrong.

A command the audit cannot classify fails its test: a new documented command must be audited here (or, when it is
not ours, listed in `NOT_OURS` with the reason).
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import copy
import dataclasses
import functools
import importlib
import importlib.util
import io
import itertools
import json
import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path
from unittest import mock

import pytest
from absl import flags
from ml_collections.config_flags import config_flags
from packaging.requirements import InvalidRequirement, Requirement
from test_launch import SLURM, Env, launched_python, plus_lines, remote_command, sbatch_text, srun_argv

from deepeyes_jax import run_setup
from deepeyes_jax.config_check import ConfigError, Problems

REPO = Path(__file__).resolve().parents[1]
DOC_FILES = ["README.md", *sorted(p.relative_to(REPO).as_posix() for p in (REPO / "docs").glob("*.md"))]
DOC_FILES.append("launch/README.md")
LAUNCHERS = ["launch/tpu.sh", "launch/slurm.sh"]
NOTEBOOKS = sorted(p.relative_to(REPO).as_posix() for p in (REPO / "colab").glob("*.ipynb"))
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())

# Programs a doc may name that are not ours, with the reason the audit leaves them alone. (Other things in the docs
# that are not commands need no entry: `NAME=value` lines set the doc's shell variables; the `#SBATCH` lines of a
# script block are compared with the script launch/slurm.sh writes; the prose of an unlabelled block, such as the
# prompt text of docs/reference.md, is not read as commands.)
NOT_OURS = {
  "gcloud": "Google Cloud's CLI (launch/tpu.sh's own gcloud command lines are checked in tests/test_launch.py)",
  "tensorboard": "TensorBoard's CLI",
  "git": "git itself (the notebooks clone the user's fork; the placeholder URL is refused by the install cell)",
  ".": "shell builtin: activates the virtualenv",
  "source": "shell builtin: activates the virtualenv",
}
# `python -m` modules that are not ours: the standard library's venv (the install steps create .venv with it).
STDLIB_MODULES = {"venv": "creates the virtualenv the other install commands fill"}
PIP_OPTIONS = {"-q", "--quiet", "-U", "--upgrade", "--no-deps"}
SHELL_LANGS = {"bash", "sh", "shell", "console"}
INLINE_PREFIXES = ("python -m ", "python -c ", "launch/", "pip install", ".venv/bin/")
COMMAND_START = re.compile(r"(python3? |pip3? |launch/|\.venv/bin/)")
PLACEHOLDER_REPO = "github.com/ORG/"
PLACEHOLDER_NOTE = "# ORG: your fork (a placeholder)"


# ml_collections loads every config file with importlib's deprecated load_module(): one warning per config loaded.
pytestmark = pytest.mark.filterwarnings("ignore:the load_module:DeprecationWarning")


class AuditError(AssertionError):
  """What is wrong with a documented command."""


@dataclasses.dataclass
class Snippet:
  """One documented command. ``where``: ``path:line`` (notebooks: ``path:cellN:line``). ``kind``: shell (a command
  line) | inline (a code span) | python (a fenced snippet) | script (a launcher's output shown in a doc). ``argv``:
  shell words, the doc's shell variables expanded (shell and inline). ``extra``: ``env`` (the variables the doc
  exported before it), ``names`` (a notebook line: the names its cells set before it), ``writer`` (a script: the
  launcher command before it), ``error`` (why it cannot even be read)."""

  path: str
  where: str
  kind: str
  text: str
  argv: list[str] | None = None
  extra: dict = dataclasses.field(default_factory=dict)


# --------------------------------------------------------------------------------------------------------------------
# Extraction


def _expand(text: str, variables: dict[str, str]) -> str:
  """``$NAME`` / ``${NAME}`` of the doc's own shell variables replaced by their values (others are left alone)."""
  return re.sub(r"\$\{?(\w+)\}?", lambda m: variables.get(m.group(1), m.group(0)), text)


def shell_words(text: str, variables: dict[str, str], exported: set[str] | None = None) -> list[str]:
  """The words of a shell command line as a shell splits them (``$L`` unquoted is several words), comments dropped.
  A line of assignments only (``NAME=x ZONE=y L="--name $NAME"``, or ``export NAME=x``) sets ``variables``, left
  to right, adds exported names to ``exported``, and gives []."""
  raw = shlex.split(text, comments=True)
  export = raw[:1] == ["export"]
  names = raw[1:] if export else raw
  if names and all(re.match(r"[A-Za-z_]\w*=", w) for w in names):
    for word in names:
      name, value = word.split("=", 1)
      variables[name] = _expand(value, variables)
      if export and exported is not None:
        exported.add(name)
    return []
  return shlex.split(_expand(text, variables), comments=True)


def _logical_lines(lines: list[tuple[int, str]]) -> list[tuple[int, str]]:
  """(first line number, text) per command: ``\\`` continuations joined; a quote still open at the end of a line
  goes on over the next (a multi-line ``--command '...'``)."""
  out, buf, start = [], "", None
  for no, raw in lines:
    start = no if start is None else start
    stripped = raw.rstrip()
    if stripped.endswith("\\"):
      buf += stripped[:-1] + " "
      continue
    buf += raw
    try:
      shlex.split(buf, comments=True)
    except ValueError:  # no closing quotation yet
      buf += "\n"
      continue
    out.append((start, buf))
    buf, start = "", None
  if buf.strip():
    out.append((start, buf))  # a quote never closed: the audit reports it
  return out


class _Collector:
  """Snippets of one file in document order, with the state that carries over between blocks: the shell variables
  set so far and the last ``launch/slurm.sh`` command (the writer of a script block that follows it)."""

  def __init__(self, path: str):
    self.path = path
    self.snippets: list[Snippet] = []
    self.variables: dict[str, str] = {}
    self.exported: set[str] = set()  # variables a launcher run by a later command sees in its environment
    self.writer: list[str] | None = None
    self._ids: set[str] = set()

  def add(self, where: str, kind: str, text: str, **extra) -> Snippet:
    base = key = f"{self.path}:{where}"
    for n in itertools.count(2):  # several commands on one line: path:line, path:line#2, ...
      if key not in self._ids:
        break
      key = f"{base}#{n}"
    self._ids.add(key)
    self.snippets.append(Snippet(self.path, key, kind, text, extra=extra))
    return self.snippets[-1]

  def shell_block(self, lines: list[tuple[int, str]], loc=str, commands_only: bool = False) -> None:
    """Commands of a shell block (``commands_only``: an unlabelled block, where only indented lines and lines that
    start like a command are commands, the rest prose). ``loc(line_no)`` names a line."""
    previous: str | None = None
    if commands_only:
      lines = [(no, s) for no, s in lines if s.startswith("    ") or COMMAND_START.match(s.strip())]
      lines = [(no, s.strip()) for no, s in lines]
    for no, text in _logical_lines(lines):
      try:
        words = shell_words(text, self.variables, self.exported)
      except ValueError as e:  # an unclosed quote
        self.add(loc(no), "shell", text, error=f"cannot split the command ({e})")
        continue
      if not words:
        continue  # a comment, or shell variables (kept for the lines after)
      if words[0] == "...":  # "the previous command, plus these flags"
        if previous is None:
          self.add(loc(no), "shell", text, error="starts with '...' but no command precedes it in its block")
          continue
        words = shlex.split(previous) + words[1:]
        text = shlex.join(words)
      else:
        previous = shlex.join(words)
      env = {name: self.variables[name] for name in self.exported}
      self.add(loc(no), "shell", text.strip(), env=env).argv = words
      if words[0] == "launch/slurm.sh":
        self.writer = words

  def markdown(self, text: str, loc=lambda no: str(no)) -> None:
    """Fenced blocks and inline spans of a markdown text (a file, or a notebook's markdown cell)."""
    lines = text.split("\n")
    prose = list(lines)  # the text outside fenced blocks, for the inline spans
    i = 0
    while i < len(lines):
      m = re.match(r"\s*```\s*([\w+-]*)\s*$", lines[i])
      if not m:
        i += 1
        continue
      lang, start = m.group(1).lower(), i
      end = next((j for j in range(i + 1, len(lines)) if re.match(r"\s*```\s*$", lines[j])), len(lines))
      body = [(no + 1, lines[no]) for no in range(start + 1, end)]
      for no in range(start, min(end + 1, len(lines))):
        prose[no] = ""
      if body and body[0][1].startswith("#!"):
        self.add(loc(start + 2), "script", "\n".join(s for _, s in body), writer=self.writer)
      elif lang == "python":
        self.add(loc(start + 2), "python", "\n".join(s for _, s in body))
      elif lang in SHELL_LANGS:
        self.shell_block(body, loc)
      elif lang == "":
        self.shell_block(body, loc, commands_only=True)
      i = end + 1
    # Inline spans may wrap lines: searched in the prose with its line breaks, reported at their first line.
    joined = "\n".join(prose)
    for m in re.finditer(r"(?<!`)`((?:[^`\n]|\n(?!\s*\n))+)`(?!`)", joined):  # within a paragraph
      span = " ".join(m.group(1).split())
      if span.startswith(INLINE_PREFIXES):
        snippet = self.add(loc(joined.count("\n", 0, m.start()) + 1), "inline", span)
        try:
          snippet.argv = shell_words(span, dict(self.variables))
        except ValueError as e:
          snippet.extra["error"] = f"cannot split the command ({e})"

  def notebook(self, nb: dict) -> None:
    names: set[str] = set()
    for c, cell in enumerate(nb["cells"]):
      src = "".join(cell["source"])
      if cell["cell_type"] == "markdown":
        self.markdown(src, loc=lambda no, c=c: f"cell{c}:{no}")
        continue
      if cell["cell_type"] != "code":
        continue
      for no, line in enumerate(src.split("\n"), start=1):
        names.update(re.findall(r"^\s*([A-Za-z_]\w*)\s*=", line))  # assigned by this line or an earlier one
        s = line.strip()
        if s.startswith(("%pip ", "!")):  # IPython: %pip install ..., !git clone ...
          self.add(f"cell{c}:{no}", "shell", s[1:], names=set(names)).argv = shlex.split(s[1:])
      for call in _process_calls(src):
        argv = _call_argv(call)
        snippet = self.add(f"cell{c}:{call.lineno}", "shell", ast.unparse(call))
        if isinstance(argv, str):
          snippet.extra["error"] = argv
        else:
          snippet.argv = argv


def _process_calls(src: str) -> list[ast.Call]:
  """``subprocess.*`` / ``os.system`` calls of a code cell (its magics blanked out: they are not Python)."""
  code = "\n".join("" if ln.strip().startswith(("%", "!")) else ln for ln in src.split("\n"))
  calls = []
  for node in ast.walk(ast.parse(code)):
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and isinstance(node.func.value, ast.Name):
      if (node.func.value.id, node.func.attr) in {("os", "system")} or node.func.value.id == "subprocess":
        calls.append(node)
  return calls


def _call_argv(call: ast.Call) -> list[str] | str:
  """The argv of a subprocess call with a literal command, else why it cannot be audited."""
  if call.args:
    try:
      value = ast.literal_eval(call.args[0])
    except ValueError:
      return "a command that is not a literal: write it out, or audit it in tests/test_doc_commands.py"
    return shlex.split(value) if isinstance(value, str) else [str(v) for v in value]
  return "a call without a command"


def extract() -> list[Snippet]:
  out = []
  for path in DOC_FILES:
    c = _Collector(path)
    c.markdown((REPO / path).read_text())
    out += c.snippets
  for path in LAUNCHERS:  # the examples of their --help
    help_text = subprocess.run(["bash", str(REPO / path), "--help"], capture_output=True, text=True).stdout
    lines = help_text.split("\n")
    start = next(i for i, ln in enumerate(lines) if re.fullmatch(r"Examples?:", ln))
    name = Path(path).name
    body = [(no, ln.strip().replace(name, path, 1)) for no, ln in enumerate(lines[start + 1 :], start=start + 2)]
    c = _Collector(f"{path} --help")
    c.shell_block([(no, ln) for no, ln in body if ln])
    out += c.snippets
  for path in NOTEBOOKS:
    c = _Collector(path)
    c.notebook(json.loads((REPO / path).read_text()))
    out += c.snippets
  return out


SNIPPETS = extract()

# --------------------------------------------------------------------------------------------------------------------
# Our programs: their flags, defined the way each program defines them


CONFIG = "config file flag"


def _defined_by(define) -> dict:
  """The flags ``define()`` adds to absl's global FLAGS, as copies (a config file flag as ``CONFIG``); they are
  removed from FLAGS again, so several programs' flags (several define --checkpoint) can be audited in one process."""
  fv = flags.FLAGS
  before = set(fv)
  try:
    define()
    new = set(fv) - before
    return {n: CONFIG if config_flags.is_config_flag(fv[n]) else copy.deepcopy(fv[n]) for n in new}
  finally:
    for name in set(fv) - before:
      delattr(fv, name)


class _Parser(Exception):
  def __init__(self, parser):
    self.parser = parser


@functools.cache
def entry_point(module: str):
  """(kind, definition) of the program ``python -m module`` runs: ("absl", {name: flag}) or ("argparse", parser)."""
  spec = importlib.util.find_spec(module)
  if spec is None:
    raise AuditError(f"no module {module}")
  name = f"{module}.__main__" if spec.submodule_search_locations is not None else module
  fresh = name not in sys.modules
  mod = importlib.import_module(name)
  if hasattr(mod, "_define_flags"):  # our CLIs define their flags only when run as a program
    return "absl", _defined_by(mod._define_flags)
  if hasattr(mod, "argparse"):
    with mock.patch.object(argparse.ArgumentParser, "parse_args", side_effect=_capture_parser, autospec=True):
      try:
        (mod.parse_args if hasattr(mod, "parse_args") else mod.main)([])
      except _Parser as p:
        return "argparse", p.parser
  # Flags defined at import (absl registers them under the module's name). Imported here first: the module is
  # forgotten again with its flags, so that a later import defines them.
  fv = flags.FLAGS
  own = {f.name: f for f in fv.flags_by_module_dict().get(name, [])}
  if own:
    definition = {n: CONFIG if config_flags.is_config_flag(f) else copy.deepcopy(f) for n, f in own.items()}
    if fresh:
      for n in own:
        delattr(fv, n)
      sys.modules.pop(name)
    return "absl", definition
  raise AuditError(f"{name} defines no absl flags and no argparse parser the audit can find")


def _capture_parser(self, *args, **kwargs):
  raise _Parser(self)


# The checks each program runs on its config before anything loads.
def _validate_train(config, fv) -> None:
  from deepeyes_jax.rl import train_config

  train_config.validate(config)


def _validate_evaluate(config, fv) -> None:
  from deepeyes_jax import evaluate
  from deepeyes_jax.eval import config as eval_config

  eval_config.validate(config)
  try:
    evaluate.settings(config)
  except ValueError as e:
    raise ConfigError("evaluation settings", [str(e)]) from None


def _validate_aot(config, fv) -> None:
  from deepeyes_jax import aot
  from deepeyes_jax.eval import config as eval_config

  if fv["topology"].value is not None:
    try:
      aot.parse_slice(fv["topology"].value)
    except ValueError as e:
      raise AuditError(f"--topology: {e}") from None
  unknown = sorted(set(fv["functions"].value) - set(aot.FUNCTIONS))
  if unknown:
    raise AuditError(f"--functions: unknown {unknown}; known: {', '.join(aot.FUNCTIONS)}")
  p = Problems()
  run_setup.model_problems(p, config)
  eval_config.check_mesh(p, config.mesh)
  p.raise_if_any("aot command line")


VALIDATE = {
  "deepeyes_jax.train": _validate_train,
  "deepeyes_jax.evaluate": _validate_evaluate,
  "deepeyes_jax.aot": _validate_aot,
}


def _unset_only(problems: list[str]) -> bool:
  return all(": must be set" in p for p in problems)


def audit_program(args: list[str], partial: bool) -> None:
  """``python -m args[0] args[1:]``, one variant per optional alternative."""
  module, rest = args[0], args[1:]
  kind, definition = entry_point(module)
  for variant in optional_variants(rest):
    if kind == "argparse":
      err = io.StringIO()
      with contextlib.redirect_stderr(err):
        try:
          definition.parse_args(variant)
        except SystemExit:
          raise AuditError(f"{module} {shlex.join(variant)}: {err.getvalue().strip()}") from None
    else:
      _audit_absl(module, definition, variant, partial)


def _audit_absl(module: str, definition: dict, args: list[str], partial: bool) -> None:
  fv = flags.FlagValues()
  for name, flag in definition.items():
    if flag is CONFIG:
      config_flags.DEFINE_config_file(name, None, "", flag_values=fv)
    else:
      fv[name] = copy.deepcopy(flag)
      if partial:  # a partial command may leave out a required flag (the flags' only validators here)
        fv[name].validators = []
  argv = [module, *args]
  with mock.patch.object(sys, "argv", argv):  # ml_collections reads the overrides from sys.argv, as in the program
    problem = run_setup.config_file_problem(argv, fv) or run_setup.config_override_problem(argv, fv)
    if problem:
      raise AuditError(problem)
    try:
      rest = fv(argv)
    except flags.Error as e:
      raise AuditError(f"{module}: {e}") from None
  if rest[1:]:
    raise AuditError(f"{module}: arguments {rest[1:]} are no flags (the program ignores them)")
  for name, flag in definition.items():
    if flag is CONFIG and fv[name].present and module in VALIDATE:
      try:
        VALIDATE[module](fv[name].value, fv)
      except ConfigError as e:
        if not (partial and _unset_only(e.problems)):
          raise AuditError(str(e)) from None
      except Exception as e:  # a config the program's validation cannot even read (the wrong kind of config)
        source = run_setup._config_argument(args, name)
        raise AuditError(f"{module} --{name}={source}: {type(e).__name__}: {e}") from None


def optional_variants(args: list[str]) -> list[list[str]]:
  """``[--flag v]`` -> ``--flag v`` (optional flags are audited too); ``FILE[:a|b]`` -> FILE, FILE:a, FILE:b."""
  choices = []
  for word in args:
    if word.startswith("[") and len(word) > 1:
      word = word[1:]
    if word.endswith("]") and "[" not in word:
      word = word[:-1]
    m = re.fullmatch(r"(.+?)\[:(.+)\]", word)
    choices.append([m.group(1)] + [f"{m.group(1)}:{alt}" for alt in m.group(2).split("|")] if m else [word])
  return [list(v) for v in itertools.product(*choices)]


# --------------------------------------------------------------------------------------------------------------------
# Other commands


def audit_pip(args: list[str], partial: bool) -> None:
  if args[:1] != ["install"]:
    raise AuditError(f"pip {shlex.join(args)}: only `pip install` is audited")
  extras = PYPROJECT["project"]["optional-dependencies"]
  words = iter(args[1:])
  for word in words:
    if word in ("-e", "--editable"):
      word = next(words, "")
      if not word and partial:  # a mention of `pip install -e`
        continue
    elif word.startswith("-"):
      if word not in PIP_OPTIONS:
        raise AuditError(f"pip option {word}: not one the audit knows ({', '.join(sorted(PIP_OPTIONS))})")
      continue
    if re.fullmatch(r"\{\w+\}", word):  # a notebook variable (set at run time; tests/test_notebooks.py runs it)
      continue
    m = re.fullmatch(r"\.(?:\[(.*)\])?", word)
    if m:
      missing = [e for e in (m.group(1) or "").split(",") if e and e not in extras]
      if missing:
        raise AuditError(f"pip install {word}: no extra {missing} in pyproject.toml (extras: {', '.join(extras)})")
      continue
    try:
      Requirement(word)
    except InvalidRequirement as e:
      raise AuditError(f"pip install {word}: not a requirement ({e})") from None


def audit_pytest(args: list[str]) -> None:
  markers = {m.split(":")[0].strip() for m in PYPROJECT["tool"]["pytest"]["ini_options"]["markers"]}
  for i, word in enumerate(args):
    if word == "-m":
      used = set(re.findall(r"\w+", args[i + 1])) - {"and", "or", "not"}
      if used - markers:
        raise AuditError(f"pytest -m {args[i + 1]!r}: marker(s) {sorted(used - markers)} not declared in pyproject")


def _with_flag(args: list[str], flag: str) -> list[str]:
  """``flag`` for the launcher itself: before a ``--`` (after it, arguments go to the python program)."""
  i = args.index("--") if "--" in args else len(args)
  return [*args[:i], flag, *args[i:]]


def audit_launch(argv: list[str], partial: bool, env: Env, exported: dict[str, str]) -> None:
  script = REPO / argv[0]
  args = argv[1:]
  if not (script.is_file() or (not args and script.exists())):
    raise AuditError(f"no such file {argv[0]}")
  if not any(a.startswith("-") for a in args):  # a mention (`launch/tpu.sh setup`): a subcommand it has
    if args:
      p = env.run(script, args[0], "--help", check_rc=None)
      if p.returncode != 0:
        raise AuditError(f"{argv[0]} {args[0]} --help: exit status {p.returncode}\n{p.stderr}")
    return
  for variant in optional_variants(args):
    p = env.run(script, *_with_flag(variant, "--dry-run"), extra_env=exported, check_rc=None)
    if p.returncode != 0:
      raise AuditError(f"{argv[0]} {shlex.join(variant)} --dry-run: exit status {p.returncode}\n{p.stderr}")
    for program in generated_programs(argv[0], variant, p.stdout):
      audit_program(program, partial)


def generated_programs(script: str, args: list[str], stdout: str) -> list[list[str]]:
  """The ``python -m deepeyes_jax...`` command lines a launcher's dry run shows (module first)."""
  programs = []
  if "# sbatch script" in stdout:
    programs.append(srun_argv(sbatch_text(stdout))[5:])  # srun ... bash -c '... exec python -m "$@"' MODULE ARGS
  for line in plus_lines(stdout):
    if line[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh"] and "nohup " in remote_command(line):
      cmd = launched_python(remote_command(line))
      programs.append(cmd[cmd.index("-m") + 1 :])
  if args[0] in ("train", "eval") and not programs:
    raise AuditError(f"{script} {args[0]}: found no python command line in its dry run:\n{stdout}")
  return programs


def audit_script(snippet: Snippet, env: Env) -> None:
  """A script a doc shows as written by the launcher command before it: every line it shows (``/path/to/
  deepeyes_jax`` is the checkout) is a line of what the launcher writes, in order; a line ending in ``...`` (the doc
  abridges) starts one."""
  writer = snippet.extra.get("writer")
  if not writer or writer[0] != "launch/slurm.sh":
    raise AuditError("a script block must follow the launch/slurm.sh command that writes it")
  p = env.run(SLURM, *_with_flag(optional_variants(writer[1:])[0], "--write-only"))

  def lines(text: str) -> list[str]:
    return [ln.strip() for ln in text.replace("\\\n", " ").split("\n") if ln.strip()]

  written = iter(lines(p.stdout))
  for line in lines(snippet.text.replace("/path/to/deepeyes_jax", str(REPO))):
    abridged = line.endswith("...")
    want = " ".join(line.removesuffix("...").split())
    if not any((" ".join(w.split()).startswith(want) if abridged else " ".join(w.split()) == want) for w in written):
      raise AuditError(f"{line!r} is not (in this order) a line of the script it writes:\n{p.stdout}")


def audit_python_snippet(src: str, name: str) -> None:
  """Compiles; every ``deepeyes_jax`` import and every attribute of an imported ``deepeyes_jax`` module exists."""
  tree = ast.parse(compile(src, name, "exec", ast.PyCF_ONLY_AST))
  modules = {}
  for node in ast.walk(tree):
    if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "deepeyes_jax":
      mod = importlib.import_module(node.module)
      for alias in node.names:
        if not hasattr(mod, alias.name):
          try:
            importlib.import_module(f"{node.module}.{alias.name}")
          except ModuleNotFoundError:
            raise AuditError(f"line {node.lineno}: cannot import {alias.name} from {node.module}") from None
        value = getattr(mod, alias.name)
        if isinstance(value, type(sys)):
          modules[alias.asname or alias.name] = value
    elif isinstance(node, ast.Import):
      for alias in node.names:
        if alias.name.split(".")[0] == "deepeyes_jax":
          mod = importlib.import_module(alias.name)
          modules[alias.asname or "deepeyes_jax"] = mod if alias.asname else importlib.import_module("deepeyes_jax")
  for node in ast.walk(tree):
    if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in modules:
      if not hasattr(modules[node.value.id], node.attr):
        raise AuditError(f"line {node.lineno}: {modules[node.value.id].__name__} has no {node.attr}")


def audit_command(argv: list[str], snippet: Snippet, env: Env) -> None:
  """One simple command (no ``&&``)."""
  partial = snippet.kind == "inline" or "..." in argv
  argv = [a for a in argv if a != "..."]
  prog = argv[0]
  if snippet.extra.get("names") is not None:  # a notebook line: {NAME} is a variable the cells set before it
    unset = [w for w in argv if re.fullmatch(r"\{\w+\}", w) and w[1:-1] not in snippet.extra["names"]]
    if unset:
      raise AuditError(f"{unset}: not set by an earlier line of the notebook")
  if prog in ("python", "python3") or prog.endswith("/python"):
    if argv[1:2] == ["-c"]:
      compile(argv[2], snippet.where, "exec")
    elif argv[1:2] != ["-m"] or len(argv) < 3:
      raise AuditError("python without -m MODULE: not a command the audit knows")
    elif argv[2].split(".")[0] == "deepeyes_jax":
      audit_program(argv[2:], partial)
    elif argv[2] == "pytest":
      audit_pytest(argv[3:])
    elif argv[2] == "pip":
      audit_pip(argv[3:], partial)
    elif argv[2] not in STDLIB_MODULES:
      raise AuditError(f"python -m {argv[2]}: not a module the audit knows")
  elif prog in ("pip", "pip3") or prog.endswith("/pip"):
    audit_pip(argv[1:], partial)
  elif prog.startswith("launch/"):
    audit_launch(argv, partial, env, snippet.extra.get("env", {}))
  elif prog not in NOT_OURS:
    raise AuditError(f"{prog}: not a command the audit knows; audit it in {Path(__file__).name} or list it in NOT_OURS")


def audit(snippet: Snippet, env: Env) -> None:
  if "error" in snippet.extra:
    raise AuditError(snippet.extra["error"])
  if snippet.kind == "python":
    audit_python_snippet(snippet.text, snippet.where)
  elif snippet.kind == "script":
    audit_script(snippet, env)
  else:
    if not snippet.argv:
      raise AuditError("an empty command")
    commands = [list(g) for sep, g in itertools.groupby(snippet.argv, lambda w: w in ("&&", "||", ";")) if not sep]
    for argv in commands:
      audit_command(argv, snippet, env)


# --------------------------------------------------------------------------------------------------------------------
# Tests

# Commands the docs show that fail for a reason outside the files of this audit: strict xfails, so that each is
# removed when its cause is fixed.
KNOWN_FAILURES: dict[tuple[str, str], str] = {}  # (path, command prefix) -> why it fails today (a strict xfail)


def _marks(s: Snippet):
  for (path, prefix), reason in KNOWN_FAILURES.items():
    if s.path == path and s.text.startswith(prefix):
      return [pytest.mark.xfail(strict=True, raises=AuditError, reason=reason)]
  return []


@pytest.fixture
def env(tmp_path, monkeypatch):
  monkeypatch.chdir(REPO)  # the docs' commands run in the checkout (configs/... relative to it)
  return Env(tmp_path)


@pytest.mark.parametrize(
  "snippet", [pytest.param(s, marks=_marks(s), id=s.where) for s in SNIPPETS if s.kind != "python"]
)
def test_documented_command(snippet, env):
  try:
    audit(snippet, env)
  except AuditError as e:
    raise AuditError(f"{snippet.where}: {snippet.text}\n{e}") from None


@pytest.mark.parametrize("snippet", [pytest.param(s, id=s.where) for s in SNIPPETS if s.kind == "python"])
def test_documented_python_snippet(snippet):
  try:
    audit(snippet, None)
  except (AuditError, SyntaxError, ImportError) as e:
    raise AuditError(f"{snippet.where}:\n{snippet.text}\n{type(e).__name__}: {e}") from None


def _find(path: str, start: str) -> Snippet:
  found = [s for s in SNIPPETS if s.path == path and s.text.startswith(start)]
  assert found, f"no snippet of {path} starts with {start!r}"
  return found[0]


def test_extraction_finds_every_kind_of_documented_command():
  """Each way the docs write a command is found, with its continuation lines, variables and optional parts."""
  train = _find("docs/training.md", "python -m deepeyes_jax.train --config configs/deepeyes_7b.py")
  assert train.argv[-1] == "--config.data.train=/data/deepeyes47k/*.parquet"  # joined over `\`, quotes removed
  create = _find("launch/README.md", "launch/tpu.sh create")
  assert create.argv[:6] == ["launch/tpu.sh", "create", "--name", "deepeyes-v5p64", "--zone", "us-east5-a"]  # $L
  assert create.where == f"launch/README.md:{create_line()}"
  ssh = _find("launch/README.md", "gcloud compute tpus tpu-vm ssh")
  assert ssh.argv[-1].startswith("mkdir -p ~/ckpt ~/data &&") and "deepeyes47k" in ssh.argv[-1]  # a quote over lines
  unshuffled = _find("docs/config_reference.md", "python -m deepeyes_jax.evaluate --config configs/eval_vstar.py")
  assert any(s.text.endswith("--config.shuffle_options=False") and s.argv[:4] == unshuffled.argv[:4] for s in SNIPPETS)
  wrapped = _find("docs/benchmarks.md", "python -m deepeyes_jax.perf.sampling")  # an inline span over two lines
  assert wrapped.kind == "inline" and wrapped.argv[-2:] == ["--hf_device", "cuda]"]
  assert _find("README.md", "pip install -e '.[tpu]'").kind == "inline"
  assert _find("launch/README.md", "#!/bin/bash").kind == "script"
  assert _find("README.md", "import jax.numpy as jnp").kind == "python"
  pip = _find("colab/quickstart.ipynb", "pip install -q {REPO}")
  assert pip.where.startswith("colab/quickstart.ipynb:cell3:") and "REPO" in pip.extra["names"]
  assert _find("colab/synthetic_training.ipynb", "git clone").argv[0] == "git"
  infer = [
    s for s in SNIPPETS if s.path == "colab/quickstart.ipynb" and s.text.startswith("python -m deepeyes_jax.infer")
  ]
  assert [s.kind for s in infer] == ["inline", "shell"]  # a markdown cell's span, and its fenced block
  assert _find("launch/tpu.sh --help", "launch/tpu.sh eval").argv[-1] == "--config.data_path=../data/vstar_bench"
  ids = [s.where for s in SNIPPETS]
  assert len(ids) == len(set(ids)) and len(SNIPPETS) > 60


def create_line() -> int:
  lines = (REPO / "launch/README.md").read_text().split("\n")
  return next(i for i, ln in enumerate(lines, start=1) if ln.startswith("launch/tpu.sh create"))


def _doc(tmp_path, text: str) -> Snippet:
  c = _Collector("doc.md")
  c.markdown(text)
  assert c.snippets, text
  return c.snippets[-1]


BAD = [
  ("```bash\nfrobnicate --all\n```", "frobnicate: not a command the audit knows"),
  ("```bash\npython -m deepeyes_jax.nope --x\n```", "no module deepeyes_jax.nope"),
  ("`python -m deepeyes_jax.train --config configs/synthetic.py --workdir W --nope`",
   "Unknown command line flag 'nope'"),
  (
    "```bash\npython -m deepeyes_jax.train --config configs/synthetic.py --workdir W --config.rl.grup_size=4\n```",
    "--config.rl.grup_size: no such field; did you mean rollout.group_size?",
  ),
  ("```bash\npython -m deepeyes_jax.train --config configs/nope.py --workdir W\n```", "no such config file"),
  ("```bash\npython -m deepeyes_jax.train --config configs/synthetic.py\n```", "Flag --workdir must have a value"),
  (
    "```bash\npython -m deepeyes_jax.train --config configs/synthetic.py --workdir W --config.optim.grad_clip=-1\n```",
    "config.optim.grad_clip=-1.0: must be a finite number > 0",
  ),
  ("`python -m deepeyes_jax.train --config configs/deepeyes_7b.py --workdir W stray`", "are no flags"),
  ("`python -m deepeyes_jax.train --config configs/eval_vstar.py`", "AttributeError"),
  (
    "```bash\npython -m deepeyes_jax.evaluate --config configs/eval_vstar.py --config.num_samples=8 ...\n```",
    "config.num_samples=8: must be 1 with rollout.temperature=0",
  ),
  ("`python -m deepeyes_jax.export --workdir W --out O [--dtype float16]`", "--dtype"),
  ("`python -m deepeyes_jax.aot --config configs/deepeyes_7b.py --topology v9z-64`", "unknown topology 'v9z-64'"),
  ("`python -m deepeyes_jax.perf.attention --quick --nope`", "unrecognized arguments: --nope"),
  ("`pip install -e '.[test,nope]'`", "no extra ['nope'] in pyproject.toml"),
  ("```bash\nlaunch/tpu.sh create --name p --zone us-central2 --accelerator-type v4-8 --version v\n```", "--zone"),
  ("```bash\nlaunch/tpu.sh frobnicate\n```", "exit status 2"),
  ("```bash\nlaunch/tpu.sh eval --name p --zone us-east5-a --config configs/eval_vstar.py -- --config.nope=1\n```",
   "--config.nope: no such field"),
  ("```python\nfrom deepeyes_jax.models import qwen2_5_vl as qvl\nqvl.load_pretrained('x')\n```",
   "has no load_pretrained"),
  ("```python\nfrom deepeyes_jax.processing.chat import no_such_name\n```", "cannot import no_such_name"),
  ("```python\nprint(\n```", "SyntaxError"),
  ("```\n#!/bin/bash\n#SBATCH --nodes=4\n```", "must follow the launch/slurm.sh command"),
  ("```bash\nlaunch/slurm.sh train --nodes 4 --gpus-per-node 8 --time 60 --partition gpu --config configs/synthetic.py "
   "--workdir /w\n```\n```\n#!/bin/bash\n#SBATCH --nodes=5\n```", "'#SBATCH --nodes=5' is not (in this order) a line"),
  ("```bash\n... --config.seed=1\n```", "no command precedes it"),
  ("```bash\npython -m deepeyes_jax.train --config 'configs/synthetic.py\n```", "cannot split the command"),
  ('`python -m pytest -q -m "not fast"`', "marker(s) ['fast'] not declared"),
]  # fmt: skip


def _first_line(text: str) -> str:
  return next(ln for ln in text.split("\n") if ln and not ln.startswith("```")).strip("`")[:60]


@pytest.mark.parametrize("text,message", BAD, ids=[_first_line(t) for t, _ in BAD])
def test_the_audit_rejects_a_wrong_command(tmp_path, monkeypatch, text, message):
  """Each check can fail: a wrong command is reported with what is wrong."""
  monkeypatch.chdir(REPO)
  snippet = _doc(tmp_path, text)
  with pytest.raises((AuditError, SyntaxError)) as e:
    audit(snippet, Env(tmp_path))
  assert message in f"{type(e.value).__name__}: {e.value}"


def test_the_audit_accepts_a_partial_command_but_not_a_wrong_one(tmp_path, monkeypatch):
  """`...` and inline mentions may leave out what must be set; a required field given wrong still fails."""
  monkeypatch.chdir(REPO)
  env = Env(tmp_path)
  audit(_doc(tmp_path, "```bash\npython -m deepeyes_jax.train --config configs/deepeyes_7b.py:size=3b ...\n```"), env)
  audit(_doc(tmp_path, "`python -m deepeyes_jax.infer --checkpoint OUT ...`"), env)
  with pytest.raises(AuditError, match="Flag --image must have a value"):
    audit(_doc(tmp_path, "```bash\npython -m deepeyes_jax.infer --checkpoint OUT --question Q\n```"), env)
  wrong = "`python -m deepeyes_jax.train --config configs/deepeyes_7b.py --config.rollout.group_size=0`"
  with pytest.raises(AuditError, match="rollout.group_size=0"):
    audit(_doc(tmp_path, wrong), env)


def test_a_notebook_command_and_process_call_are_audited(tmp_path, monkeypatch):
  monkeypatch.chdir(REPO)
  env = Env(tmp_path)
  cell = lambda src: {"cell_type": "code", "source": src, "metadata": {}}  # noqa: E731
  c = _Collector("nb.ipynb")
  c.notebook({"cells": [cell("X = '.'\n%pip install -q -e {X} {Y}\nimport subprocess\nsubprocess.run(cmd)\n")]})
  pip, call = c.snippets
  with pytest.raises(AuditError, match=r"\['\{Y\}'\]: not set by an earlier line"):
    audit(pip, env)
  with pytest.raises(AuditError, match="not a literal"):
    audit(call, env)
  c = _Collector("nb.ipynb")
  c.notebook({"cells": [cell("import subprocess\nsubprocess.run(['python', '-m', 'deepeyes_jax.train', '--nope'])")]})
  with pytest.raises(AuditError, match="Unknown command line flag 'nope'"):
    audit(c.snippets[0], env)


def test_optional_variants():
  assert optional_variants(["--out", "O", "[--step", "80]", "[--greedy]"]) == [
    ["--out", "O", "--step", "80", "--greedy"]
  ]
  assert optional_variants(["--config", "c.py[:size=3b|size=tiny]"]) == [
    ["--config", "c.py"], ["--config", "c.py:size=3b"], ["--config", "c.py:size=tiny"]
  ]  # fmt: skip


def test_the_placeholder_fork_is_named_a_placeholder_wherever_a_command_uses_it():
  """`ORG` in a repository URL is not a real organisation: every documented command line that clones from it says
  so, in the same words."""
  using = [s for s in SNIPPETS if s.kind == "shell" and PLACEHOLDER_REPO in s.text and "names" not in s.extra]
  assert {s.path for s in using} == {"launch/README.md", "docs/tpu_7b.md", "launch/tpu.sh --help"}
  for s in using:
    assert PLACEHOLDER_NOTE in s.text, s.where
