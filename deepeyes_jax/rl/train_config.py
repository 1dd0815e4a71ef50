"""Validation of a training config (`configs/deepeyes_7b.py`, `configs/synthetic.py` and their variants), before
anything loads or compiles.

    warnings = validate(config)   # ConfigError (a ValueError) listing every problem; the warnings otherwise

Every field with a domain is checked and each problem names the field, its value and what is allowed: numbers
(learning rate > 0, grad_clip > 0 or 0 / None = off, ppo_epochs >= 1, min_pixels <= max_pixels, ...), choices,
registry names (advantage, policy loss, demonstrator: an unknown name used to fail only after two compilations and a
full rollout), reward plugin modules (imported here: they register reward functions, as the trainer needs anyway),
and the paths a run needs (data.train; model.checkpoint or model.tiny). The blocks an evaluation config shares are
checked by `eval/config.py`, the model block by `run_setup.model_problems`, the optimiser and loss fields by
`train_step.check_learner` (the same domains `LearnerConfig` enforces).
"""

from __future__ import annotations

import importlib

import ml_collections

from deepeyes_jax import run_setup
from deepeyes_jax.config_check import Problems
from deepeyes_jax.eval import config as eval_config
from deepeyes_jax.rl import grpo, warmstart
from deepeyes_jax.rl.train_step import check_learner

# LearnerConfig field -> the config key it is read from (rl/trainer.learner_config, warmstart_learner_config).
LEARNER_KEYS = {
  "learning_rate": "optim.learning_rate",
  "warmup_steps": "optim.warmup_steps",
  "weight_decay": "optim.weight_decay",
  "b1": "optim.b1",
  "b2": "optim.b2",
  "grad_clip": "optim.grad_clip",
  "policy_loss": "rl.policy_loss",
  "clip_low": "rl.clip_low",
  "clip_high": "rl.clip_high",
  "dual_clip": "rl.dual_clip",
  "aggregation": "rl.aggregation",
  "kl_coef": "rl.kl_coef",
  "entropy_coef": "rl.entropy_coef",
  "logits_chunk": "rl.logits_chunk",
  "rollout_correction": "rl.rollout_correction",
  "rollout_correction_threshold": "rl.rollout_correction_threshold",
}
WARMSTART_LEARNER_KEYS = {
  "learning_rate": "warmstart.learning_rate",
  "warmup_steps": "warmstart.warmup_steps",
  "weight_decay": "warmstart.weight_decay",
}


def _values(config: ml_collections.ConfigDict, keys: dict[str, str]) -> dict:
  """LearnerConfig field -> the value of its config key."""
  return {field: config[key.split(".")[0]][key.split(".")[1]] for field, key in keys.items()}


def validate(config: ml_collections.ConfigDict) -> list[str]:
  """Checks a training config; raises ``config_check.ConfigError`` (a ValueError) listing every problem found,
  each naming the field, its value and the allowed range. Returns the warnings (also logged), e.g. a GRPO group of
  one. Imports the reward plugins (``reward.plugins``)."""
  p = Problems()
  # Plugins first: a plugin module may register reward functions, advantages, losses or demonstrators that the
  # checks below look up by name.
  for module in filter(None, config.reward.plugins.split(",")):
    p.run("reward.plugins", module, lambda m=module: importlib.import_module(m))
  p.number("seed", config.seed, ge=0, lt=2**32, integer=True)
  steps_ok = p.number("total_steps", config.total_steps, ge=1, integer=True)

  # model
  tiny = config.model.get("tiny")
  p.check("model.checkpoint", config.model.checkpoint, bool(config.model.checkpoint or tiny), "set (or model.tiny)")
  run_setup.model_problems(p, config)

  # data
  p.check("data.train", config.data.train, bool(config.data.train), "set: parquet / JSONL paths or synthetic:SPLIT")
  p.number("data.batch_size", config.data.batch_size, ge=1, integer=True)
  p.number("data.num_epochs", config.data.num_epochs, ge=1, integer=True, also=(None,), note="forever")
  if "synthetic" in config:
    p.number("synthetic.num_records", config.synthetic.num_records, ge=1, integer=True)
    p.run("synthetic.scene", config.synthetic.scene.to_dict(), lambda: run_setup.scene_config(config))

  eval_config.check_rollout(p, config.rollout)

  # rl and optim
  p.name("rl.advantage", config.rl.advantage, grpo.get_advantage_fn)
  p.number("rl.adv_eps", config.rl.adv_eps, gt=0)
  values = _values(config, LEARNER_KEYS)
  values["dual_clip"] = values["dual_clip"] or None  # 0 = off (as rl/trainer.learner_config reads it)
  check_learner(p, values, LEARNER_KEYS)
  p.number("rl.ppo_epochs", config.rl.ppo_epochs, ge=1, integer=True)
  p.number("rl.num_minibatches", config.rl.num_minibatches, ge=1, integer=True)
  p.choice("rl.old_logprobs", config.rl.old_logprobs, ("sampler", "recompute"))
  p.number("rl.min_row_len", config.rl.min_row_len, ge=1, integer=True)
  p.number("rl.micro_batch_rows", config.rl.micro_batch_rows, ge=1, integer=True)
  _check_algorithms(p, config)

  # warm start
  ws = config.get("warmstart")
  if ws is not None:
    if p.number("warmstart.steps", ws.steps, ge=0, integer=True) and steps_ok:
      p.check("warmstart.steps", ws.steps, ws.steps < config.total_steps, f"< total_steps ({config.total_steps})")
    p.number("warmstart.batch_size", ws.batch_size, ge=1, integer=True)
    p.name("warmstart.demonstrator", ws.demonstrator, warmstart.get_demonstrator)
    fractions = {k: ws.get(k, 0.0) for k in ("zoom_fraction", "no_tool_fraction", "ground_fraction", "read_fraction")}
    p.run("warmstart", fractions, lambda: warmstart.draw_modes([], 0, **fractions))
    p.number("warmstart.probe_every", ws.get("probe_every", 0), ge=0, integer=True)
    p.number("warmstart.probe_questions", ws.get("probe_questions", 32), ge=1, integer=True)
    check_learner(p, _values(config, WARMSTART_LEARNER_KEYS), WARMSTART_LEARNER_KEYS)

  eval_config.check_judge(p, config.reward)

  # held-out evaluation
  if "eval" in config:
    p.number("eval.num_questions", config.eval.num_questions, ge=0, integer=True)
    p.number("eval.batch_size", config.eval.batch_size, ge=1, integer=True)
    if config.eval.num_questions:
      p.check("eval.data", config.eval.data, bool(config.eval.data), "set when eval.num_questions > 0")

  eval_config.check_mesh(p, config.mesh)
  c = config.checkpoint
  p.number("checkpoint.every_steps", c.every_steps, ge=1, integer=True)
  p.number("checkpoint.max_to_keep", c.max_to_keep, ge=1, integer=True, also=(None,), note="keep all")
  p.number("checkpoint.keep_period", c.keep_period, ge=1, integer=True, also=(None,), note="off")
  p.number("log.save_trajectories_every", config.log.save_trajectories_every, ge=0, integer=True)
  p.number("log.num_saved_trajectories", config.log.num_saved_trajectories, ge=0, integer=True)
  p.number("log.tool_collapse_fraction", config.log.get("tool_collapse_fraction", 0.0), ge=0, lt=1)
  return p.raise_if_any("training config")


def _check_algorithms(p: Problems, config: ml_collections.ConfigDict) -> None:
  """The fields of the 2025-26 algorithms (docs/training.md, "RL algorithms") and how they combine."""
  rl = config.rl
  if rl.policy_loss == "gspo":
    p.check("rl.aggregation", rl.aggregation, rl.aggregation == "seq_mean", "'seq_mean' with rl.policy_loss='gspo'")
    # GSPO's clip band (3e-4) is narrower than the sampler / learner numerics gap: on the sampler's log-probs most
    # sequences would be clipped from the first update.
    p.check(
      "rl.old_logprobs", rl.old_logprobs, rl.old_logprobs == "recompute", "'recompute' with rl.policy_loss='gspo'"
    )
  if rl.rollout_correction != "none":
    p.check(
      "rl.old_logprobs",
      rl.old_logprobs,
      rl.old_logprobs == "recompute",
      f"'recompute' with rl.rollout_correction={rl.rollout_correction!r} (its ratio is the learner's old policy "
      "over the sampler's log-probs)",
    )
  if p.choice("rl.dynamic_sampling", rl.dynamic_sampling, (False, True)) and rl.dynamic_sampling:
    p.check(
      "rl.dynamic_sampling", rl.dynamic_sampling, config.rollout.group_size > 1, "False with rollout.group_size 1"
    )
  p.number("rl.dynamic_sampling_max_rounds", rl.dynamic_sampling_max_rounds, ge=1, integer=True)
  if p.number("rl.overlong_buffer", rl.overlong_buffer, ge=0, integer=True) and rl.overlong_buffer:
    budget = config.rollout.max_total_tokens - config.rollout.max_prompt_tokens
    p.check("rl.overlong_buffer", rl.overlong_buffer, rl.overlong_buffer < budget, f"< the response budget {budget}")
  p.number("rl.overlong_penalty", rl.overlong_penalty, ge=0)
  p.choice("rl.over_turn_masking", rl.over_turn_masking, (False, True))
  if p.choice("rl.off_policy_steps", rl.off_policy_steps, (0, 1)) and rl.off_policy_steps:
    if config.checkpoint.every_steps == 1:
      p.warn("rl.off_policy_steps", rl.off_policy_steps, "no effect with checkpoint.every_steps=1 (the step after a "
             "planned checkpoint is rolled out on-policy)")  # fmt: skip
  if p.number("rl.sampler_devices", rl.sampler_devices, ge=0, integer=True) and rl.sampler_devices:
    p.check("rl.sampler_devices", rl.sampler_devices, rl.off_policy_steps > 0, "0 unless rl.off_policy_steps > 0")
