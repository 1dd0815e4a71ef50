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
@pytest.mark.parametrize(
  "args",
  [
    # The lock-step engine: 4,096 rows x 8,192 slots of KV cache, ~17 GiB per v5e chip, over its 15.75 GiB.
    ("--config.rollout.engine=lockstep", "--rollout_rows=4096", "--config.rollout.max_total_tokens=8192"),
    # The continuous engine: a pool of 2^24 pages of 16 tokens, a quarter of it per chip.
    ("--config.rollout.kv_pages=16777216",),
  ],
  ids=["lockstep-cache", "paged-pool"],
)
def test_out_of_memory_is_reported_with_the_compilers_figure(tmp_path, args):
  rc, report, output = run_aot(tmp_path, "--functions=decode", *args)
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


def test_collective_traffic_counts_each_collective_by_its_result():
  hlo = """
  %all-gather.3 = bf16[3584,18944]{1,0} all-gather(bf16[112,18944]{1,0} %p), dimensions={0}
  %ag-start = (bf16[16,8]{1,0}, bf16[512,8]{1,0}) all-gather-start(bf16[16,8]{1,0} %x), dimensions={0}
  %ag-done = bf16[512,8]{1,0} all-gather-done((bf16[16,8]{1,0}, bf16[512,8]{1,0}) %ag-start)
  %all-reduce.1 = f32[32,152064]{1,0} all-reduce(f32[32,152064]{1,0} %y), to_apply=%add
  %rs = f32[4]{0} reduce-scatter(f32[128]{0} %z), dimensions={0}
  %cp-start = (f32[2,2]{1,0}, f32[2,2]{1,0}, u32[], u32[]) collective-permute-start(f32[2,2]{1,0} %w)
  %fusion.1 = bf16[8]{0} fusion(bf16[8]{0} %q), kind=kLoop, calls=%all-gather-like
  """
  count, nbytes = aot.collective_traffic(hlo)
  assert count == 5
  # results: 3584x18944 bf16 + 512x8 bf16 + 32x152064 f32 + 4 f32 + the permute's 2x2 f32 (not its scalars)
  assert nbytes == 3584 * 18944 * 2 + 512 * 8 * 2 + 32 * 152064 * 4 + 4 * 4 + 2 * 2 * 4
  assert aot.collective_traffic("%add = f32[4]{0} add(f32[4]{0} %a, f32[4]{0} %b)") == (0, 0)
  # Combined collectives: nested tuples, XLA's /*index=5*/ comments in long ones, an async all-reduce of two arrays.
  combined = """
  %ag = ((bf16[1,1024]{1,0}, f32[2]{0}), (bf16[4,1024]{1,0}, f32[8]{0})) all-gather-start((bf16[1,1024]{1,0} %a, f32[2]{0} %b)), dimensions={0}
  %ar = (bf16[1024]{0}, bf16[1024]{0}) all-reduce-start(bf16[1024]{0} %x, bf16[1024]{0} %y), to_apply=%add
  %big = (f32[2]{0}, f32[2]{0}, f32[2]{0}, f32[2]{0}, f32[2]{0}, /*index=5*/f32[2]{0}, f32[2]{0}) all-reduce(f32[2]{0} %a)
  """  # noqa: E501
  assert aot.collective_traffic(combined) == (3, (4 * 1024 * 2 + 8 * 4) + 2 * 1024 * 2 + 7 * 2 * 4)


def _projection_report(**model):
  return {
    "functions": [
      {"name": n, "status": "ok", "fits": True, "roofline_s": t}
      for n, t in (("grad", 2.0), ("opt_apply", 0.5), ("prefill", 3.0), ("crop", 0.25), ("decode", 0.001))
    ],
    "chips": 32,
    "peak_flops_per_chip": 1e14,
    "shapes": {
      "rollout_rows": 512, "rollout_chunks": 8, "row_len": 32768, "micro_rows": 32, "prompt_tokens": 8192,
      "prompt_grid": [1, 64, 64], "crop_grid": [1, 32, 32],
    },
    "model": {
      "text_matmul_params": 7e9, "vision_params": 0, "decoder_layers": 0, "hidden": 3584, "vision_hidden": 0,
      "vision_depth": 32, "vision_full_blocks": 4, "vision_window_patches": 64, "remat": "full", **model,
    },
  }  # fmt: skip


def test_step_projection_counts_model_flops_and_compiled_decode_steps():
  a = aot.StepAssumptions(tokens_per_trajectory=8192, turns=3, decode_steps_per_turn=1000)
  p = aot.project_step(_projection_report(), a)
  assert p["trajectories"] == 4096 and p["learner_rows"] == 1024 and p["learner_micro_steps"] == 32
  # No attention, no vision: 8 N T per trajectory under full remat (forward, recomputed forward, 2x backward).
  assert p["learner_tflop"] == pytest.approx(4096 * 8 * 7e9 * 8192 / 1e12)
  assert p["learner_s"] == pytest.approx(p["learner_tflop"] * 1e12 / (32 * 1e14) + 0.5)
  assert p["decode_s"] == pytest.approx(8 * 3 * 1000 * 0.001)  # the compiled step x steps x turns x chunks
  assert p["step_s"] == pytest.approx(p["rollout_s"] + p["learner_s"])
  no_remat = aot.project_step(_projection_report(remat="none"), a)
  assert no_remat["learner_tflop"] == pytest.approx(p["learner_tflop"] * 3 / 4)
  # Attention is quadratic in the trajectory: doubling the tokens more than doubles the learner's FLOPs.
  with_attention = _projection_report(decoder_layers=28)
  short = aot.project_step(with_attention, a)
  long = aot.project_step(with_attention, aot.StepAssumptions(16384, 3, 1000))
  assert long["learner_tflop"] > 2 * short["learner_tflop"]
  failed = _projection_report()
  failed["functions"][0]["status"] = "oom"
  assert aot.project_step(failed) is None


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

def paged_attn(b, t, pages, page, width, h, kh, d):
  from deepeyes_jax.kernels.paged_attention import paged_attention
  def f(q, k, v, pool, table, wp, wo, lens, qs, qp):
    return paged_attention(q, k, v, pool, page_table=table, write_page=wp, write_offset=wo, kv_lengths=lens,
      q_segment_ids=qs, q_positions=qp, impl="pallas")
  tok, kv, ids = sds((b, t, h, d), bf, rows), sds((b, t, kh, d), bf, rows), sds((b, t), i32, rows)
  pool = sds((pages, page, 2 * kh, d), bf, P("fsdp", None, "tensor"))
  return f, (tok, kv, kv, pool, sds((b, width), i32, rows), ids, ids, sds((b,), i32, rows), ids, ids)

cases = {
  "paged decode (ragged paged attention; 16 rows, pages of 128)": paged_attn(16, 1, 256, 128, 32, 28, 4, 128),
  "paged extend (T 256)": paged_attn(4, 256, 256, 128, 32, 28, 4, 128),
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
  tiny model's. The paged cases run jax's ragged paged attention per shard of the pool."""
  env = dict(os.environ, ALLOW_MULTIPLE_LIBTPU_LOAD="1")
  proc = subprocess.run(
    [sys.executable, "-c", _LOWER_KERNELS], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
  )
  assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
  assert proc.stdout.count("LOWERED") == 7, proc.stdout
