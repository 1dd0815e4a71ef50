"""Run set-up shared by every entry point: distributed init, mesh, model + tokenizer + sampler, agent config, judge,
data source.

``train`` (through ``rl/trainer.py``), ``evaluate``, ``select``, ``infer`` and ``export`` set a run up through these
functions only, so that a config field means the same thing everywhere. Config is validated before anything loads
or compiles: the model block here (``model_problems`` / ``model_options``), the whole training config by
``rl/train_config.validate``, an evaluation config by ``eval/config.validate``. ``known_data_source`` is the
data-source check the data pipeline applies (the reward registry is a later layer than ``data/``).
"""

from __future__ import annotations

import contextlib
import difflib
import logging
import os
import re
import sys
from dataclasses import is_dataclass

import jax
import jax.numpy as jnp
import ml_collections
from absl import flags
from ml_collections.config_flags import config_flags as _config_flags

from deepeyes_jax import cli_env
from deepeyes_jax.agent.rollout import AgentConfig, Task
from deepeyes_jax.config_args import dataclass_from
from deepeyes_jax.config_check import ConfigError, Problems
from deepeyes_jax.data import synthetic
from deepeyes_jax.data.deepeyes import BadRecord, DeepEyesSource, check_data_source, decode_example
from deepeyes_jax.eval import config as eval_config
from deepeyes_jax.eval import tasks as tasks_lib
from deepeyes_jax.models import qwen2_5_vl as qvl
from deepeyes_jax.models.qwen2_5_vl.layers import REMAT_POLICIES
from deepeyes_jax.models.qwen2_5_vl.tiny import build_tiny_checkpoint
from deepeyes_jax.parallel import sharding as shd
from deepeyes_jax.processing import image as improc
from deepeyes_jax.processing.tokenizer import load_tokenizer
from deepeyes_jax.reward.judge import JudgeConfig, LLMJudge
from deepeyes_jax.reward.rewards import UnknownDataSourceError, get_reward_fn
from deepeyes_jax.sampling import rules
from deepeyes_jax.sampling.sampler import WEIGHT_LAYOUTS, Sampler

log = logging.getLogger(__name__)


def maybe_init_distributed() -> None:
  """Multi-process runs: `jax.distributed.initialize()`.

  Explicit: JAX_COORDINATOR_ADDRESS (host:port of process 0) + JAX_NUM_PROCESSES + JAX_PROCESS_ID (what
  `launch/slurm.sh` and the tests set). DEEPEYES_DISTRIBUTED=1 (set by `launch/tpu.sh`): JAX's own cluster
  detection (Cloud TPU pods). Also a multi-task SLURM job.
  """
  if jax.distributed.is_initialized():
    return
  if os.environ.get("JAX_COORDINATOR_ADDRESS") and os.environ.get("JAX_NUM_PROCESSES"):
    jax.distributed.initialize(
      coordinator_address=os.environ["JAX_COORDINATOR_ADDRESS"],
      num_processes=int(os.environ["JAX_NUM_PROCESSES"]),
      process_id=int(os.environ["JAX_PROCESS_ID"]),
    )
  elif os.environ.get("DEEPEYES_DISTRIBUTED") == "1" or os.environ.get("SLURM_NTASKS", "1") != "1":
    jax.distributed.initialize()


def model_dir(config: ml_collections.ConfigDict, workdir: str) -> str:
  """config.model.checkpoint, or (when it is empty and `config.model.tiny` is set) a tiny Qwen2.5-VL + tokenizer
  made by code in `workdir/base_model` (the embedded default: nothing to download)."""
  if config.model.checkpoint:
    return config.model.checkpoint
  tiny = config.model.get("tiny")
  if not tiny:
    raise ValueError("set config.model.checkpoint (an HF Qwen2.5-VL directory) or config.model.tiny")
  out = os.path.join(workdir, "base_model")
  if not os.path.exists(os.path.join(out, "config.json")):
    kw = dict(tiny.to_dict())
    corpus = synthetic.corpus(config=scene_config(config)) if kw.pop("corpus", "") == "synthetic" else ()
    if jax.process_index() == 0:
      print(f"writing a tiny Qwen2.5-VL and its tokenizer (made by code) to {out}", flush=True)
      build_tiny_checkpoint(out + ".tmp", corpus=corpus, seed=config.seed, **kw)
      os.replace(out + ".tmp", out)  # atomic: a killed run never leaves half a model behind
  return out


def model_problems(p: Problems, config: ml_collections.ConfigDict) -> None:
  """Adds to ``p`` the problems of `config.model` (dtype, param_dtype, remat, attention_impl) and of
  `config.rollout.weight_layout` (the sampler's copy of the weights)."""
  m = config.model
  eval_config.check_model_numerics(
    p, "model.", m.dtype, m.get("attention_impl", "auto"), param_dtype=m.get("param_dtype") or None
  )
  p.choice("model.remat", m.get("remat", "none"), REMAT_POLICIES)
  if "rollout" in config:
    p.choice("rollout.weight_layout", config.rollout.get("weight_layout", "tensor_parallel"), WEIGHT_LAYOUTS)


def model_options(config: ml_collections.ConfigDict) -> dict:
  """The model's precision and execution options from `config.model`, validated (before anything loads):
  dtype (compute), param_dtype (stored parameters and optimizer moments; "" = dtype), remat, scan_layers. Raises
  ``ConfigError`` (a ValueError) listing the problems ``model_problems`` finds."""
  p = Problems()
  model_problems(p, config)
  p.raise_if_any("model config")
  m = config.model
  return dict(
    dtype=jnp.dtype(m.dtype),
    param_dtype=jnp.dtype(m.get("param_dtype") or m.dtype),
    remat=m.get("remat", "none"),
    scan_layers=bool(m.get("scan_layers", False)),
  )


def known_data_source(name: str) -> bool:
  """Whether a reward function is registered for ``name`` (``reward.rewards.get_reward_fn``, plugins included once
  imported): the ``known_sources`` predicate of ``data.pipeline.make_train_iterator``."""
  try:
    get_reward_fn(name)
  except UnknownDataSourceError:
    return False
  return True


def load_model(config: ml_collections.ConfigDict, mesh, checkpoint: str | None = None) -> qvl.Qwen25VL:
  opts = model_options(config)
  model = qvl.from_pretrained(
    checkpoint or config.model.checkpoint,
    dtype=opts["dtype"],
    param_dtype=opts["param_dtype"],
    mesh=mesh,
    attention_impl=config.model.attention_impl,
  )
  return model.set_remat(opts["remat"], opts["scan_layers"])


def scene_config(config: ml_collections.ConfigDict) -> synthetic.SceneConfig:
  return synthetic.SceneConfig(**config.synthetic.scene.to_dict()) if "synthetic" in config else synthetic.SceneConfig()


def data_source(spec: str, config: ml_collections.ConfigDict):
  """`data.train` / `eval.data`: comma-separated parquet/JSONL paths or globs, or "synthetic:SPLIT" (scenes drawn on
  the fly by `data/synthetic.py`, `config.synthetic.num_records` of them)."""
  if spec.startswith("synthetic:"):
    split = spec.split(":", 1)[1]
    return synthetic.SyntheticSource(
      config.synthetic.num_records, seed=config.seed, split=split, config=scene_config(config)
    )
  return [p for p in spec.split(",") if p]


def agent_config(config: ml_collections.ConfigDict) -> AgentConfig:
  """`config.rollout` as an AgentConfig (fields an older config lacks keep AgentConfig's defaults)."""
  r = config.rollout
  params = rules.SamplingParams(temperature=r.temperature, top_k=r.top_k, top_p=r.top_p)
  return dataclass_from(AgentConfig, r, sampling=params)


def make_judge(config: ml_collections.ConfigDict, workdir: str):
  """The LLM judge from config.reward.judge_url or $DEEPEYES_JUDGE_URL; None (rules only) when neither is set."""
  overrides = dict(max_workers=config.reward.judge_workers, cache_path=os.path.join(workdir, "judge_cache.jsonl"))
  if config.reward.judge_model:
    overrides["model"] = config.reward.judge_model
  if config.reward.judge_url:
    jc = JudgeConfig(url=config.reward.judge_url, **overrides)
  else:
    jc = JudgeConfig.from_env(**overrides)
  if jc is None:
    log.info("no judge endpoint configured: accuracy from rule matching only")
    return None
  log.info("LLM judge at %s (model %s)", jc.url, jc.model or "<first listed>")
  return LLMJudge(jc)


def held_out_tasks(config: ml_collections.ConfigDict) -> list[Task]:
  """The first ``config.eval.num_questions`` good records of ``config.eval.data`` as tool tasks. A bad record (as
  the training pipeline judges it: ``decode_example``, an unknown data source) is skipped with a warning naming it;
  a source with no good record at all raises."""
  source = data_source(config.eval.data, config)
  if isinstance(source, list):
    source = DeepEyesSource(source)
  tasks, skipped = [], 0
  for i in range(len(source)):
    if len(tasks) == config.eval.num_questions:
      break
    record = source[i]
    try:
      example = decode_example(record, i, source_name=str(record.get("_file", repr(source))))
      check_data_source(example, known_data_source)
    except BadRecord as e:
      skipped += 1
      log.warning("held-out eval: skipping a bad record [%s]: %s", e.reason, e)
      continue
    tasks.append(tasks_lib.record_task(example))
  if skipped and not tasks:
    raise ValueError(f"held-out eval: all {skipped} records read from {source!r} were bad (see the warnings)")
  return tasks


def make_mesh(mesh_config) -> jax.sharding.Mesh:
  """``config.mesh`` (data, fsdp, tensor; -1 = the remaining devices) -> the device mesh."""
  return shd.make_mesh(mesh_config.data, mesh_config.fsdp, mesh_config.tensor)


def parse_mesh(spec: str | None) -> jax.sharding.Mesh | None:
  """A ``"data,fsdp,tensor"`` flag (e.g. ``"1,-1,1"``) -> the device mesh; None or "" -> None (one device)."""
  if not spec:
    return None
  try:
    data, fsdp, tensor = (int(x) for x in spec.split(","))
  except ValueError:
    raise ValueError(f"mesh {spec!r}: expected three integers data,fsdp,tensor (e.g. 1,-1,1)") from None
  return shd.make_mesh(data, fsdp, tensor)


def device_platform(mesh=None) -> str:
  """The platform ("cpu", "gpu", "tpu") of the devices a model will run on: ``mesh``'s, else ``jax.devices()``'s
  (inference runs on this host's devices; never `jax.default_backend()`, which a compile for another target
  does not change)."""
  return (mesh.devices.flat[0] if mesh is not None else jax.devices()[0]).platform


def resolve_dtype(dtype: str, mesh=None) -> str:
  """``"auto"``: ``"float32"`` when the devices the model will run on (`device_platform`) are CPUs (bfloat16 is
  emulated there: slower, and less exact for nothing), ``"bfloat16"`` on GPU / TPU. Other names are returned as
  they are."""
  if dtype != "auto":
    return dtype
  return "float32" if device_platform(mesh) == "cpu" else "bfloat16"


def load_for_inference(
  checkpoint: str,
  *,
  dtype: str = "bfloat16",
  mesh=None,
  attention_impl: str = "auto",
  tokenizer: str | None = None,
) -> tuple[qvl.Qwen25VL, object, Sampler]:
  """(model, tokenizer, sampler) of an HF checkpoint directory (tokenizer files there unless ``tokenizer``).
  ``dtype`` may be ``"auto"`` (`resolve_dtype`)."""
  try:
    jdtype = jnp.dtype(resolve_dtype(dtype, mesh))
  except TypeError as e:
    raise ValueError(f"dtype {dtype!r}: {e}") from None
  model = qvl.from_pretrained(checkpoint, dtype=jdtype, mesh=mesh, attention_impl=attention_impl)
  return model, load_tokenizer(tokenizer or checkpoint), Sampler(model, mesh=mesh)


class RolloutFlags:
  """The rollout flags of the command-line tools without a config file (``infer``, ``select``), defined once, with
  the defaults of the evaluation configs' ``rollout`` block. ``RolloutFlags()`` defines them (call it from the
  tool's ``_define_flags``); ``agent_config()`` reads them."""

  def __init__(self, temperature: float = 1.0):
    d, dflt = flags.DEFINE_integer, eval_config.ROLLOUT_DEFAULTS
    self.max_turns = d("max_turns", dflt["max_turns"], "assistant turns at most")
    self.max_tokens_per_turn = d("max_tokens_per_turn", dflt["max_tokens_per_turn"], "tokens per turn at most")
    self.max_total_tokens = d("max_total_tokens", dflt["max_total_tokens"], "tokens per trajectory at most")
    self.max_pixels = d("max_pixels", improc.MAX_PIXELS, "max_pixels for the image and the crops")
    self.coordinate_frame = flags.DEFINE_enum(
      "coordinate_frame", "original", ["original", "resized"], "frame of the zoom boxes"
    )
    self.greedy = flags.DEFINE_bool("greedy", False, "greedy decoding (default: sample at --temperature)")
    self.temperature = flags.DEFINE_float("temperature", temperature, "sampling temperature")
    self.top_p = flags.DEFINE_float("top_p", 1.0, "nucleus sampling mass")
    dtypes, doc = ["auto", "bfloat16", "float32"], "parameter and compute dtype (auto: float32 on CPU, else bfloat16)"
    self.dtype = flags.DEFINE_enum("dtype", "auto", dtypes, doc)

  def agent_config(self) -> AgentConfig:
    params = rules.GREEDY if self.greedy.value else rules.SamplingParams(self.temperature.value, top_p=self.top_p.value)
    return AgentConfig(
      max_turns=self.max_turns.value,
      max_tokens_per_turn=self.max_tokens_per_turn.value,
      max_total_tokens=self.max_total_tokens.value,
      max_pixels=self.max_pixels.value,
      coordinate_frame=self.coordinate_frame.value,
      sampling=params,
    )


# ----------------------------------------------------------------------------------------------------------------
# The command-line programs' start-up: quiet frameworks, config overrides checked, config problems without a traceback


class _FrameworkNoise(logging.Filter):
  """Drops the start-up and bookkeeping chatter of the frameworks; every warning and error of ours, and of theirs
  but for the few named here, still shows:
  - orbax's INFO lines (a dozen per checkpoint saved or restored: handlers, metadata stores, throughputs), and its
    warnings about read-only managers and missing metadata files, which a read-only restore (``export``) causes;
  - jax's INFO "Unable to initialize backend 'tpu'" (a backend that fails quietly by design: libtpu on a host
    without a TPU chip)."""

  _ORBAX_EXPECTED = ("read_only=True, setting", "Given directory is read only", "Metadata file does not exist")

  def filter(self, record: logging.LogRecord) -> bool:
    path = record.pathname.replace("\\", "/")
    if "/orbax/" in path:
      return record.levelno >= logging.WARNING and not any(s in str(record.msg) for s in self._ORBAX_EXPECTED)
    if record.levelno < logging.WARNING and record.name.startswith("jax"):
      return not str(record.msg).startswith("Unable to initialize backend")
    return True


def quiet_frameworks() -> None:
  """Called first in every CLI's ``main`` (after absl set its logging up): the environment defaults of
  `cli_env.quiet_environment` (the CLI modules set them again before their imports: TensorFlow reads them when it is
  imported) and `_FrameworkNoise` on the root logger's handlers (absl's), where every library's records end up."""
  cli_env.quiet_environment()
  for handler in logging.getLogger().handlers:
    if not any(isinstance(f, _FrameworkNoise) for f in handler.filters):
      handler.addFilter(_FrameworkNoise())


def _field_names(config: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
  """Every field of ``config``, blocks and leaves, as dotted paths."""
  names = []
  for key, value in config.items():
    names.append(prefix + key)
    if isinstance(value, ml_collections.ConfigDict):
      names += _field_names(value, f"{prefix}{key}.")
  return names


def nearest_fields(path: str, names: list[str], n: int = 2) -> list[str]:
  """The fields of ``names`` nearest to the unknown ``path`` (difflib ratios of the whole path and of its last
  part, so that ``rl.grup_size`` finds ``rollout.group_size``): the best, and up to ``n - 1`` others about as near."""
  leaf = path.rsplit(".", 1)[-1]

  def score(name: str) -> float:
    whole = difflib.SequenceMatcher(None, path, name).ratio()
    last = difflib.SequenceMatcher(None, leaf, name.rsplit(".", 1)[-1]).ratio()
    return max(whole, 0.95 * last)

  scored = sorted(((score(name), name) for name in names), key=lambda t: (-t[0], t[1]))
  if not scored or scored[0][0] < 0.6:
    return []
  best = scored[0][0]
  return [name for s, name in scored[:n] if s >= max(0.6, best - 0.08)]


def unknown_field(config: ml_collections.ConfigDict, path: str) -> str | None:
  """Why ``--config.PATH`` names no field of ``config`` (one line, with the nearest fields), or None when it does
  (or when ml_collections decides: an empty placeholder on the way, an indexed path)."""
  if "[" in path:
    return None
  parts = path.split(".")
  node = config
  for i, key in enumerate(parts):
    if key not in node:
      near = nearest_fields(path, _field_names(config))
      hint = f"did you mean {' or '.join(near)}?" if near else "the fields are listed in docs/config_reference.md"
      return f"no such field; {hint}"
    if i == len(parts) - 1:
      return None
    value = node[key]
    if isinstance(value, ml_collections.ConfigDict):
      node = value
      continue
    kind = type(value) if value is not None else node.get_type(key)  # None: a placeholder of that type
    if value is None and isinstance(kind, type) and (issubclass(kind, ml_collections.ConfigDict) or is_dataclass(kind)):
      return None  # an empty block: ml_collections creates its fields
    name = getattr(kind, "__name__", str(kind))
    return f"{'.'.join(parts[: i + 1])} is a value ({name}), not a block of fields"
  return None


def _config_argument(argv: list[str], name: str) -> str | None:
  """The last value of ``--NAME=V`` / ``--NAME V`` (or one dash) in ``argv`` before ``--``."""
  value = None
  for i, arg in enumerate(argv):
    if arg == "--":
      break
    m = re.fullmatch(rf"--?{re.escape(name)}(=(.*))?", arg, re.S)
    if m:
      value = m.group(2) if m.group(1) else (argv[i + 1] if i + 1 < len(argv) else None)
  return value


def _config_flag_names(flag_values) -> list[str]:
  return [name for name in list(flag_values) if _config_flags.is_config_flag(flag_values[name])]


def config_file_problem(argv: list[str], flag_values=flags.FLAGS) -> str | None:
  """``--config FILE[:ARGS]`` naming no file, as one line (ml_collections would defer the error to the first use of
  the config, a traceback); None otherwise."""
  for name in _config_flag_names(flag_values):
    if not isinstance(flag_values[name].parser, _config_flags.ConfigFileFlagParser):
      continue
    source = _config_argument(argv[1:], name)
    path = source.split(":", 1)[0] if source is not None else None
    if path is not None and not os.path.isfile(path):
      where = "" if os.path.isabs(path) else f" (relative to {os.getcwd()})"
      return f"--{name}={source}: no such config file {path}{where}"
  return None


def config_override_problem(argv: list[str], flag_values=flags.FLAGS) -> str | None:
  """The first ``--config.FIELD=...`` of ``argv`` that names no field of its config file (for every config flag
  of ``flag_values``), as one line: ``--config.rl.grup_size: no such field; did you mean rollout.group_size?``. None
  when every override names a field, or when the config file itself does not load (absl reports that)."""
  for name in _config_flag_names(flag_values):
    flag = flag_values[name]
    pattern = re.compile(rf"--?(?:no)?{re.escape(name)}\.([^=]+)")
    overrides = []
    for arg in argv[1:]:
      if arg == "--":
        break
      m = pattern.match(arg)
      if m:
        overrides.append(m.group(1))
    source = _config_argument(argv[1:], name)
    if not overrides or source is None:
      continue
    try:
      config = flag.parser.parse(source)
    except Exception:  # a config file that does not load: absl's own message says why
      continue
    if not isinstance(config, ml_collections.ConfigDict):
      continue
    for path in overrides:
      problem = unknown_field(config, path)
      if problem:
        return f"--{name}.{path}: {problem}"
  return None


def parse_flags(argv: list[str]) -> list[str]:
  """``app.run(main, flags_parser=run_setup.parse_flags)`` in the CLIs with a config file flag (``train``,
  ``evaluate``, ``aot``): absl's parsing, but a config file that does not exist (`config_file_problem`) or an
  override of a field the config does not have (`config_override_problem`: the nearest fields named) is one line on
  stderr and exit status 2, instead of ml_collections' traceback."""
  problem = config_file_problem(argv)
  if problem:
    print(problem, file=sys.stderr)
    sys.exit(2)
  try:
    return flags.FLAGS(argv)
  except Exception as e:
    problem = config_override_problem(argv)
    if problem:
      print(problem, file=sys.stderr)
      sys.exit(2)
    if not isinstance(e, flags.Error):
      raise
    message = str(e)  # absl's own report of a bad flag (app.parse_flags_with_usage)
    sep = "\n" if "\n" in message else " "
    sys.stderr.write(f"FATAL Flags parsing error:{sep}{message}\n")
    sys.stderr.write("Pass --helpshort or --helpfull to see help on flags.\n")
    sys.exit(1)


@contextlib.contextmanager
def config_errors_reported(prog: str):
  """Around a CLI's work: a `ConfigError` (every bad field of the config, found before anything loads) becomes its
  message, each field written as its command-line flag (``--config.data.train='': must be set ...``), on stderr,
  exit status 2, without a traceback."""
  try:
    yield
  except ConfigError as e:
    text = re.sub(r"^(\s*- )config\.", r"\1--config.", str(e), flags=re.M)
    print(f"{prog}: {text}", file=sys.stderr)
    sys.exit(2)
