"""Training checkpoint (orbax, as the trainer writes it) -> HF checkpoint directory: `python -m deepeyes_jax.export`."""

import json
import os
import subprocess
import sys

import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from deepeyes_jax import export
from deepeyes_jax.models import qwen2_5_vl as qvl
from deepeyes_jax.processing.tokenizer import load_tokenizer
from deepeyes_jax.rl.checkpoint import TRAIN_CONFIG_FILE, Checkpointer
from deepeyes_jax.rl.train_step import Learner, LearnerConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _flat(state) -> dict:
  return {p: np.asarray(v.get_value()) for p, v in nnx.to_flat_state(state)}


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_vlm):
  """A workdir with checkpoints of steps 2 and 4 whose parameters differ from the base (and from each other), saved
  with the trainer's Checkpointer (parameters, AdamW state of the frozen-vision optimizer, data iterator)."""
  base = tiny_vlm[0]
  workdir = tmp_path_factory.mktemp("run")
  learner = Learner(qvl.from_pretrained(base, dtype=jnp.float32), LearnerConfig(train_vision=False))
  data = iter(grain.MapDataset.range(8).to_iter_dataset())
  ckpt = Checkpointer(str(workdir / "checkpoints"), async_save=False)
  saved = {}
  for step in (2, 4):
    leaves, treedef = jax.tree.flatten(learner.state)
    keys = jax.random.split(jax.random.key(step), len(leaves))
    learner.state = treedef.unflatten([x + 0.01 * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)])
    ckpt.save(step, learner.state, learner.opt_state, learner_step=step, data_iterator=data, force=True)
    saved[step] = _flat(learner.state)
  ckpt.close()
  (workdir / TRAIN_CONFIG_FILE).write_text(json.dumps({"model": {"checkpoint": str(base)}, "seed": 0}))
  return workdir, saved


def test_export_latest_step_round_trips_and_is_a_complete_model_dir(run, tiny_vlm, tmp_path):
  workdir, saved = run
  out = tmp_path / "hf"
  assert export.export(str(workdir), str(out)) == 4  # default: the latest step, base from train_config.json
  model = qvl.from_pretrained(out, dtype=jnp.float32)
  got = _flat(nnx.state(model))
  assert got.keys() == saved[4].keys()
  for k, v in saved[4].items():
    np.testing.assert_array_equal(got[k], v, err_msg=str(k))
  base = _flat(nnx.state(qvl.from_pretrained(tiny_vlm[0], dtype=jnp.float32)))
  assert any(not np.array_equal(base[k], v) for k, v in got.items())  # the trained weights, not the base's
  assert json.loads((out / "config.json").read_text())["dtype"] == "float32"
  assert {"tokenizer.json", "tokenizer_config.json"} <= set(os.listdir(out))
  tok, base_tok = load_tokenizer(str(out)), load_tokenizer(str(tiny_vlm[0]))
  assert tok.encode("<answer>B</answer><|im_end|>") == base_tok.encode("<answer>B</answer><|im_end|>")


def test_export_cli_step_and_dtype(run, tiny_vlm, tmp_path):
  workdir, saved = run
  out = tmp_path / "hf_bf16"
  cmd = [sys.executable, "-m", "deepeyes_jax.export", f"--workdir={workdir}", f"--out={out}", "--step=2"]
  cmd += ["--dtype=bfloat16", f"--base={tiny_vlm[0]}"]
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
  res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, cwd=ROOT)
  assert res.returncode == 0, res.stderr[-3000:]
  assert f"exported step 2 of {workdir}" in res.stdout
  assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
  got = _flat(nnx.state(qvl.from_pretrained(out, dtype=jnp.float32)))
  for k, v in saved[2].items():  # step 2, rounded once to bfloat16
    np.testing.assert_array_equal(got[k], v.astype(jnp.bfloat16).astype(np.float32), err_msg=str(k))


def test_export_sharded_restore_equals_single_device(run, tmp_path):
  workdir, saved = run
  mesh = jax.make_mesh((1, 4, 2), ("data", "fsdp", "tensor")) if jax.device_count() >= 8 else None
  if mesh is None:
    pytest.skip("needs 8 (simulated) devices")
  export.export(str(workdir), str(tmp_path / "hf"), mesh=mesh, step=4)
  got = _flat(nnx.state(qvl.from_pretrained(tmp_path / "hf", dtype=jnp.float32)))
  for k, v in saved[4].items():
    np.testing.assert_array_equal(got[k], v, err_msg=str(k))


def test_export_errors_say_what_to_pass(run, tiny_vlm, tmp_path):
  workdir, _ = run
  with pytest.raises(export.ExportError, match="no checkpoint of step 3; finished steps: \\[2, 4\\]"):
    export.export(str(workdir), str(tmp_path / "a"), step=3)
  with pytest.raises(export.ExportError, match="no checkpoints directory"):
    export.export(str(tmp_path), str(tmp_path / "b"), base=str(tiny_vlm[0]))
  (tmp_path / "run2" / "checkpoints").mkdir(parents=True)
  with pytest.raises(export.ExportError, match="pass --base HF_DIR"):
    export.export(str(tmp_path / "run2"), str(tmp_path / "c"))


def test_export_cli_relative_workdir_and_out_checks(run, tmp_path):
  """The README's relative --workdir works (orbax needs absolute paths); --out must be empty, new or an earlier
  export, whose weight files are replaced."""
  workdir, saved = run
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
  rel = os.path.relpath(workdir, tmp_path)
  cmd = [sys.executable, "-m", "deepeyes_jax.export", f"--workdir={rel}", "--out=hf"]
  res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
  assert res.returncode == 0, res.stderr[-3000:]
  assert f"exported step 4 of {rel}" in res.stdout
  (tmp_path / "hf" / "model-00009-of-00009.safetensors").write_bytes(b"stale")  # as if a bigger export was there
  export.export(str(workdir), str(tmp_path / "hf"), step=2)  # an earlier export: replaced
  assert not (tmp_path / "hf" / "model-00009-of-00009.safetensors").exists()
  got = _flat(nnx.state(qvl.from_pretrained(tmp_path / "hf", dtype=jnp.float32)))
  for k, v in saved[2].items():
    np.testing.assert_array_equal(got[k], v, err_msg=str(k))
  before = sorted(os.listdir(tmp_path / "hf"))
  with pytest.raises(export.ExportError, match="no checkpoint of step 3"):
    export.export(str(workdir), str(tmp_path / "hf"), step=3)  # a failed export leaves the earlier one intact
  assert sorted(os.listdir(tmp_path / "hf")) == before and not (tmp_path / "hf.export-tmp").exists()
  (tmp_path / "notes").mkdir()
  (tmp_path / "notes" / "todo.txt").write_text("mine")
  with pytest.raises(export.ExportError, match="is not empty and holds no earlier export"):
    export.export(str(workdir), str(tmp_path / "notes"))
  assert os.listdir(tmp_path / "notes") == ["todo.txt"]
