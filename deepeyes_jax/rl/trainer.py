"""The GRPO training loop (docs/architecture.md, "One RL step, as data"), flat and readable in the big_vision style.

Each step: a batch of prompts from the grain pipeline -> G rollouts each with the zoom agent (the sampler reads
the learner's current parameters, no copy) -> DeepEyes rewards -> group-normalised advantages -> packed rows ->
`ppo_epochs` x `num_minibatches` optimizer steps (one by default, as DeepEyes) -> metrics -> async checkpoint.

Every random choice is a function of (config.seed, step, row), and the data iterator state is checkpointed, so a
run killed at any point and restarted from its workdir produces the same metrics as an uninterrupted run.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import logging
import signal
import threading
import time
import zlib
from typing import Any

import jax
import ml_collections
import numpy as np
from etils import epath
from flax import nnx

from deepeyes_jax import run_setup
from deepeyes_jax.agent.rollout import RolloutCancelled, RolloutStats, run_rollouts
from deepeyes_jax.agent.trajectory import save_trajectories
from deepeyes_jax.config_args import dataclass_from
from deepeyes_jax.data.pipeline import make_train_iterator
from deepeyes_jax.eval import held_out
from deepeyes_jax.eval import tasks as tasks_lib
from deepeyes_jax.parallel import sharding as shd
from deepeyes_jax.processing.tokenizer import load_tokenizer
from deepeyes_jax.reward import rewards as rewards_lib
from deepeyes_jax.rl import grpo, packing, shaping, train_config, warmstart
from deepeyes_jax.rl.checkpoint import TRAIN_CONFIG_FILE, Checkpointer
from deepeyes_jax.rl.metrics import Progress, ToolHealth, device_peak_flops, make_writer, rollout_metrics
from deepeyes_jax.rl.report import write_report
from deepeyes_jax.rl.train_step import Learner, LearnerConfig
from deepeyes_jax.sampling.sampler import Sampler

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------------------------
# Set-up pieces (the rest is run_setup.py, shared with the other entry points)
# --------------------------------------------------------------------------------------------------------------
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
    aggregation="token_mean",  # whatever the RL algorithm: every algo= variant starts from the same warm start
    rollout_correction="none",  # demonstrations have no sampler log-probs to correct against
  )


def learner_config(config: ml_collections.ConfigDict) -> LearnerConfig:
  """The GRPO learner's config: `optim`, then `rl`, then top-level fields (train_vision); dual_clip 0 = off."""
  return dataclass_from(LearnerConfig, config.optim, config.rl, config, dual_clip=config.rl.dual_clip or None)


def step_seed(seed: int, step: int, round_: int = 0) -> int:
  """The rollout seed of a step (and of a dynamic-sampling round after the first)."""
  return zlib.crc32(f"{seed}/{step}".encode() if round_ == 0 else f"{seed}/{step}/{round_}".encode())


def split_devices(devices, k: int) -> tuple[list, list]:
  """(learner devices, sampler devices) for `rl.sampler_devices` = k: the last k / P devices of each of the P
  processes go to the sampler, the rest of each process's devices to the learner, both in `devices`' order. One
  process: the last k devices. Every process then holds devices of both groups, so each group's programs run on
  every process (multi-controller JAX: each process issues every program of every mesh it has devices in)."""
  by_process: dict[int, list] = {}
  for d in devices:
    by_process.setdefault(d.process_index, []).append(d)
  p = len(by_process)
  if k % p:
    raise ValueError(
      f"config.rl.sampler_devices={k}: must be a multiple of the number of processes ({p}): each process gives the "
      "sampler the same number of its devices"
    )
  per = k // p
  fewest = min(len(ds) for ds in by_process.values())
  if per >= fewest:
    raise ValueError(
      f"config.rl.sampler_devices={k}: must leave the learner a device on every process ({k // p} of each "
      f"process's {fewest} devices would go to the sampler); at most {(fewest - 1) * p}"
    )
  sampler = [d for ds in by_process.values() for d in ds[-per:]]
  taken = set(sampler)
  return [d for d in devices if d not in taken], sampler


def _meshes(config) -> tuple:
  """(learner mesh, sampler mesh): one mesh over every device, or with `rl.sampler_devices` = k the sampler's own
  mesh over k devices (`split_devices`: the last k / P of each process; rows over them, (data 1, fsdp k, tensor 1))
  and the learner's (`config.mesh`, -1 = the remaining ones) over the rest: one-step-off-policy rollouts then run
  on devices of their own, the weights pushed across (`sampler.push`) once per step."""
  k = config.rl.get("sampler_devices", 0)
  if not k:
    mesh = run_setup.make_mesh(config.mesh)
    return mesh, mesh
  learner_devices, sampler_devices = split_devices(jax.devices(), k)
  m = config.mesh
  return (
    shd.make_mesh(m.data, m.fsdp, m.tensor, devices=learner_devices),
    shd.make_mesh(1, k, 1, devices=sampler_devices),
  )


# --------------------------------------------------------------------------------------------------------------
# One RL step: rollouts (collect_rollouts), then the update (learn)
# --------------------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Rollouts:
  """One step's scored rollouts, what `learn` consumes."""

  trajs: list  # Trajectory, in (round, task, sample) order
  rewards: list  # RewardResult per trajectory
  totals: np.ndarray  # (N,) float64 rewards after shaping (DAPO's overlong penalty)
  groups: list[str]  # (N,) group id per trajectory: "round/task_id"
  train: np.ndarray  # (N,) bool: rows of the groups the update may use (dynamic sampling keeps the filled batch)
  metrics: dict[str, float]  # sampling/*, reward/overlong_*
  seconds: float


def collect_rollouts(
  step: int, config, sampler, tokenizer, agent_cfg, judge, data_iter, data_stats=None, cancel=None
) -> Rollouts:
  """Rolls out a batch of prompts (G samples each) with the sampler's current weights and scores them.

  With `rl.dynamic_sampling` (DAPO), groups whose (shaped) rewards are all equal carry no signal: more batches are
  drawn and rolled out, up to `rl.dynamic_sampling_max_rounds` rounds, until `data.batch_size` groups with signal
  are held; the update uses those (the first ones, in order) and the rest is dropped. Counted in `sampling/*`.
  Signal means a non-zero advantage: any difference of the shaped reward (accuracy, format, tool bonus, overlong
  penalty), not accuracy alone. `data_stats`' counters (rows skipped by the pipeline) are read here, by the thread
  that drew the prompts, into the metrics.
  """
  t0 = time.time()
  rl = config.rl
  want = config.data.batch_size
  trajs, rewards, groups, signal_groups = [], [], [], []
  totals = np.zeros(0, np.float64)
  stats = RolloutStats()  # the engine's costs over every round: engine/*
  for r in range(rl.dynamic_sampling_max_rounds if rl.dynamic_sampling else 1):
    tasks = [tasks_lib.record_task(e) for e in next(data_iter)]
    tr = run_rollouts(
      sampler,
      tokenizer,
      tasks,
      group_size=config.rollout.group_size,
      config=agent_cfg,
      seed=step_seed(config.seed, step, r),
      cancel=cancel,  # dropped prefetched rollouts stop at the next decode segment (RolloutCancelled)
      stats=stats,
    )
    rw = rewards_lib.score_trajectories(tr, tokenizer, judge)
    trajs, rewards = trajs + tr, rewards + rw
    totals = np.concatenate([totals, shaped_totals(tr, rw, config)])  # this round's only: earlier ones are done
    groups += [f"{r}/{t.task_id}" for t in tr]
    if not rl.dynamic_sampling:
      break
    signal = shaping.groups_with_signal(totals, groups, [t.stop_reason != "error" for t in trajs])
    signal_groups = [g for g, has in signal.items() if has]
    if len(signal_groups) >= want:
      break
  m: dict[str, float] = stats.metrics()
  if rl.dynamic_sampling:
    chosen = set(signal_groups[:want])
    train = np.asarray([g in chosen for g in groups], bool)
    n_groups = len(dict.fromkeys(groups))
    m.update(
      {
        "sampling/rounds": float(r + 1),
        "sampling/groups_drawn": float(n_groups),
        "sampling/groups_with_signal": float(len(signal_groups)),
        "sampling/groups_without_signal": float(n_groups - len(signal_groups)),
        "sampling/batch_filled": float(len(signal_groups) >= want),
      }
    )
  else:
    train = np.ones(len(trajs), bool)
  if rl.overlong_buffer:
    pen = totals - np.asarray([r.total for r in rewards], np.float64)
    m["reward/overlong_penalty"] = float(pen.mean()) if len(pen) else 0.0
    m["reward/overlong_frac"] = float((pen < 0).mean()) if len(pen) else 0.0
  if data_stats is not None:
    m.update(data_stats.metrics())  # data/skipped_records and data/skipped_<reason>
  return Rollouts(trajs, rewards, totals, groups, train, m, time.time() - t0)


def shaped_totals(trajs, rewards, config) -> np.ndarray:
  """(N,) float64 rewards plus DAPO's overlong penalty (`rl.overlong_buffer` > 0): over the last `overlong_buffer`
  tokens of each row's response budget (max_total_tokens minus its prompt). float64 as the rewards themselves: the
  advantages of a run without shaping stay bit-identical to those of the rewards (float32 rounding of 0.8 + 0.2 + 1.2
  moved every advantage by ~1e-7, enough to change where a 40-step toy run ends)."""
  totals = np.asarray([r.total for r in rewards], np.float64)
  if not config.rl.overlong_buffer:
    return totals
  pen = shaping.overlong_penalty(
    [t.response_length for t in trajs],
    [config.rollout.max_total_tokens - t.prompt_length for t in trajs],
    buffer=config.rl.overlong_buffer,
    factor=config.rl.overlong_penalty,
  )
  return totals + pen


def learn(batch: Rollouts, learner: Learner, config, vision_cfg) -> dict[str, float]:
  """Advantages, the rows that learn, the update(s); returns the step's metrics (rollouts, update, mismatch)."""
  trajs, rl = batch.trajs, config.rl
  # A row the engine ended with an error (its message in metadata["error"], counted in errors/rows) is left out of
  # its group's statistics and of the update: its reward says nothing about the policy.
  ok = np.asarray([t.stop_reason != "error" for t in trajs], bool) & batch.train
  adv, keep = np.zeros(len(trajs), np.float32), np.zeros(len(trajs), bool)
  if ok.any():
    adv_ok, keep_ok = grpo.get_advantage_fn(rl.advantage)(
      batch.totals[ok],
      [g for g, o in zip(batch.groups, ok) if o],
      eps=rl.adv_eps,
      drop_zero_variance=rl.drop_zero_variance or rl.dynamic_sampling,
    )
    adv[ok], keep[ok] = adv_ok, keep_ok
  # A row without generated tokens (a prompt longer than max_total_tokens) has nothing to learn from, and its
  # prompt may not fit a packing row.
  keep &= np.asarray([bool(t.action_mask.any()) for t in trajs])
  masked = shaping.over_turn([t.stop_reason for t in trajs]) & keep if rl.over_turn_masking else np.zeros_like(keep)
  keep &= ~masked  # over-turn masking: in their group's statistics, out of the loss
  kept = [t for t, k in zip(trajs, keep) if k]
  t1 = time.time()
  first: dict[str, float] = {}
  update_metrics: dict[str, float] = {}
  if kept:
    batches = packing.minibatches(kept, adv[keep], rl, vision_cfg, learner)
    for _ in range(rl.ppo_epochs):
      for micro in batches:
        update_metrics = learner.update(micro)
        first = first or update_metrics
  metrics = rollout_metrics(trajs, batch.rewards)
  metrics.update(batch.metrics)
  metrics.update({f"train/{k}": v for k, v in update_metrics.items() if not k.startswith("mismatch/")})
  # Measured by the first update, whose parameters are still the old policy's (docs/training.md).
  metrics.update({k: v for k, v in first.items() if k.startswith("mismatch/")})
  metrics["loss"] = update_metrics.get("loss", 0.0)
  metrics["kept_fraction"] = float(np.mean(keep)) if len(keep) else 0.0
  if rl.over_turn_masking:
    metrics["sampling/over_turn_masked"] = float(np.mean(masked)) if len(masked) else 0.0
  metrics["time/rollout_s"] = batch.seconds
  metrics["time/update_s"] = time.time() - t1
  # Token counts for the caller's throughput and MFU (popped there).
  metrics["_gen_tokens"] = sum(int(t.action_mask.sum()) for t in trajs)
  metrics["_rollout_tokens"] = sum(len(t.token_ids) for t in trajs)
  metrics["_train_tokens"] = sum(len(t.token_ids) for t in kept) * rl.ppo_epochs
  return metrics


# --------------------------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------------------------
def train(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
  """Runs (or resumes) training in `workdir`. Returns the last step's metrics.

  Steps [0, warmstart.steps) are the supervised warm start (when `config.warmstart.steps > 0`), the rest GRPO.
  With `config.eval.num_questions > 0`, the held-out evaluation runs on the warm-start checkpoint and on the final
  one (`final_eval.json`); with `config.log.report`, `report.html` / `report.png` are written at the end.
  """
  train_config.validate(config)  # every field's domain, registry names, plugins: before anything loads or compiles
  run_setup.maybe_init_distributed()
  epath.Path(workdir).mkdir(parents=True, exist_ok=True)  # workdir paths go through epath: local or gs://
  if jax.process_index() == 0:  # what `python -m deepeyes_jax.export` needs to turn a checkpoint into an HF model
    (epath.Path(workdir) / TRAIN_CONFIG_FILE).write_text(config.to_json_best_effort(indent=2))  # epath: gs:// too
  distributed = jax.process_count() > 1 or jax.distributed.is_initialized()
  if config.rl.off_policy_steps and distributed and not config.rl.sampler_devices:
    # Two threads dispatching programs onto the same devices: their order would differ between processes
    # (collectives across hosts would pair up wrongly). With devices of its own, each group's programs come from one
    # thread (docs/training.md).
    raise ValueError(
      f"config.rl.off_policy_steps={config.rl.off_policy_steps} with config.rl.sampler_devices=0: under "
      "jax.distributed (this run has several processes, or was launched with JAX_COORDINATOR_ADDRESS / "
      "DEEPEYES_DISTRIBUTED=1) one-step-off-policy rollouts need devices of their own: set config.rl.sampler_devices "
      f"to a multiple of the process count ({jax.process_count()}) that leaves every process a learner device, or "
      "config.rl.off_policy_steps=0"
    )
  mesh, sampler_mesh = _meshes(config)
  chief = jax.process_index() == 0
  if chief:
    print(f"{jax.process_count()} process(es), {jax.device_count()} devices, mesh {dict(mesh.shape)}", flush=True)
    if sampler_mesh is not mesh:
      print(f"sampler on devices of its own: mesh {dict(sampler_mesh.shape)}", flush=True)
  checkpoint = run_setup.model_dir(config, workdir)
  model = run_setup.load_model(config, mesh, checkpoint)
  tokenizer = load_tokenizer(config.model.tokenizer or checkpoint)
  sampler = Sampler(model, mesh=sampler_mesh, weight_layout=config.rollout.get("weight_layout", "tensor_parallel"))
  sampler.release()  # its copy of the weights is made before each rollout phase (sampler.push) and released after
  agent_cfg = run_setup.agent_config(config)
  judge = run_setup.make_judge(config, workdir)
  ws = config.get("warmstart")  # validate() imported the reward plugins and checked warmstart.steps < total_steps
  warm_steps = ws.steps if ws else 0

  # Every process reads the same global batch and runs the same host loop (parsing, cropping, rewards), so all
  # host-side inputs of the jitted functions are identical across processes; device work is sharded over the
  # global mesh. (Per-process data shards with process-local rollouts are a planned optimisation.)
  train_source = run_setup.data_source(config.data.train, config)

  def iterator(batch_size: int, seed: int):
    return make_train_iterator(
      train_source,
      seed=seed,
      batch_size=batch_size,
      shuffle=config.data.shuffle,
      num_epochs=config.data.num_epochs,
      process_index=0,
      process_count=1,
      known_sources=run_setup.known_data_source,  # a row whose data_source has no reward is skipped and counted
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
  # Built for the phase of the newest checkpoint. The optimiser state has the same structure in both phases (AdamW),
  # so any checkpoint restores into it; a fall-back past an unrestorable one into the other phase rebuilds it.
  newest = ckpt.manager.latest_step() or 0
  phase_cfg = warmstart_learner_config(config) if newest < warm_steps else learner_config(config)
  learner = Learner(model, phase_cfg, mesh=mesh)
  del model  # the learner owns the parameters from here on
  restored = ckpt.restore_latest(
    learner.state, learner.opt_state, lambda s: ws_iter if s < warm_steps else data_iter, config.total_steps
  )
  start, tool_state = 0, None
  if restored is not None:
    start, state, opt_state, meta = restored
    phase_cfg = warmstart_learner_config(config) if start < warm_steps else learner_config(config)
    if phase_cfg != learner.cfg:
      learner = Learner(nnx.merge(learner.graphdef, state), phase_cfg, mesh=mesh)
    learner.state, learner.opt_state, learner.step = state, opt_state, meta["learner_step"]
    if start == warm_steps:  # the warm-start checkpoint: GRPO starts with a fresh optimiser
      learner = _switch_to_rl(learner, config, mesh)
    tool_state = meta.get("tool_health")
    log.info("resuming from step %d", start)
  writer = make_writer(workdir, resume_step=start)
  if start == 0 and chief:
    writer.write_hparams({k: v for k, v in _flat(config.to_dict()).items()})
  progress = Progress(config.total_steps, start, warm_steps)
  n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(learner.state))
  peak = device_peak_flops() * jax.device_count()
  metrics: dict[str, float] = {}
  evaluator = held_out.HeldOut(
    config, workdir, tokenizer, sampler, agent_cfg, writer, make_tasks=lambda: run_setup.held_out_tasks(config)
  )
  probe = None  # SkillProbe, built at the first warm-start probe
  tool_health = ToolHealth(config.log.get("tool_collapse_fraction", 0.0), state=tool_state)

  # The sampler on devices of its own: the rollouts' small programs on uncommitted arrays (row keys, ...) run on one
  # of this process's sampler devices too, so that the rollout thread issues nothing to the learner's.
  own_device = None if sampler_mesh is mesh else _local_device(sampler_mesh)

  # Set when prefetched rollouts are dropped (a stop): they end at their next decode segment instead of finishing.
  # Single-process runs only: under jax.distributed every process must issue the same sampler programs, and the
  # processes would see the flag at different segments.
  drop_prefetch = threading.Event()

  def collect(step: int, cancel=None) -> Rollouts:
    with jax.default_device(own_device) if own_device is not None else contextlib.nullcontext():
      return collect_rollouts(step, config, sampler, tokenizer, agent_cfg, judge, data_iter, data_stats, cancel)

  off_policy = config.rl.off_policy_steps > 0
  executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="rollouts") if off_policy else None
  pending: concurrent.futures.Future | None = None  # the next step's rollouts, when they run during an update
  data_state = None  # the data iterator's state before `pending` drew its prompts

  # kill PID / Ctrl-C: the step in flight is finished and checkpointed. However the loop ends (a return, an error),
  # the rollout thread takes no new work (one in flight is not interruptible: it ends with its rollouts).
  with StopSignals() as stop, contextlib.ExitStack() as cleanup:
    if executor is not None:
      cleanup.callback(executor.shutdown, wait=False, cancel_futures=True)
    for step in range(start, config.total_steps):
      t0 = time.time()
      if step == warm_steps and warm_steps:
        sampler.state = learner.state
        evaluator.run("warmstart", step)  # the warm-start checkpoint (skipped if already done)
        progress.pause_ended()
        if learner.cfg.policy_loss == "nll":
          learner = _switch_to_rl(learner, config, mesh)
      if step < warm_steps:
        metrics = warmstart.warmstart_step(ws_iter, config, tokenizer, agent_cfg, sampler.config, learner, step)
        metrics["time/step_s"] = time.time() - t0
        every = ws.get("probe_every", 0)
        if every and ((step + 1) % every == 0 or step + 1 == warm_steps):
          probe = probe or warmstart.SkillProbe(config, tokenizer, agent_cfg, sampler.config, learner)
          metrics.update({f"skills/{k}": v for k, v in probe(learner).items()})
        writer.write_scalars(step + 1, metrics)
        if chief:
          print(progress.line(step + 1, metrics), flush=True)
        stopping = stop.requested  # one decision per step (a signal may arrive at any time)
        preempted = ckpt.reached_preemption(step + 1)
        data = ws_iter if step + 1 < warm_steps else data_iter
        _save(ckpt, step + 1, learner, data, config, warm_steps, bool(stopping or preempted))
        if _stopped(ckpt, step + 1, stopping, preempted, chief):
          writer.flush()
          return metrics
        continue

      if pending is not None:  # one-step-off-policy: rolled out while the previous update ran
        batch, pending = pending.result(), None
        sampler.release()
      else:
        sampler.push(learner.state)
        batch = collect(step)
        sampler.release()  # the learner step does not hold the sampler's copy of the weights
      prefetch = off_policy and step + 1 < config.total_steps and not stop.requested
      if prefetch and not _planned_save(ckpt, step + 1, config):
        # Step n+1's rollouts run now, with the weights before this update (staleness 1), while it runs. Not past a
        # planned checkpoint (the step after one is rolled out on-policy, so a resumed run repeats it exactly).
        data_state = data_iter.get_state()
        # In this thread, while no rollout runs: the push is the one program that spans both device groups.
        sampler.push(learner.state, private=True)  # the update donates learner.state
        drop_prefetch.clear()
        pending = executor.submit(collect, step + 1, None if distributed else drop_prefetch.is_set)
      metrics = learn(batch, learner, config, sampler.config.vision)
      metrics.update(tool_health.update(metrics["tool/calls_per_traj"]))
      metrics["time/step_s"] = time.time() - t0
      rollout_tokens = metrics.pop("_rollout_tokens")
      metrics["throughput/rollout_tokens_per_s"] = rollout_tokens / max(batch.seconds, 1e-9)
      metrics["throughput/generated_tokens_per_s"] = metrics.pop("_gen_tokens") / max(batch.seconds, 1e-9)
      flops = 2 * n_params * rollout_tokens + 6 * n_params * metrics.pop("_train_tokens")
      metrics["mfu"] = flops / max(metrics["time/step_s"], 1e-9) / peak
      if judge is not None:  # cumulative: requests, failures, fallbacks to the rule, deadlines, oversized replies, ...
        metrics.update({f"judge/{k}": float(v) for k, v in judge.metrics().items()})
      writer.write_scalars(step + 1, metrics)
      if chief:
        print(progress.line(step + 1, metrics), flush=True)
        if config.log.save_trajectories_every and (step + 1) % config.log.save_trajectories_every == 0:
          save_trajectories(
            batch.trajs[: config.log.num_saved_trajectories],
            epath.Path(workdir) / "rollouts",
            filename=f"step_{step + 1:06d}.jsonl",
          )
      # The stop decision, once per step, in this thread: a signal to a single-process run (it may arrive at any
      # time: read once), or orbax's preemption sync point under jax.distributed (the same step on every process;
      # asking again for the same step gives the same answer).
      stopping = stop.requested
      preempted = ckpt.reached_preemption(step + 1)
      if pending is not None and (stopping or preempted):
        # The next step's rollouts are dropped, and the checkpoint resumes before them. A single process cancels
        # them (they stop at their next decode segment); under jax.distributed every process waits for them alike
        # (they use the data iterator and the sampler's devices, which the save's barrier spans). Their failure does
        # not matter any more.
        drop_prefetch.set()
        try:
          pending.result()
        except RolloutCancelled:
          log.info("the prefetched rollouts of step %d were cancelled", step + 2)
        except Exception as e:  # noqa: BLE001 -- dropped rollouts: their error must not cost the checkpoint
          log.warning("the dropped prefetched rollouts of step %d failed: %s", step + 2, e)
        pending = None
        sampler.release()
        data_iter.set_state(data_state)
      _save(ckpt, step + 1, learner, data_iter, config, warm_steps, bool(stopping or preempted), tool_health.state())
      if _stopped(ckpt, step + 1, stopping, preempted, chief):
        _finish(writer, judge)
        return metrics
  ckpt.close()
  sampler.state = learner.state
  final = evaluator.run("final", config.total_steps)
  if final is not None and chief:
    final_eval = evaluator.write_final()
    if config.log.get("report"):
      trajs = evaluator.trajectories[: config.log.get("report_trajectories", 6)]
      path = write_report(workdir, final_eval, trajs, warmstart_steps=warm_steps, title="deepeyes_jax: " + workdir)
      print(f"report: {path}", flush=True)
  _finish(writer, judge)
  return metrics


def _local_device(mesh):
  """The first of `mesh`'s devices that belongs to this process."""
  return next(d for d in mesh.devices.flat if d.process_index == jax.process_index())


def _finish(writer, judge) -> None:
  """The run returns: metrics flushed, and the judge's verdict cache (kept in memory between rewrites on gs://)."""
  writer.flush()
  if judge is not None:
    judge.close()


def _planned_save(ckpt: Checkpointer, step: int, config) -> bool:
  """Whether checkpoint `step` (steps done) will be saved: orbax's decision (every `checkpoint.every_steps`, a first
  checkpoint, a preemption sync point) or the last step."""
  return step == config.total_steps or ckpt.manager.should_save(step)


def _save(
  ckpt: Checkpointer,
  step: int,
  learner: Learner,
  data_iterator,
  config,
  warm_steps: int,
  stop: bool,
  tool_health=None,
) -> None:
  """Orbax decides: every `checkpoint.every_steps`, the warm-start and last steps, and a preemption sync point
  (all processes agree on it after any of them got SIGTERM from the scheduler: spot / preemptible TPUs); and the
  step the run stops at (`stop`: a single-process run's SIGTERM / SIGINT, `StopSignals`, or the sync point)."""
  ckpt.save(
    step,
    learner.state,
    learner.opt_state,
    learner_step=learner.step,
    data_iterator=data_iterator,
    extra={"tool_health": tool_health} if tool_health else None,
    force=step in (config.total_steps, warm_steps) or stop,
  )


def _stopped(ckpt: Checkpointer, step: int, stopping: str | None, preempted: bool, chief: bool) -> bool:
  """After step `step` was saved: True (the checkpoint is durable, the run should return) on a preemption sync
  point or a stop signal."""
  if not (stopping or preempted):
    return False
  ckpt.close()
  why = f"{stopping} received" if stopping else "preemption"
  log.warning("%s: checkpoint of step %d written; exiting (re-run the same command to resume)", why, step)
  if chief:
    print(f"preempted: saved step {step}, exiting ({why}; re-run the same command to resume)", flush=True)
  return True


class StopSignals:
  """SIGTERM / SIGINT (`kill PID`, Ctrl-C) in a single-process run: finish the step in flight, checkpoint it, exit.

  Multi-process runs leave SIGTERM to orbax's preemption sync point (jax.distributed's own handler, which all
  processes agree through), so nothing is installed there. A second Ctrl-C interrupts at once. Only the main thread
  can install handlers; elsewhere (a thread of a notebook) nothing is installed either. A context manager: the
  previous handlers come back on exit."""

  SIGNALS = (signal.SIGTERM, signal.SIGINT)

  def __init__(self):
    self.requested: str | None = None  # the name of the first signal received
    self._previous: dict = {}

  def __enter__(self) -> StopSignals:
    if not jax.distributed.is_initialized() and threading.current_thread() is threading.main_thread():
      self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
    return self

  def __exit__(self, *exc) -> None:
    for s, handler in self._previous.items():
      signal.signal(s, handler)

  def _handle(self, signum, frame) -> None:
    if self.requested is not None and signum == signal.SIGINT:
      raise KeyboardInterrupt  # a second Ctrl-C: stop now
    self.requested = signal.Signals(signum).name
    print(f"{self.requested}: finishing the step in flight, then checkpointing it and exiting", flush=True)


def _switch_to_rl(learner: Learner, config, mesh) -> Learner:
  """The warm start is over: the same parameters, the GRPO loss and a fresh optimiser."""
  return Learner(nnx.merge(learner.graphdef, learner.state), learner_config(config), mesh=mesh)


def _flat(d: dict, prefix: str = "") -> dict[str, Any]:
  out = {}
  for k, v in d.items():
    key = f"{prefix}{k}"
    if isinstance(v, dict):
      out.update(_flat(v, key + "."))
    elif isinstance(v, (int, float, str, bool)):
      out[key] = v
  return out
