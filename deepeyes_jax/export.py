"""Export a training checkpoint (orbax, in a `train` workdir) as an HF Qwen2.5-VL checkpoint directory.

    python -m deepeyes_jax.export --workdir DIR --out HF_DIR [--step N] [--base HF_BASE] [--dtype bfloat16]

Reads only the parameters of step N (default: the latest finished checkpoint) from `DIR/checkpoints`, never the
optimizer state, and writes `config.json` + safetensors in the HF layout with `save_pretrained` (transformers,
vLLM and `from_pretrained` read it), plus the tokenizer / processor files of the base checkpoint, so HF_DIR is a
complete model directory (`python -m deepeyes_jax.infer --checkpoint HF_DIR ...` works on it).

The base checkpoint (the HF directory the run started from: its config.json describes the architecture) is read
from `DIR/train_config.json`, which `train` writes; `--base` overrides it. `--mesh d,f,t` restores the parameters
sharded over a device mesh (each device reads its own shard) for models that do not fit one device; without it they
are restored to one device.
"""

from __future__ import annotations

from deepeyes_jax import cli_env

if __name__ == "__main__":  # before TensorFlow, jax and libtpu load: they read it when they start
  cli_env.quiet_environment()

import json
import logging
import os
import shutil

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from absl import app, flags
from etils import epath
from flax import nnx
from jax.sharding import SingleDeviceSharding

from deepeyes_jax import run_setup
from deepeyes_jax.models import qwen2_5_vl as qvl
from deepeyes_jax.models.qwen2_5_vl.weights import SAFE_INDEX
from deepeyes_jax.parallel import sharding as shd
from deepeyes_jax.rl.checkpoint import TRAIN_CONFIG_FILE, normalize_directory

log = logging.getLogger(__name__)

# Files of an HF model directory that describe weights: written by save_pretrained, never copied from the base.
_WEIGHT_FILES = ("config.json", SAFE_INDEX)
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".msgpack", ".h5")


class ExportError(ValueError):
  """Missing workdir / step / base checkpoint: the message says what to pass."""


def base_checkpoint(workdir: str) -> str:
  """The HF checkpoint a run started from: `model.checkpoint` of `workdir/train_config.json`, else the tiny model the
  run made in `workdir/base_model` (`config.model.tiny`)."""
  path = epath.Path(workdir) / TRAIN_CONFIG_FILE
  try:
    ckpt = json.loads(path.read_text()).get("model", {}).get("checkpoint")
  except FileNotFoundError:
    raise ExportError(f"{path} not found: pass --base HF_DIR (the checkpoint the run started from)") from None
  made = epath.Path(workdir) / "base_model"  # a tiny model made by code in the workdir (configs/synthetic.py)
  if not ckpt and (made / "config.json").exists():
    return str(made)
  if not ckpt:
    raise ExportError(f"{path} has no model.checkpoint: pass --base HF_DIR (the checkpoint the run started from)")
  return ckpt


def _saved_dtype(step_dir: epath.Path):
  """The dtype the parameters were trained in (of the first parameter in the checkpoint's metadata)."""
  meta = ocp.PyTreeCheckpointer().metadata(step_dir / "state").item_metadata["params"]
  return jnp.dtype(jax.tree.leaves(meta, is_leaf=lambda x: hasattr(x, "dtype"))[0].dtype)


def restore_params(workdir: str, config: qvl.Qwen25VLConfig, step: int | None = None, dtype=None, mesh=None):
  """(step, model) with the parameters of a training checkpoint (cast to `dtype`, default the trained dtype)."""
  # epath: local or gs://; a relative local path made absolute (orbax reads no metadata from a relative one)
  directory = epath.Path(normalize_directory(epath.Path(workdir) / "checkpoints"))
  if not directory.is_dir():
    raise ExportError(f"{directory}: no checkpoints directory (is {workdir} a train --workdir?)")
  manager = ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(read_only=True))
  steps = list(manager.all_steps())
  if step is None:
    if not steps:
      raise ExportError(f"{directory}: no finished checkpoint")
    step = max(steps)
  elif step not in steps:
    raise ExportError(f"{directory}: no checkpoint of step {step}; finished steps: {sorted(steps)}")
  dtype = jnp.dtype(dtype) if dtype is not None else _saved_dtype(directory / str(step))
  graphdef, state = nnx.split(qvl.abstract_model(config, dtype=dtype))
  device = SingleDeviceSharding(jax.devices()[0])

  def target(var):
    sharding = shd.variable_sharding(var, mesh) if mesh is not None else device
    return var.replace(jax.ShapeDtypeStruct(var.shape, dtype, sharding=sharding))

  abstract = {"params": nnx.from_flat_state([(p, target(v)) for p, v in nnx.to_flat_state(state)])}
  # partial_restore: the checkpoint also holds the optimizer state (twice the parameters); it is never read.
  out = manager.restore(
    step,
    args=ocp.args.Composite(
      state=ocp.args.PyTreeRestore(
        item=abstract, restore_args=ocp.checkpoint_utils.construct_restore_args(abstract), partial_restore=True
      )
    ),
  )
  manager.close()
  return step, nnx.merge(graphdef, out.state["params"])


def check_out_dir(out: str) -> list[str]:
  """Refuses an `out` that holds anything but an earlier export; returns the earlier export's weight files."""
  if not os.path.isdir(out) or not os.listdir(out):
    return []
  names = os.listdir(out)
  if "config.json" not in names or not any(n.endswith(".safetensors") for n in names):
    raise ExportError(f"--out {out} is not empty and holds no earlier export: choose an empty or new directory")
  return [n for n in names if n in _WEIGHT_FILES or n.endswith(_WEIGHT_SUFFIXES)]


def _replace_weights(new_dir: str, out: str, old: list[str]) -> None:
  """The weights written to `new_dir` replace the earlier export's in `out` (a 3-shard export over a 5-shard one
  would otherwise leave 2 stale shards); done only once the new ones are complete."""
  os.makedirs(out, exist_ok=True)
  for name in old:
    os.remove(os.path.join(out, name))
  for name in os.listdir(new_dir):
    os.replace(os.path.join(new_dir, name), os.path.join(out, name))
  os.rmdir(new_dir)


def copy_tokenizer_files(base: str, out: str) -> list[str]:
  """Copies everything but the weights and config.json (tokenizer, processor, chat template, generation config)."""
  copied = []
  for name in sorted(os.listdir(base)):
    src = os.path.join(base, name)
    if name.startswith(".") or not os.path.isfile(src) or name in _WEIGHT_FILES or name.endswith(_WEIGHT_SUFFIXES):
      continue
    shutil.copyfile(src, os.path.join(out, name))
    copied.append(name)
  return copied


def export(
  workdir: str,
  out: str,
  *,
  step: int | None = None,
  base: str | None = None,
  dtype=None,
  mesh=None,
  max_shard_bytes: int = 5 * 2**30,
) -> int:
  """Writes step `step` (default latest) of the run in `workdir` to `out` as an HF checkpoint. Returns the step.

  `out` must be empty or absent, or hold an earlier export (then its weight files are replaced once the new ones are
  written: no stale shard of the earlier export survives, and a failed export leaves it intact); anything else is
  refused before any work."""
  old = check_out_dir(out)
  base = base or base_checkpoint(workdir)
  config = qvl.Qwen25VLConfig.from_json_file(base)
  step, model = restore_params(workdir, config, step=step, dtype=dtype, mesh=mesh)
  # Written next to `out` first: a failure leaves an earlier export in `out` as it was.
  staging = f"{os.path.abspath(out).rstrip(os.sep)}.export-tmp"
  if jax.process_index() == 0 and os.path.exists(staging):
    shutil.rmtree(staging)  # a previous export that failed half-way
  qvl.save_pretrained(model, staging, max_shard_bytes=max_shard_bytes)
  if jax.process_index() == 0:
    _replace_weights(staging, out, old)
    copied = copy_tokenizer_files(base, out)
    log.info("step %d of %s -> %s (+ %s from %s)", step, workdir, out, ", ".join(copied) or "no other files", base)
  return step


def _define_flags() -> None:
  """The command-line flags, defined only when this module runs as a program: importing it defines none, so
  several CLI modules can live in one process (the tests import them)."""
  global _WORKDIR, _OUT, _STEP, _BASE, _DTYPE, _MESH, _SHARD_GB
  _WORKDIR = flags.DEFINE_string("workdir", None, "the train --workdir (holds checkpoints/)", required=True)
  _OUT = flags.DEFINE_string("out", None, "output HF checkpoint directory", required=True)
  _STEP = flags.DEFINE_integer("step", None, "checkpoint step (default: the latest finished one)")
  _BASE = flags.DEFINE_string("base", None, "the HF checkpoint the run started from (default: from train_config.json)")
  _DTYPE = flags.DEFINE_enum("dtype", None, ["bfloat16", "float32"], "output dtype (default: the trained dtype)")
  _MESH = flags.DEFINE_string("mesh", None, "data,fsdp,tensor mesh to restore onto (default: one device)")
  _SHARD_GB = flags.DEFINE_float("max_shard_gb", 5.0, "safetensors shard size in GiB")


def main(argv):
  del argv
  run_setup.quiet_frameworks()
  mesh = run_setup.parse_mesh(_MESH.value)
  try:
    step = export(
      _WORKDIR.value,
      _OUT.value,
      step=_STEP.value,
      base=_BASE.value,
      dtype=_DTYPE.value,
      mesh=mesh,
      max_shard_bytes=int(_SHARD_GB.value * 2**30),
    )
  except (ExportError, qvl.ConfigError) as e:
    raise app.UsageError(str(e)) from None
  print(f"exported step {step} of {_WORKDIR.value} to {_OUT.value}")


if __name__ == "__main__":
  _define_flags()
  app.run(main)
