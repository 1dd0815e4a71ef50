"""`python -m deepeyes_jax.aot`: one training step compiled for a TPU slice on this CPU host (libtpu's topology
description and the real TPU compiler; no TPU), plus the slice table and the compiler's out-of-memory message."""

import importlib.util
import json
import os
import subprocess
import sys

import ml_collections
import pytest

from deepeyes_jax import aot

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The attention implementation the compile test traces: the TPU Pallas kernels, so that every CI run proves they
# lower with Mosaic for every shape class of a step (vision, packed rows fwd + bwd, prefill, crop, decode).
ATTENTION_IMPL = "pallas"
# The smallest config: the recipe's CPU smoke variant with the tiny model preset (1.2M parameters).
TINY = "configs/deepeyes_7b.py:size=tiny"

needs_libtpu = pytest.mark.skipif(
  importlib.util.find_spec("libtpu") is None,
  reason="libtpu is not installed (pip install -e '.[tpu]'): the TPU compiler is what this test runs",
)


def run_aot(tmp_path, *args: str, config: str = TINY, attention_impl: str = ATTENTION_IMPL, topology: str = "v5e-4"):
  """Runs the CLI in a subprocess (it loads libtpu). Returns (exit status, JSON report or None, output)."""
  out = tmp_path / "aot.json"
  env = dict(os.environ, ALLOW_MULTIPLE_LIBTPU_LOAD="1")  # other processes (pytest workers) may hold libtpu
  cmd = [
    sys.executable,
    "-m",
    "deepeyes_jax.aot",
    f"--config={config}",
    f"--topology={topology}",
    f"--json={out}",
    f"--config.model.attention_impl={attention_impl}",
    *args,
  ]
  proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  report = json.loads(out.read_text()) if out.exists() else None
  return proc.returncode, report, proc.stdout + proc.stderr


@needs_libtpu
def test_tiny_step_compiles_for_a_v5e_slice(tmp_path):
  rc, report, output = run_aot(tmp_path)
  assert report is not None, output[-3000:]
  assert rc == 0, output[-3000:]
  assert report["topology"] == "v5e-4" and report["chips"] == 4 and report["cost_analysis"] == "per chip"
  assert report["hbm_bytes_per_chip"] == aot.CHIPS["v5e"].hbm_bytes
  assert report["mesh"] == {"data": 1, "fsdp": 4, "tensor": 1}
  assert [f["name"] for f in report["functions"]] == list(aot.FUNCTIONS)
  for f in report["functions"]:
    assert f["status"] == "ok" and f["fits"], f
    assert 0 < f["peak_bytes_per_chip"] < report["hbm_bytes_per_chip"], f
    assert f["roofline_s"] > 0, f
    if f["name"] != "opt_init":  # zeros: no arithmetic
      assert f["flops"] > 0, f
    if f["name"] in ("grad", "prefill", "crop", "decode"):  # attention ran through Pallas TPU (Mosaic) kernels
      assert f["mosaic_kernels"] > 0, f
  by_name = {f["name"]: f for f in report["functions"]}
  # Donation: the optimizer update reuses the parameters' and moments' buffers, the sampler the KV cache's.
  for name in ("opt_apply", "prefill", "crop", "decode"):
    assert by_name[name]["alias_bytes"] > 0, by_name[name]
  assert "PER CHIP" in output and "grad" in output


@needs_libtpu
def test_out_of_memory_is_reported_with_the_compilers_figure(tmp_path):
  # 4,096 rows x 8,192 slots of KV cache: ~17 GiB per v5e chip, over its 15.75 GiB.
  rc, report, output = run_aot(
    tmp_path, "--functions=decode", "--rollout_rows=4096", "--config.rollout.max_total_tokens=8192"
  )
  assert rc == 1, output[-3000:]
  (f,) = report["functions"]
  assert f["name"] == "decode" and f["status"] == "oom" and not f["fits"], f
  assert f["peak_bytes_per_chip"] > report["hbm_bytes_per_chip"], f
  assert "exceeds available HBM" in f["error"]


def test_slice_names():
  expect = {
    "v5p-64": ("v5p:2x4x4", 32),
    "v5p-128": ("v5p:4x4x4", 64),
    "v5e-128": ("v5e:8x16", 128),
    "v5e-256": ("v5e:16x16", 256),
    "v6e-32": ("v6e:4x8", 32),
    "v6e-64": ("v6e:8x8", 64),
    "v6e-256": ("v6e:16x16", 256),
    "v4-64": ("v4:2x4x4", 32),
    "v5e-4": ("v5e:2x2", 4),
    "v5p:2x2x1": ("v5p:2x2x1", 4),  # a raw topology string
  }
  for name, (topology, chips) in expect.items():
    s = aot.parse_slice(name)
    assert (s.topology, s.num_chips) == (topology, chips), name
    assert s.chip.generation == topology.split(":")[0]
  assert aot.CHIPS["v5p"].hbm_bytes == int(95.74 * 2**30) and aot.CHIPS["v5e"].peak_flops == 197e12
  for bad in ("v5p-63", "v7:2x2", "tpu"):
    with pytest.raises(ValueError, match="unknown topology.*v5p-64.*v6e-256"):
      aot.parse_slice(bad)


def test_command_line_leaves_out_where_the_output_went():
  args = ["--config=c.py", "--topology", "v5p-64", "--json", "/tmp/a.json", "--markdown=/tmp/a.md", "--layers=2"]
  assert aot.command_line(args) == "python -m deepeyes_jax.aot --config=c.py --topology v5p-64 --layers=2"


def test_mesh_must_match_the_slice():
  devices = [object()] * 32  # the check comes before any device is looked at
  for mesh, match in [
    (dict(data=1, fsdp=16, tensor=1), "= 16 chips, but the slice has 32"),
    (dict(data=1, fsdp=-1, tensor=3), "3 does not divide 32"),
    (dict(data=-1, fsdp=-1, tensor=1), "at most one -1"),
  ]:
    with pytest.raises(ValueError, match=match):
      aot.slice_mesh(ml_collections.ConfigDict(mesh), devices)


def test_out_of_memory_message_parsing():
  gib = 2**30
  msg = (
    "RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO temporaries (512.00G) "
    "exceeds available HBM (95.74G)."
  )
  assert aot.parse_oom(msg) == (512 * gib, round(95.74 * gib))
  assert aot.parse_oom("XlaRuntimeError: RESOURCE_EXHAUSTED: 17.5G exceeds available HBM (15.75G)") == (
    round(17.5 * gib),
    round(15.75 * gib),
  )
  other = "RESOURCE_EXHAUSTED: Ran out of memory in memory space hbm. Used 20.50G of 15.75G hbm. Exceeded by 4.75G."
  assert aot.parse_oom(other) == (round(20.5 * gib), round(15.75 * gib))
  assert aot.parse_oom("INVALID_ARGUMENT: shapes do not match") is None


_LOWER_KERNELS = r"""
import jax, jax.numpy as jnp
from jax.experimental import mesh_utils, topologies
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from deepeyes_jax.kernels import attention, platform

devices = topologies.get_topology_desc("v5e:2x2", "tpu").devices
mesh = Mesh(mesh_utils.create_device_mesh((1, 2, 2), devices), ("data", "fsdp", "tensor"))
sds = lambda shape, dtype, spec: jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(mesh, spec))
bf, i32, rows = jnp.bfloat16, jnp.int32, P("fsdp")

def self_attn(t, h, kh, d, causal, grad):
  def f(q, k, v, seg):
    out = lambda q, k, v: attention.attention(q, k, v, q_segment_ids=seg, kv_segment_ids=seg, q_positions=seg,
      kv_positions=seg, causal=causal, impl="pallas")
    if grad:
      return jax.grad(lambda *a: out(*a).astype(jnp.float32).sum(), argnums=(0, 1, 2))(q, k, v)
    return out(q, k, v)
  kv = sds((2, t, kh, d), bf, rows)
  return f, (sds((2, t, h, d), bf, rows), kv, kv, sds((2, t), i32, rows))

def cache_attn(t, s, h, kh, d):
  def f(q, k, v, qs, ks, qp, kp):
    return attention.attention(q, k, v, q_segment_ids=qs, kv_segment_ids=ks, q_positions=qp, kv_positions=kp,
      causal=True, impl="pallas", kv_heads_major=True)
  kv = sds((2, kh, s, d), bf, rows)
  q_ids, k_ids = sds((2, t), i32, rows), sds((2, s), i32, rows)
  return f, (sds((2, t, h, d), bf, rows), kv, kv, q_ids, k_ids, q_ids, k_ids)

cases = {
  "packed rows fwd+bwd (splash; 28/4 heads, d 128)": self_attn(1024, 28, 4, 128, True, True),
  "vision segments fwd+bwd (16 heads, d 80)": self_attn(1024, 16, 16, 80, False, True),
  "vision segments fwd (d 80, 640 patches)": self_attn(640, 16, 16, 80, False, False),
  "prefill against the cache (T 512, C 2048)": cache_attn(512, 2048, 28, 4, 128),
  "decode (T 1, C 4096)": cache_attn(1, 4096, 28, 4, 128),
}
for name, (f, args) in cases.items():
  with platform.compiling_for(mesh):
    text = jax.jit(f).lower(*args).compile().as_text()
  n = text.count('custom_call_target="tpu_custom_call"')
  assert n > 0, name
  print("LOWERED", n, name, flush=True)
"""


@needs_libtpu
def test_tpu_kernels_lower_with_mosaic_at_the_models_head_dims():
  """Every shape class of the TPU attention compiles with Mosaic (libtpu's compiler) at the real models' head dims
  (vision 80, decoder 128), heads sharded over tensor and rows over fsdp; the model-level compile above uses the
  tiny model's."""
  env = dict(os.environ, ALLOW_MULTIPLE_LIBTPU_LOAD="1")
  proc = subprocess.run(
    [sys.executable, "-c", _LOWER_KERNELS], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
  )
  assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
  assert proc.stdout.count("LOWERED") == 5, proc.stdout
