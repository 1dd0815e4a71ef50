"""HF safetensors <-> Qwen25VL parameters.

Loading streams tensor by tensor: the model is built abstractly (`nnx.eval_shape`, no memory), then every
parameter is created with `jax.make_array_from_callback`, whose callback reads from the memory-mapped safetensors
file only the slice each device shard needs. Host RAM never holds more than one tensor (and for the large 2D
weights only one shard of it), so a 7B checkpoint never exists twice in memory.

Layouts. On disk (hub and transformers-5 `save_pretrained`) the keys are `visual.*`, `model.*`, `lm_head.weight`;
in-memory transformers-5 names (`model.visual.*`, `model.language_model.*`) are accepted too. Linear weights are
(out, in) both on disk and here (`layers.Linear`), so every device reads its shard straight from the file; the vision
qkv is (3*C, C) on disk and (C, 3, C) here; the Conv3d patch embedding (C_out, 3, 2, 14, 14) is a (C_out, 1176)
matrix here.
"""

from __future__ import annotations

import json
import logging
import os
import time
from typing import Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, SingleDeviceSharding
from safetensors import safe_open
from safetensors.numpy import save_file

from deepeyes_jax.models.qwen2_5_vl.config import Qwen25VLConfig
from deepeyes_jax.models.qwen2_5_vl.model import Qwen25VL, abstract_model
from deepeyes_jax.parallel import sharding as shd

log = logging.getLogger(__name__)

SAFE_SINGLE = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"


class CheckpointError(ValueError):
  """A checkpoint whose tensors do not match the model: names the file, key and shapes."""


# --------------------------------------------------------------------------------------------------------------
# The key map: HF key -> (our parameter path, layout kind)
# --------------------------------------------------------------------------------------------------------------
# kind: "copy" same layout (dense weights too: `layers.Linear` stores (out, in) like torch); "patch" conv kernel
# (out, C, T, P, P) <-> matrix (out, C*T*P*P); "qkv_w"/"qkv_b" the vision tower's fused qkv (an einsum kernel).
Path = tuple


def key_map(config: Qwen25VLConfig) -> dict[str, tuple[Path, str]]:
  """Every tensor a Qwen2.5-VL checkpoint of this config holds, in on-disk key layout."""
  m: dict[str, tuple[Path, str]] = {}

  def lin(hf: str, ours: Path, bias: bool):
    m[hf + ".weight"] = (ours + ("weight",), "copy")
    if bias:
      m[hf + ".bias"] = (ours + ("bias",), "copy")

  m["visual.patch_embed.proj.weight"] = (("visual", "patch_embed", "weight"), "patch")
  for i in range(config.vision.depth):
    hf, o = f"visual.blocks.{i}", ("visual", "blocks", i)
    m[f"{hf}.norm1.weight"] = (o + ("norm1", "scale"), "copy")
    m[f"{hf}.norm2.weight"] = (o + ("norm2", "scale"), "copy")
    m[f"{hf}.attn.qkv.weight"] = (o + ("attn", "qkv", "kernel"), "qkv_w")
    m[f"{hf}.attn.qkv.bias"] = (o + ("attn", "qkv", "bias"), "qkv_b")
    lin(f"{hf}.attn.proj", o + ("attn", "proj"), True)
    for n in ("gate", "up", "down"):
      lin(f"{hf}.mlp.{n}_proj", o + ("mlp", f"{n}_proj"), True)
  m["visual.merger.ln_q.weight"] = (("visual", "merger", "ln_q", "scale"), "copy")
  lin("visual.merger.mlp.0", ("visual", "merger", "fc1"), True)
  lin("visual.merger.mlp.2", ("visual", "merger", "fc2"), True)

  m["model.embed_tokens.weight"] = (("language_model", "embed_tokens", "embedding"), "copy")
  for i in range(config.text.num_hidden_layers):
    hf, o = f"model.layers.{i}", ("language_model", "layers", i)
    m[f"{hf}.input_layernorm.weight"] = (o + ("input_layernorm", "scale"), "copy")
    m[f"{hf}.post_attention_layernorm.weight"] = (o + ("post_attention_layernorm", "scale"), "copy")
    for n in ("q", "k", "v"):
      lin(f"{hf}.self_attn.{n}_proj", o + ("self_attn", f"{n}_proj"), True)
    lin(f"{hf}.self_attn.o_proj", o + ("self_attn", "o_proj"), False)
    for n in ("gate", "up", "down"):
      lin(f"{hf}.mlp.{n}_proj", o + ("mlp", f"{n}_proj"), False)
  m["model.norm.weight"] = (("language_model", "norm", "scale"), "copy")
  if not config.tie_word_embeddings:
    lin("lm_head", ("lm_head",), False)
  return m


def canonical_key(key: str) -> str:
  """Maps transformers-5 in-memory names to the on-disk layout."""
  if key.startswith("model.visual."):
    return key[len("model.") :]
  if key.startswith("model.language_model."):
    return "model." + key[len("model.language_model.") :]
  return key


def hf_shape(kind: str, shape: tuple[int, ...], config: Qwen25VLConfig) -> tuple[int, ...]:
  """The on-disk shape of a parameter of our `shape`."""
  v = config.vision
  if kind == "patch":
    return (shape[0], v.in_channels, v.temporal_patch_size, v.patch_size, v.patch_size)
  if kind == "qkv_w":
    return (shape[1] * shape[2], shape[0])
  if kind == "qkv_b":
    return (shape[0] * shape[1],)
  return tuple(shape)


def to_ours(kind: str, a: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
  """A whole on-disk tensor -> our layout."""
  if kind == "patch":
    return a.reshape(a.shape[0], -1)
  if kind == "qkv_w":
    return a.reshape(3, shape[2], shape[0]).transpose(2, 0, 1)
  if kind == "qkv_b":
    return a.reshape(shape)
  return a


def to_hf(kind: str, a: np.ndarray, config: Qwen25VLConfig) -> np.ndarray:
  """Our layout -> the on-disk tensor."""
  if kind == "patch":
    return a.reshape(hf_shape(kind, a.shape, config))
  if kind == "qkv_w":
    return a.transpose(1, 2, 0).reshape(hf_shape(kind, a.shape, config))
  if kind == "qkv_b":
    return a.reshape(-1)
  return a


# --------------------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------------------
def safetensors_files(hf_dir: str) -> list[str]:
  """The checkpoint's safetensors files: the index's shards, or the single file."""
  index = os.path.join(hf_dir, SAFE_INDEX)
  if os.path.exists(index):
    try:
      with open(index) as f:
        weight_map = json.load(f)["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
      raise CheckpointError(f"{index}: not a safetensors index with a 'weight_map' ({e})") from None
    files = sorted(set(weight_map.values()))
    missing = [f for f in files if not os.path.exists(os.path.join(hf_dir, f))]
    if missing:
      raise CheckpointError(f"{index} names shard files that do not exist: {missing}")
    return [os.path.join(hf_dir, f) for f in files]
  single = os.path.join(hf_dir, SAFE_SINGLE)
  if os.path.exists(single):
    return [single]
  raise CheckpointError(f"{hf_dir}: neither {SAFE_SINGLE} nor {SAFE_INDEX} found")


def _reader(slice_obj, kind: str, shape: tuple[int, ...], np_dtype) -> Callable:
  """Callback for make_array_from_callback: reads the shard at `index` of our layout from the file slice."""
  if kind == "copy":
    return lambda index: np.asarray(slice_obj[index]).astype(np_dtype)
  # Small tensors (patch embed, vision qkv): read whole, convert, slice.
  whole = to_ours(kind, np.asarray(slice_obj[:]), shape).astype(np_dtype)
  return lambda index: whole[index]


def from_pretrained(
  hf_dir: str | os.PathLike,
  dtype=jnp.bfloat16,
  mesh: Mesh | None = None,
  rules=shd.DEFAULT_RULES,
  attention_impl: str = "xla",
  param_dtype=None,
) -> Qwen25VL:
  """Loads an HF Qwen2.5-VL checkpoint directory (config.json + safetensors) into a `Qwen25VL`.

  Args:
    hf_dir: directory with config.json and model.safetensors or model.safetensors.index.json + shards.
    dtype: compute dtype, and the parameters' dtype unless `param_dtype` is given (tensors are cast while
      loading to the parameters' dtype; e.g. float32 master weights for bfloat16 compute).
    mesh: shard parameters over this mesh with the logical-axis `rules`; None puts them on the default device.
    attention_impl: "xla" (the reference) or a kernel of `deepeyes_jax.kernels.attention`.
  """
  hf_dir = os.fspath(hf_dir)
  config = Qwen25VLConfig.from_json_file(hf_dir)
  model = abstract_model(config, dtype=dtype, param_dtype=param_dtype)
  graphdef, state = nnx.split(model)
  flat = dict(nnx.to_flat_state(state))
  kmap = key_map(config)
  np_dtype = np.dtype(jnp.dtype(param_dtype or dtype))
  loaded: dict[Path, jax.Array] = {}
  seen: dict[str, str] = {}
  t0, nbytes = time.time(), 0
  files = safetensors_files(hf_dir)
  for fi, path in enumerate(files):
    fname = os.path.basename(path)
    with safe_open(path, framework="numpy") as f:
      for raw_key in f.keys():
        key = canonical_key(raw_key)
        if key in seen:
          raise CheckpointError(f"{fname}: tensor {raw_key!r} also appears in {seen[key]}")
        seen[key] = fname
        if key not in kmap:
          if key == "lm_head.weight" and config.tie_word_embeddings:
            log.info("%s: ignoring lm_head.weight (tie_word_embeddings=true uses embed_tokens)", fname)
            continue
          raise CheckpointError(
            f"{fname}: unknown tensor {raw_key!r} with shape {tuple(f.get_slice(raw_key).get_shape())}"
            f" for this Qwen2.5-VL config (text layers {config.text.num_hidden_layers}, vision "
            f"depth {config.vision.depth}, tie_word_embeddings {config.tie_word_embeddings})"
          )
        ours, kind = kmap[key]
        var = flat[ours]
        sl = f.get_slice(raw_key)
        want = hf_shape(kind, var.shape, config)
        got = tuple(sl.get_shape())
        if got != want:
          raise CheckpointError(f"{fname}: tensor {raw_key!r} has shape {got}, the model expects {want}")
        sharding = (
          shd.variable_sharding(var, mesh, rules) if mesh is not None else SingleDeviceSharding(jax.devices()[0])
        )
        loaded[ours] = jax.make_array_from_callback(var.shape, sharding, _reader(sl, kind, var.shape, np_dtype))
        nbytes += int(np.prod(var.shape)) * np_dtype.itemsize
    log.info("loaded %s (%d/%d): %.2f GB so far, %.1f s", fname, fi + 1, len(files), nbytes / 1e9, time.time() - t0)
  missing = [k for k, (ours, _) in kmap.items() if ours not in loaded]
  if missing:
    raise CheckpointError(f"{hf_dir}: {len(missing)} tensors missing from the checkpoint, e.g. {missing[:5]}")
  state = nnx.from_flat_state([(p, v.replace(loaded[p])) for p, v in flat.items()])
  return nnx.merge(graphdef, state).set_attention_impl(attention_impl)


# --------------------------------------------------------------------------------------------------------------
# Saving
# --------------------------------------------------------------------------------------------------------------
def _host_tensors(model: Qwen25VL) -> Iterator[tuple[str, np.ndarray]]:
  """(HF key, on-disk numpy tensor) one at a time; gathers sharded arrays across processes when needed."""
  config = model.config
  flat = dict(nnx.to_flat_state(nnx.state(model)))
  for key, (ours, kind) in key_map(config).items():
    arr = flat[ours].get_value()
    if jax.process_count() > 1 and not arr.is_fully_addressable:
      from jax.experimental import multihost_utils

      arr = multihost_utils.process_allgather(arr, tiled=True)
    yield key, np.ascontiguousarray(to_hf(kind, np.asarray(jax.device_get(arr)), config))


def save_pretrained(model: Qwen25VL, out_dir: str | os.PathLike, max_shard_bytes: int = 5 * 2**30) -> None:
  """Writes config.json and HF-layout safetensors (sharded with an index above `max_shard_bytes`).

  Holds at most one shard's worth of tensors in host memory. On multi-host runs every process must call it
  (the gathers are collective); only process 0 writes.
  """
  out_dir = os.fspath(out_dir)
  writer = jax.process_index() == 0
  if writer:
    os.makedirs(out_dir, exist_ok=True)
  current: dict[str, np.ndarray] = {}
  size = total = 0
  names: list[list[str]] = []

  def flush():
    nonlocal current, size
    if current and writer:
      tmp = os.path.join(out_dir, f".shard-{len(names):05d}.safetensors")
      save_file(current, tmp, metadata={"format": "pt"})
      names.append(list(current))
    current, size = {}, 0

  for key, a in _host_tensors(model):
    if current and size + a.nbytes > max_shard_bytes:
      flush()
    current[key] = a
    size += a.nbytes
    total += a.nbytes
  flush()
  if not writer:
    return
  n = len(names)
  weight_map = {}
  for i, keys in enumerate(names):
    final = SAFE_SINGLE if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
    os.replace(os.path.join(out_dir, f".shard-{i:05d}.safetensors"), os.path.join(out_dir, final))
    weight_map.update({k: final for k in keys})
  if n > 1:
    with open(os.path.join(out_dir, SAFE_INDEX), "w") as f:
      json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
  elif os.path.exists(os.path.join(out_dir, SAFE_INDEX)):
    os.remove(os.path.join(out_dir, SAFE_INDEX))  # a stale index would shadow the single file
  cfg = model.config.to_hf_dict()
  cfg["dtype"] = str(jnp.dtype(model.param_dtype))  # the dtype of the tensors written
  with open(os.path.join(out_dir, "config.json"), "w") as f:
    json.dump(cfg, f, indent=2)
  log.info("saved %.2f GB in %d file(s) to %s", total / 1e9, n, out_dir)
