"""The GRPO training loop (DESIGN.md "One RL step, as data"), flat and readable in the big_vision style.

Each step: a batch of prompts from the grain pipeline -> G rollouts each with the zoom agent (the sampler reads
the learner's current parameters, no copy) -> DeepEyes rewards -> group-normalised advantages -> packed rows ->
`ppo_epochs` x `num_minibatches` optimizer steps (one by default, as DeepEyes) -> metrics -> async checkpoint.

Every random choice is a function of (config.seed, step, row), and the data iterator state is checkpointed, so a
run killed at any point and restarted from its workdir produces the same metrics as an uninterrupted run.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import logging
import os
import time
import zlib
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from etils import epath

from deepeyes_jax.agent.rollout import AgentConfig, Task, run_rollouts
from deepeyes_jax.agent.trajectory import Trajectory, save_trajectories
from deepeyes_jax.models import qwen2_5_vl as qvl
from deepeyes_jax.models.qwen2_5_vl.layers import check_remat
from deepeyes_jax.parallel import sharding as shd
from deepeyes_jax.rl import grpo
from deepeyes_jax.rl import rewards as rewards_lib
from deepeyes_jax.rl.checkpoint import TRAIN_CONFIG_FILE, Checkpointer
from deepeyes_jax.rl.metrics import Progress, device_peak_flops, make_writer, rollout_metrics
from deepeyes_jax.rl.packing import assign_rows, pack
from deepeyes_jax.rl.train_step import Learner, LearnerConfig
from deepeyes_jax.sampling import rules
from deepeyes_jax.sampling.generate import load_tokenizer
from deepeyes_jax.sampling.sampler import WEIGHT_LAYOUTS, Sampler, bucket

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------------------------
# Set-up pieces
# --------------------------------------------------------------------------------------------------------------
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
    from deepeyes_jax.data import synthetic
    from deepeyes_jax.models.qwen2_5_vl.tiny import build_tiny_checkpoint

    kw = dict(tiny.to_dict())
    corpus = synthetic.corpus(config=scene_config(config)) if kw.pop("corpus", "") == "synthetic" else ()
    if jax.process_index() == 0:
      print(f"writing a tiny Qwen2.5-VL and its tokenizer (made by code) to {out}", flush=True)
      build_tiny_checkpoint(out + ".tmp", corpus=corpus, seed=config.seed, **kw)
      os.replace(out + ".tmp", out)  # atomic: a killed run never leaves half a model behind
  return out


def model_options(config: ml_collections.ConfigDict) -> dict:
  """The model's precision and execution options from `config.model`, validated (before anything loads):
  dtype (compute), param_dtype (stored parameters and optimizer moments; "" = dtype), remat, scan_layers; also
  checks `config.rollout.weight_layout` (the sampler's copy of the weights)."""
  m = config.model
  try:
    dtype = jnp.dtype(m.dtype)
    param_dtype = jnp.dtype(m.get("param_dtype") or m.dtype)
  except TypeError as e:
    raise ValueError(f"config.model.dtype / param_dtype: {e}") from None
  remat = m.get("remat", "none")
  check_remat(remat)
  layout = config.rollout.get("weight_layout", "tensor_parallel") if "rollout" in config else "tensor_parallel"
  if layout not in WEIGHT_LAYOUTS:
    raise ValueError(f"config.rollout.weight_layout={layout!r}: must be one of {', '.join(WEIGHT_LAYOUTS)}")
  return dict(dtype=dtype, param_dtype=param_dtype, remat=remat, scan_layers=bool(m.get("scan_layers", False)))


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


def scene_config(config: ml_collections.ConfigDict):
  from deepeyes_jax.data import synthetic

  return synthetic.SceneConfig(**config.synthetic.scene.to_dict()) if "synthetic" in config else synthetic.SceneConfig()


def data_source(spec: str, config: ml_collections.ConfigDict):
  """`data.train` / `eval.data`: comma-separated parquet/JSONL paths or globs, or "synthetic:SPLIT" (scenes drawn on
  the fly by `data/synthetic.py`, `config.synthetic.num_records` of them)."""
  if spec.startswith("synthetic:"):
    from deepeyes_jax.data import synthetic

    split = spec.split(":", 1)[1]
    return synthetic.SyntheticSource(
      config.synthetic.num_records, seed=config.seed, split=split, config=scene_config(config)
    )
  return [p for p in spec.split(",") if p]


def agent_config(config: ml_collections.ConfigDict) -> AgentConfig:
  r = config.rollout
  params = rules.SamplingParams(temperature=r.temperature, top_k=r.top_k, top_p=r.top_p)
  return AgentConfig(
    max_turns=r.max_turns,
    max_tokens_per_turn=r.max_tokens_per_turn,
    max_total_tokens=r.max_total_tokens,
    max_images=r.max_images,
    coordinate_frame=r.coordinate_frame,
    min_pixels=r.min_pixels,
    max_pixels=r.max_pixels,
    sampling=params,
    # Absent from older configs: the defaults (all rows at once, the continuous engine).
    max_concurrent_rows=r.get("max_concurrent_rows", 0),
    engine=r.get("engine", AgentConfig.engine),
    page_size=r.get("page_size", AgentConfig.page_size),
    kv_pages=r.get("kv_pages", AgentConfig.kv_pages),
    segment_steps=r.get("segment_steps", AgentConfig.segment_steps),
    segment_release=r.get("segment_release", AgentConfig.segment_release),
  )


def warmstart_learner_config(config: ml_collections.ConfigDict) -> LearnerConfig:
  """The warm start's optimiser: behaviour cloning (`nll` loss), its own learning rate and cosine decay."""
  ws = config.warmstart
  return dataclasses.replace(
    learner_config(config),
    learning_rate=ws.learning_rate,
    warmup_steps=ws.warmup_steps,
    decay_steps=max(1, ws.steps - ws.warmup_steps),
    weight_decay=ws.weight_decay,
    policy_loss="nll",
  )


def learner_config(config: ml_collections.ConfigDict) -> LearnerConfig:
  o, rl = config.optim, config.rl
  return LearnerConfig(
    learning_rate=o.learning_rate,
    warmup_steps=o.warmup_steps,
    weight_decay=o.weight_decay,
    b1=o.b1,
    b2=o.b2,
    grad_clip=o.grad_clip,
    policy_loss=rl.policy_loss,
    clip_low=rl.clip_low,
    clip_high=rl.clip_high,
    dual_clip=rl.dual_clip if rl.dual_clip else None,
    aggregation=rl.aggregation,
    kl_coef=rl.kl_coef,
    entropy_coef=rl.entropy_coef,
    train_vision=config.train_vision,
    logits_chunk=rl.logits_chunk,
  )


def example_to_task(example) -> Task:
  """A data-pipeline Example (DeepEyes record) -> an agent Task, keeping the record's messages byte for byte.

  The metadata holds the scalar columns and `extra_info` fields of the record (e.g. the synthetic task's
  `target_box`), then data_source / ground_truth / question."""
  extra = example.extra or {}
  scalars = lambda d: {k: v for k, v in d.items() if isinstance(v, (str, int, float, bool))}  # noqa: E731
  return Task(
    task_id=example.uid,
    image=example.images[0],
    user_text="",
    messages_override=example.messages,
    metadata={
      **scalars(extra.get("extra_info") or {}),
      **scalars(extra),
      "data_source": example.data_source,
      "ground_truth": example.ground_truth,
      "question": example.question,
    },
  )


def make_judge(config: ml_collections.ConfigDict, workdir: str):
  """The LLM judge from config.reward.judge_url or $DEEPEYES_JUDGE_URL; None (rules only) when neither is set."""
  from deepeyes_jax.rl.judge import JudgeConfig, LLMJudge

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


def step_seed(seed: int, step: int) -> int:
  return zlib.crc32(f"{seed}/{step}".encode())


# --------------------------------------------------------------------------------------------------------------
# One RL step
# --------------------------------------------------------------------------------------------------------------
def score(trajectories: list[Trajectory], tokenizer, judge=None) -> list:
  return rewards_lib.score_trajectories(trajectories, tokenizer, judge)


def minibatches(trajs, adv, config, vision_cfg, learner: Learner) -> list[list]:
  """Splits the kept trajectories into `num_minibatches` mini-batches of packed micro-batches.

  With `rl.old_logprobs == "recompute"`, the behaviour log-probs are recomputed here with the current (pre-update)
  parameters, so every PPO epoch uses the same old policy.
  """
  rl = config.rl
  lengths = [len(t.token_ids) for t in trajs]
  row_len = bucket(max(lengths), rl.min_row_len)
  per = rows_per_micro_batch(rl.micro_batch_rows, learner.mesh)
  n_rows = lambda k: micro_batch_num_rows(k, per, learner.mesh)  # noqa: E731
  out = []
  for mb_idx in np.array_split(np.arange(len(trajs)), rl.num_minibatches):
    idx = list(mb_idx)
    if not idx:
      continue
    rows = [[idx[j] for j in row] for row in assign_rows([lengths[i] for i in idx], row_len)]
    micro = [
      pack(trajs, adv, rows[k : k + per], row_len=row_len, vision=vision_cfg, num_rows=n_rows(len(rows[k : k + per])))
      for k in range(0, len(rows), per)
    ]
    if rl.old_logprobs == "recompute":
      for mb in micro:
        mb.old_logprobs = learner.logprobs(mb) * mb.loss_mask
    elif rl.old_logprobs != "sampler":
      raise ValueError(f"rl.old_logprobs must be 'sampler' or 'recompute', got {rl.old_logprobs!r}")
    out.append(micro)
  return out


def rows_per_micro_batch(micro_batch_rows: int, mesh) -> int:
  """Packed rows per micro-batch: `rl.micro_batch_rows` rounded up to a multiple of the mesh's row-parallel size
  (data x fsdp). Every chip group gets a real row; rounding only the padded shape up (8 rows on a 32-way fsdp mesh
  padded to 32) ran three padding rows, vision tower included, for every real one."""
  per = max(1, micro_batch_rows)
  return per if mesh is None else _round_up(per, _row_multiple(mesh))


def micro_batch_num_rows(k: int, per: int, mesh) -> int:
  """Rows of a micro-batch holding k packed rows (at most `per`, config.rl.micro_batch_rows): the next power of two,
  rounded up to a multiple of the mesh's row-parallel size (data x fsdp) so that the rows shard evenly."""
  # Padded to the next power of two (at most `per`), not to `per`: a last micro-batch holding one or two rows would
  # otherwise cost as much as a full one. log2(per) shapes at most.
  multiple = 1 if mesh is None else _row_multiple(mesh)
  return _round_up(min(per, bucket(k, 1)), multiple)


def _row_multiple(mesh) -> int:
  return mesh.shape["data"] * mesh.shape["fsdp"]


def _round_up(n: int, k: int) -> int:
  return -(-n // k) * k


# --------------------------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------------------------
def train(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
  """Runs (or resumes) training in `workdir`. Returns the last step's metrics.

  Steps [0, warmstart.steps) are the supervised warm start (when `config.warmstart.steps > 0`), the rest GRPO.
  With `config.eval.num_questions > 0`, the held-out evaluation runs on the warm-start checkpoint and on the final
  one (`final_eval.json`); with `config.log.report`, `report.html` / `report.png` are written at the end.
  """
  from deepeyes_jax.data.pipeline import make_train_iterator

  model_options(config)  # a bad dtype / remat policy fails here, before anything loads or compiles
  maybe_init_distributed()
  epath.Path(workdir).mkdir(parents=True, exist_ok=True)  # workdir paths go through epath: local or gs://
  if jax.process_index() == 0:  # what `python -m deepeyes_jax.export` needs to turn a checkpoint into an HF model
    (epath.Path(workdir) / TRAIN_CONFIG_FILE).write_text(config.to_json_best_effort(indent=2))  # epath: gs:// too
  m = config.mesh
  mesh = shd.make_mesh(m.data, m.fsdp, m.tensor)
  chief = jax.process_index() == 0
  if chief:
    print(f"{jax.process_count()} process(es), {jax.device_count()} devices, mesh {dict(mesh.shape)}", flush=True)
  checkpoint = model_dir(config, workdir)
  model = load_model(config, mesh, checkpoint)
  tokenizer = load_tokenizer(config.model.tokenizer or checkpoint)
  sampler = Sampler(model, mesh=mesh, weight_layout=config.rollout.get("weight_layout", "tensor_parallel"))
  sampler.release()  # its copy of the weights is made before each rollout phase (sampler.state = learner.state)
  agent_cfg = agent_config(config)
  judge = make_judge(config, workdir)
  for module in filter(None, config.reward.plugins.split(",")):
    importlib.import_module(module)  # registers extra reward functions by name (@register_reward)
  ws = config.get("warmstart")
  warm_steps = ws.steps if ws else 0
  if warm_steps >= config.total_steps:
    raise ValueError(f"warmstart.steps ({warm_steps}) must be < total_steps ({config.total_steps})")

  # Every process reads the same global batch and runs the same host loop (parsing, cropping, rewards), so all
  # host-side inputs of the jitted functions are identical across processes; device work is sharded over the
  # global mesh. (Per-process data shards with process-local rollouts are a planned optimisation.)
  train_source = data_source(config.data.train, config)

  def iterator(batch_size: int, seed: int):
    return make_train_iterator(
      train_source,
      seed=seed,
      batch_size=batch_size,
      shuffle=config.data.shuffle,
      num_epochs=config.data.num_epochs,
      process_index=0,
      process_count=1,
    )

  data_iter, data_stats = iterator(config.data.batch_size, config.seed)
  ws_iter = iterator(ws.batch_size, config.seed + 1)[0] if warm_steps else None
  ckpt = Checkpointer(
    epath.Path(workdir) / "checkpoints",
    max_to_keep=config.checkpoint.max_to_keep,
    keep_period=config.checkpoint.keep_period,
    async_save=config.checkpoint.async_save,
    save_interval_steps=config.checkpoint.every_steps,
  )
  start = ckpt.latest_step() or 0
  in_warmup = start < warm_steps
  learner = Learner(model, warmstart_learner_config(config) if in_warmup else learner_config(config), mesh=mesh)
  del model  # the learner owns the parameters from here on
  if start:
    learner.state, learner.opt_state, meta = ckpt.restore(
      start, learner.state, learner.opt_state, ws_iter if in_warmup else data_iter
    )
    learner.step = meta["learner_step"]
    if start == warm_steps:  # the warm-start checkpoint: GRPO starts with a fresh optimiser
      learner = _switch_to_rl(learner, config, mesh)
    log.info("resuming from step %d", start)
  writer = make_writer(workdir, resume_step=start)
  if start == 0 and chief:
    writer.write_hparams({k: v for k, v in _flat(config.to_dict()).items()})
  progress = Progress(config.total_steps, start, warm_steps)
  n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(learner.state))
  peak = device_peak_flops() * jax.device_count()
  metrics: dict[str, float] = {}
  kill_at = int(os.environ.get("DEEPEYES_TEST_KILL_AT_STEP", "-1"))  # test hook: SIGKILL mid-step
  evaluator = HeldOut(config, workdir, tokenizer, sampler, agent_cfg, writer)
  probe = None  # SkillProbe, built at the first warm-start probe

  for step in range(start, config.total_steps):
    t0 = time.time()
    if step == warm_steps and warm_steps:
      sampler.state = learner.state
      evaluator.run("warmstart", step)  # the warm-start checkpoint (skipped if already done)
      progress.pause_ended()
      if learner.cfg.policy_loss == "nll":
        learner = _switch_to_rl(learner, config, mesh)
    if step < warm_steps:
      metrics = warmstart_step(ws_iter, config, tokenizer, agent_cfg, sampler.config, learner, step)
      metrics["time/step_s"] = time.time() - t0
      every = ws.get("probe_every", 0)
      if every and ((step + 1) % every == 0 or step + 1 == warm_steps):
        probe = probe or SkillProbe(config, tokenizer, agent_cfg, sampler.config, learner)
        metrics.update({f"skills/{k}": v for k, v in probe(learner).items()})
      writer.write_scalars(step + 1, metrics)
      if chief:
        print(progress.line(step + 1, metrics), flush=True)
      _save(ckpt, step + 1, learner, ws_iter if step + 1 < warm_steps else data_iter, config, warm_steps)
      continue

    examples = next(data_iter)
    tasks = [example_to_task(e) for e in examples]
    sampler.state = learner.state
    trajs = run_rollouts(
      sampler,
      tokenizer,
      tasks,
      group_size=config.rollout.group_size,
      config=agent_cfg,
      seed=step_seed(config.seed, step),
    )
    sampler.release()  # the learner step does not hold the sampler's copy of the weights
    t_rollout = time.time() - t0
    if step + 1 == kill_at:  # after the previous step's checkpoint is durable: the test then knows where it resumes
      ckpt.wait()
      os.kill(os.getpid(), 9)
    rewards = score(trajs, tokenizer, judge)
    adv_fn = grpo.get_advantage_fn(config.rl.advantage)
    adv, keep = adv_fn(
      [r.total for r in rewards],
      [t.task_id for t in trajs],
      eps=config.rl.adv_eps,
      drop_zero_variance=config.rl.drop_zero_variance,
    )
    # A row without generated tokens (a prompt longer than max_total_tokens) has nothing to learn from, and its
    # prompt may not fit a packing row.
    keep = np.asarray(keep, bool) & np.asarray([bool(t.action_mask.any()) for t in trajs])
    kept = [t for t, k in zip(trajs, keep) if k]
    t1 = time.time()
    update_metrics: dict[str, float] = {}
    if kept:
      batches = minibatches(kept, adv[keep], config, sampler.config.vision, learner)
      for _ in range(config.rl.ppo_epochs):
        for micro in batches:
          update_metrics = learner.update(micro)
    t_update = time.time() - t1

    metrics = rollout_metrics(trajs, rewards)
    metrics.update({f"train/{k}": v for k, v in update_metrics.items()})
    metrics["loss"] = update_metrics.get("loss", 0.0)
    metrics["kept_fraction"] = float(np.mean(keep)) if len(keep) else 0.0
    gen_tokens = sum(int(t.action_mask.sum()) for t in trajs)
    all_tokens = sum(len(t.token_ids) for t in trajs)
    train_tokens = sum(len(t.token_ids) for t in kept) * config.rl.ppo_epochs
    metrics["time/rollout_s"] = t_rollout
    metrics["time/update_s"] = t_update
    metrics["time/step_s"] = time.time() - t0
    metrics["throughput/rollout_tokens_per_s"] = all_tokens / max(t_rollout, 1e-9)
    metrics["throughput/generated_tokens_per_s"] = gen_tokens / max(t_rollout, 1e-9)
    flops = 2 * n_params * all_tokens + 6 * n_params * train_tokens
    metrics["mfu"] = flops / max(metrics["time/step_s"], 1e-9) / peak
    metrics["data/skipped_records"] = float(getattr(data_stats, "skipped", 0))
    writer.write_scalars(step + 1, metrics)
    if chief:
      print(progress.line(step + 1, metrics), flush=True)
      if config.log.save_trajectories_every and (step + 1) % config.log.save_trajectories_every == 0:
        save_trajectories(
          trajs[: config.log.num_saved_trajectories],
          epath.Path(workdir) / "rollouts",
          filename=f"step_{step + 1:06d}.jsonl",
        )
    _save(ckpt, step + 1, learner, data_iter, config, warm_steps)
    if ckpt.reached_preemption(step + 1):
      ckpt.close()
      log.warning("preemption: checkpoint of step %d written; exiting (re-run the same command to resume)", step + 1)
      if chief:
        print(f"preempted: saved step {step + 1}, exiting", flush=True)
      writer.flush()
      return metrics
  ckpt.close()
  sampler.state = learner.state
  final = evaluator.run("final", config.total_steps)
  if final is not None and chief:
    evaluator.write_final(warm_steps)
  writer.flush()
  return metrics


def _save(ckpt: Checkpointer, step: int, learner: Learner, data_iterator, config, warm_steps: int) -> None:
  """Orbax decides: every `checkpoint.every_steps`, the warm-start and last steps, and a preemption sync point
  (all processes agree on it after any of them got SIGTERM from the scheduler: spot / preemptible TPUs)."""
  ckpt.save(
    step,
    learner.state,
    learner.opt_state,
    learner_step=learner.step,
    data_iterator=data_iterator,
    force=step in (config.total_steps, warm_steps),
  )


def _switch_to_rl(learner: Learner, config, mesh) -> Learner:
  """The warm start is over: the same parameters, the GRPO loss and a fresh optimiser."""
  from flax import nnx

  return Learner(nnx.merge(learner.graphdef, learner.state), learner_config(config), mesh=mesh)


class SkillProbe:
  """`warmstart.skill_accuracy` on fixed demonstrations of `warmstart.probe_questions` held-out questions
  (`eval.data`), built once: which skills (grounding, reading, both through the protocol) the warm start has
  learned so far, as `skills/{ground,read,zoom}` metrics."""

  MODES = ("ground", "read", "zoom")

  def __init__(self, config, tokenizer, agent_cfg: AgentConfig, model_cfg, learner: Learner):
    from deepeyes_jax.data.deepeyes import decode_example
    from deepeyes_jax.rl import warmstart

    ws = config.warmstart
    source = data_source(config.eval.data, config)
    n = min(ws.get("probe_questions", 32), len(source))
    examples = [decode_example(source[i], i, source_name=repr(source)) for i in range(n)]
    labels = sorted({e.ground_truth for e in examples})
    self.content_ids = warmstart.content_token_ids(tokenizer, labels)
    probe_cfg = config.copy_and_resolve_references()
    probe_cfg.rl.old_logprobs = "sampler"  # demonstrations: nothing to recompute
    self.packed = {}
    for mode in self.MODES:
      trajs = warmstart.demonstrations(
        examples,
        [mode] * n,
        demonstrator=ws.demonstrator,
        tokenizer=tokenizer,
        agent_config=agent_cfg,
        model_config=model_cfg,
      )
      self.packed[mode] = minibatches(trajs, np.zeros(n, np.float32), probe_cfg, model_cfg.vision, learner)[0]

  def __call__(self, learner: Learner) -> dict[str, float]:
    from deepeyes_jax.rl import warmstart

    return warmstart.skill_accuracy(learner, self.packed, self.content_ids)


def warmstart_step(ws_iter, config, tokenizer, agent_cfg: AgentConfig, model_cfg, learner: Learner, step: int):
  """One behaviour-cloning step on a batch of the demonstrator's trajectories (`rl/warmstart.py`)."""
  from deepeyes_jax.rl import warmstart

  ws = config.warmstart
  examples = next(ws_iter)
  modes = warmstart.draw_modes(
    [e.uid for e in examples],
    zlib.crc32(f"{config.seed}/warmstart/{step}".encode()),
    zoom_fraction=ws.zoom_fraction,
    no_tool_fraction=ws.no_tool_fraction,
    ground_fraction=ws.get("ground_fraction", 0.0),
    read_fraction=ws.get("read_fraction", 0.0),
  )
  trajs = warmstart.demonstrations(
    examples, modes, demonstrator=ws.demonstrator, tokenizer=tokenizer, agent_config=agent_cfg, model_config=model_cfg
  )
  update: dict[str, float] = {}
  for micro in minibatches(trajs, np.ones(len(trajs), np.float32), config, model_cfg.vision, learner):
    update = learner.update(micro)
  out = {f"train/{k}": v for k, v in update.items()}
  out["loss"] = update.get("loss", 0.0)
  for mode in warmstart.MODES:
    out[f"warmstart/{mode}_fraction"] = modes.count(mode) / max(1, len(modes))
  out["length/total"] = float(np.mean([len(t.token_ids) for t in trajs]))
  return out


class HeldOut:
  """The held-out evaluation of `config.eval` (greedy, with and without the tool) at named checkpoints.

  Each result is written to `workdir/eval/NAME.json` once; a resumed run skips what is already there.
  """

  def __init__(self, config, workdir, tokenizer, sampler, agent_cfg, writer):
    self.config, self.workdir, self.tokenizer, self.sampler, self.writer = config, workdir, tokenizer, sampler, writer
    self.agent_cfg = agent_cfg
    ev = config.get("eval")
    self.n = ev.num_questions if ev else 0
    self.dir = epath.Path(workdir) / "eval"
    self.trajectories: list[Trajectory] = []

  def _tasks(self) -> list[Task]:
    from deepeyes_jax.data.deepeyes import decode_example

    source = data_source(self.config.eval.data, self.config)
    if isinstance(source, list):
      from deepeyes_jax.data.deepeyes import DeepEyesSource

      source = DeepEyesSource(source)
    n = min(self.n, len(source))
    return [example_to_task(decode_example(source[i], i, source_name=repr(source))) for i in range(n)]

  def run(self, name: str, step: int) -> dict | None:
    from deepeyes_jax.rl import held_out

    if not self.n:
      return None
    path = self.dir / f"{name}.json"
    if path.exists():
      return json.loads(path.read_text())
    chief = jax.process_index() == 0
    if chief:
      print(f"held-out evaluation of the {name} checkpoint (step {step}) on {self.n} questions", flush=True)
    tasks = self._tasks()
    result = {}
    for mode, tool in (("tool", True), ("no_tool", False)):
      summary, trajs = held_out.evaluate(
        self.sampler,
        self.tokenizer,
        tasks,
        agent_config=self.agent_cfg,
        tool=tool,
        batch_size=self.config.eval.batch_size,
        log=print if chief else None,
      )
      result[mode] = {"step": step, **summary}
      if tool and name == "final":
        self.trajectories = trajs
      if chief:
        print(
          f"  {name} / {mode}: accuracy {summary['accuracy']:.3f}, tool calls/question "
          f"{summary['tool_calls_per_question']:.2f}, mean IoU {summary['mean_iou']:.3f}",
          flush=True,
        )
    self.writer.write_scalars(step, {f"eval/{k}": v for k, v in result["tool"].items() if k != "step"})
    self.writer.write_scalars(step, {f"eval_no_tool/{k}": v for k, v in result["no_tool"].items() if k != "step"})
    if chief:
      self.dir.mkdir(parents=True, exist_ok=True)
      tmp = epath.Path(f"{path}.tmp")
      tmp.write_text(json.dumps(result, indent=2, sort_keys=True))
      # Local: os.replace, atomic. gs://: the best epath offers, a rename that is a server-side copy then a delete
      # (the copy makes the new object appear whole; a kill before the delete leaves the .tmp behind).
      tmp.replace(path)
      if name == "final":
        save_trajectories(self.trajectories, self.dir / "final_trajectories")
    return result

  def write_final(self, warm_steps: int) -> None:
    """`final_eval.json` (warm-start and final checkpoints, with and without the tool) and the report."""
    checkpoints = {}
    for name in ("warmstart", "final"):
      path = self.dir / f"{name}.json"
      if path.exists():
        checkpoints[name] = json.loads(path.read_text())
    out = {"eval_data": self.config.eval.data, "num_questions": self.n, "seed": self.config.seed}
    out["checkpoints"] = checkpoints
    if "warmstart" in checkpoints and "final" in checkpoints:
      gain = checkpoints["final"]["tool"]["accuracy"] - checkpoints["warmstart"]["tool"]["accuracy"]
      out["rl_gain_points"] = round(100 * gain, 2)
    (epath.Path(self.workdir) / "final_eval.json").write_text(json.dumps(out, indent=2, sort_keys=True))
    print("final_eval.json: " + json.dumps(checkpoints_table(checkpoints)), flush=True)
    if self.config.log.get("report"):
      from deepeyes_jax.rl.report import write_report

      trajs = self.trajectories[: self.config.log.get("report_trajectories", 6)]
      path = write_report(self.workdir, out, trajs, warmstart_steps=warm_steps, title="deepeyes_jax: " + self.workdir)
      print(f"report: {path}", flush=True)


def checkpoints_table(checkpoints: dict) -> dict:
  return {f"{c}/{m}": round(v["accuracy"], 3) for c, modes in checkpoints.items() for m, v in modes.items()}


def _flat(d: dict, prefix: str = "") -> dict[str, Any]:
  out = {}
  for k, v in d.items():
    key = f"{prefix}{k}"
    if isinstance(v, dict):
      out.update(_flat(v, key + "."))
    elif isinstance(v, (int, float, str, bool)):
      out[key] = v
  return out
