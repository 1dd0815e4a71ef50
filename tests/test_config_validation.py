"""Config validation before anything loads or compiles (issue #21, "validate early"): every field with a domain is
checked, every problem is named at once (field, value, allowed range), unknown registry names and reward plugins
that do not import fail at start, and every shipped config and variant validates cleanly."""

from pathlib import Path

import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from deepeyes_jax import config_reference as cr
from deepeyes_jax import evaluate, run_setup
from deepeyes_jax.config_check import ConfigError, Problems
from deepeyes_jax.data.deepeyes import write_deepeyes_parquet
from deepeyes_jax.eval import config as eval_config
from deepeyes_jax.rl import train_config
from deepeyes_jax.rl.train_step import LearnerConfig, make_optimizer

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").glob("*.py"))
# What each config's documented command line sets (configs/*.py docstrings): the paths of a run.
TRAIN_PATHS = {"model.checkpoint": "/ckpt/Qwen2.5-VL-7B-Instruct", "data.train": "/data/deepeyes/*.parquet"}
EVAL_PATHS = {"checkpoint": "/ckpt/DeepEyes-7B", "data_path": "/data/bench", "image_dir": "/data/coco/val2014"}


def _set(config: ml_collections.ConfigDict, key: str, value) -> None:
  *blocks, name = key.split(".")
  node = config
  for b in blocks:
    node = node[b]
  node[name] = value


def _shipped():
  for path in CONFIGS:
    module = cr.load_module(path)
    for variant in [None, *cr.variants(module, path)]:
      yield pytest.param(module, variant, id=f"{path.stem}:{variant or 'default'}")


def _filled(module, variant) -> ml_collections.ConfigDict:
  config = module.get_config(variant)
  if "benchmark" in config:
    for key, value in EVAL_PATHS.items():
      _set(config, key, config[key] or value)
  else:
    if not config.model.checkpoint and not config.model.get("tiny"):
      _set(config, "model.checkpoint", TRAIN_PATHS["model.checkpoint"])
    if not config.data.train:
      _set(config, "data.train", TRAIN_PATHS["data.train"])
  return config


def _validate(config):
  return eval_config.validate(config) if "benchmark" in config else train_config.validate(config)


@pytest.mark.parametrize("module,variant", list(_shipped()))
def test_every_shipped_config_and_variant_validates_cleanly(module, variant):
  assert _validate(_filled(module, variant)) == []


def test_the_shipped_configs_are_all_covered():
  names = {p.stem for p in CONFIGS}
  assert {"deepeyes_7b", "synthetic", "eval_vstar", "eval_hrbench", "eval_pope"} <= names
  assert set(cr.variants(cr.load_module(ROOT / "configs" / "deepeyes_7b.py"), None)) >= {"size=tiny", "size=3b"}


def _synthetic_ci():
  return _filled(cr.load_module(ROOT / "configs" / "synthetic.py"), "variant=ci")


def _eval_tiny():
  return _filled(cr.load_module(ROOT / "configs" / "eval_vstar.py"), "size=tiny")


# (field, bad value, what the message must say about the allowed range)
TRAIN_CASES = [
  ("optim.learning_rate", -1e-4, "> 0"),
  ("optim.learning_rate", 0.0, "> 0"),
  ("optim.grad_clip", -1.0, "> 0, or 0 or None (no clipping)"),  # optax would flip the gradient
  ("optim.b2", 1.0, ">= 0 and < 1"),
  ("optim.weight_decay", -0.1, ">= 0"),
  ("optim.warmup_steps", -1, ">= 0"),
  ("rl.ppo_epochs", 0, ">= 1"),
  ("rl.num_minibatches", 0, ">= 1"),
  ("rl.clip_low", -0.2, ">= 0 and < 1"),
  ("rl.clip_high", -0.2, ">= 0"),
  ("rl.dual_clip", 0.5, "> 1, or None (off)"),
  ("rl.adv_eps", 0.0, "> 0"),
  ("rl.kl_coef", -1.0, ">= 0"),
  ("rl.aggregation", "mean", "'token_mean', 'seq_mean'"),
  ("rl.old_logprobs", "fresh", "'sampler', 'recompute'"),
  ("rl.micro_batch_rows", 0, ">= 1"),
  ("rl.logits_chunk", 0, ">= 1"),
  ("rl.advantage", "grpoo", "did you mean 'grpo'"),
  ("rl.policy_loss", "ppo", "registered: gspo, nll, ppo_clip"),
  ("warmstart.demonstrator", "human", "registered: synthetic"),
  ("warmstart.steps", 100, "< total_steps (6)"),
  ("warmstart.learning_rate", -1.0, "> 0"),
  ("warmstart.zoom_fraction", 1.5, "fractions must be in [0, 1]"),
  ("reward.plugins", "no_such_reward_plugin", "ModuleNotFoundError"),
  ("reward.judge_workers", 0, ">= 1"),
  ("rollout.group_size", 0, ">= 1"),
  ("rollout.temperature", -0.5, ">= 0"),
  ("rollout.top_p", 0.0, "> 0 and <= 1"),
  ("rollout.top_p", 1.5, "> 0 and <= 1"),
  ("rollout.top_k", -1, ">= 0"),
  ("rollout.min_pixels", 10**8, "<= rollout.max_pixels (28900)"),
  ("rollout.max_total_tokens", 0, ">= 1"),
  ("rollout.max_prompt_tokens", 4096, "<= rollout.max_total_tokens (512)"),
  ("rollout.engine", "fast", "'continuous', 'lockstep'"),
  ("rollout.coordinate_frame", "pixels", "'original', 'resized'"),
  ("rollout.segment_release", 2.0, ">= 0 and <= 1"),
  ("rollout.weight_layout", "replicated", "'tensor_parallel', 'learner'"),
  ("model.dtype", "int8", "a floating dtype"),
  ("model.remat", "some", "'none'"),
  ("model.attention_impl", "flash", "unknown attention impl"),
  ("data.batch_size", 0, ">= 1"),
  ("data.train", "", "set"),
  ("checkpoint.max_to_keep", 0, ">= 1, or None (keep all)"),
  ("checkpoint.every_steps", 0, ">= 1"),
  ("mesh.fsdp", 0, ">= 1, or -1"),
  ("total_steps", 0, ">= 1"),
  ("seed", -1, ">= 0 and < 4294967296"),
  ("eval.batch_size", 0, ">= 1"),
  ("synthetic.num_records", 0, ">= 1"),
  ("synthetic.scene.grid", 1, "grid >= 2"),
]


def test_every_problem_is_listed_at_once():
  config = _synthetic_ci()
  bad = {"optim.grad_clip": -1.0, "optim.learning_rate": -1e-6, "rl.ppo_epochs": 0, "rl.clip_low": -0.1}
  bad |= {"rollout.min_pixels": 10**8, "checkpoint.max_to_keep": 0, "rl.advantage": "nope"}
  for key, value in bad.items():
    _set(config, key, value)
  with pytest.raises(ConfigError) as info:
    train_config.validate(config)
  assert len(info.value.problems) == len(bad)
  for key, value in bad.items():
    assert f"config.{key}={value!r}" in str(info.value)
  assert str(info.value).startswith(f"training config: {len(bad)} problem(s):")


def test_off_values_are_accepted():
  config = _synthetic_ci()
  for key, value in {"optim.grad_clip": 0.0, "rl.dual_clip": 0.0, "checkpoint.max_to_keep": None}.items():
    _set(config, key, value)
  assert train_config.validate(config) == []
  config.optim.grad_clip = None
  assert train_config.validate(config) == []


def test_a_group_of_one_warns_that_grpo_learns_nothing(caplog):
  config = _synthetic_ci()
  config.rollout.group_size = 1
  [warning] = train_config.validate(config)
  assert "config.rollout.group_size=1" in warning and "GRPO needs >= 2" in warning
  assert "GRPO needs >= 2" in caplog.text


def test_reward_plugins_are_imported_and_register():
  config = _synthetic_ci()
  config.reward.plugins = "reward_plugin"  # tests/reward_plugin.py
  assert train_config.validate(config) == []
  assert run_setup.known_data_source("test_text_hash")


def test_model_options_lists_every_model_problem():
  config = _synthetic_ci()
  config.model.dtype, config.model.remat = "int32", "most"
  with pytest.raises(ValueError) as info:
    run_setup.model_options(config)
  assert "config.model.dtype='int32'" in str(info.value) and "config.model.remat='most'" in str(info.value)
  config.model.dtype, config.model.remat = "bfloat16", "dots"
  assert run_setup.model_options(config)["dtype"] == jnp.bfloat16


# ----------------------------------------------------------------------------------------------------------------
# LearnerConfig


def test_learner_config_refuses_values_outside_their_domain():
  with pytest.raises(ValueError, match=r"LearnerConfig.grad_clip=-1"):
    LearnerConfig(grad_clip=-1)
  with pytest.raises(ValueError) as info:
    LearnerConfig(learning_rate=-1.0, clip_low=2.0, policy_loss="nope", aggregation="sum")
  assert len(info.value.problems) == 4 and "LearnerConfig.policy_loss='nope'" in str(info.value)
  LearnerConfig(grad_clip=None)
  LearnerConfig(grad_clip=0, dual_clip=None)


@pytest.mark.parametrize("grad_clip", [0, None, 1.0])
def test_grad_clip_zero_or_none_switches_clipping_off(grad_clip):
  tx, _ = make_optimizer(LearnerConfig(learning_rate=1.0, grad_clip=grad_clip, weight_decay=0.0))
  params = {"w": jnp.zeros(3)}
  updates, _ = tx.update({"w": jnp.asarray([3.0, 4.0, 0.0])}, tx.init(params), params)
  # clip_by_global_norm(0) would zero the gradient, and so Adam's step; off (or at 1.0) Adam's first step is
  # -lr * sign(g).
  np.testing.assert_allclose(np.asarray(updates["w"]), [-1.0, -1.0, 0.0], atol=1e-4)


# ----------------------------------------------------------------------------------------------------------------
# Evaluation configs


EVAL_CASES = [
  ("benchmark", "mmmu", "'vstar'"),
  ("checkpoint", None, "set"),
  ("data_path", None, "set"),
  ("num_samples", 0, ">= 1"),
  ("num_samples", 4, "rollout.temperature=0"),
  ("batch_size", 0, ">= 1"),
  ("limit", -1, ">= 0"),
  ("dtype", "int8", "a floating dtype"),
  ("rollout.top_p", 0.0, "> 0 and <= 1"),
  ("rollout.min_pixels", 10**7, "<= rollout.max_pixels"),
  ("rollout.max_turns", 0, ">= 1"),
  ("reward.judge_workers", 0, ">= 1"),
  ("mesh.tensor", -2, ">= 1, or -1"),
]


KINDS = {"train": (_synthetic_ci, train_config.validate), "eval": (_eval_tiny, eval_config.validate)}
CASES = [("train", *c) for c in TRAIN_CASES] + [("eval", *c) for c in EVAL_CASES]


@pytest.mark.parametrize("kind,key,value,allowed", CASES, ids=[f"{c[0]}:{c[1]}={c[2]}" for c in CASES])
def test_a_bad_value_is_named_with_its_allowed_range(kind, key, value, allowed):
  make, validate = KINDS[kind]
  config = make()
  _set(config, key, value)
  with pytest.raises(ConfigError) as info:
    validate(config)
  # Values checked by a constructor or a function of their block are named by the block.
  field = "synthetic.scene" if key.startswith("synthetic.scene") else "warmstart" if "fraction" in key else key
  [problem] = info.value.problems
  assert problem.startswith(f"config.{field}=") and allowed in problem, problem
  assert isinstance(info.value, ValueError)


def test_pope_needs_its_image_directory():
  config = cr.load_module(ROOT / "configs" / "eval_pope.py").get_config()
  config.checkpoint, config.data_path = "/ckpt", "/pope"
  with pytest.raises(ConfigError, match=r"config.image_dir=''"):
    eval_config.validate(config)


def test_evaluate_validates_before_loading_anything(tmp_path):
  config = _eval_tiny()
  config.checkpoint = config.data_path = str(tmp_path / "does_not_exist")  # never opened
  config.rollout.temperature, config.rollout.top_p = -1.0, 2.0
  with pytest.raises(ConfigError) as info:
    evaluate.run(config)
  assert len(info.value.problems) == 2


def test_problems_number_rejects_non_numbers_and_non_finite():
  p = Problems()
  assert not p.number("a", "1", ge=0) and not p.number("b", float("nan")) and not p.number("c", True, ge=0)
  assert not p.number("d", 1.5, ge=1, integer=True) and p.number("e", 2, ge=1, integer=True)
  assert p.problems[0] == "config.a='1': must be a finite number >= 0"
  assert p.problems[3] == "config.d=1.5: must be an integer >= 1"


# ----------------------------------------------------------------------------------------------------------------
# Held-out tasks: bad rows skipped as the training pipeline skips them


def test_held_out_tasks_skip_bad_records(tmp_path):
  from PIL import Image

  def record(i, source="vstar", images=1):
    return {
      "data_source": source,
      "prompt": [{"role": "user", "content": "<image>" * images + f"Q{i}?"}],
      "images": [Image.new("RGB", (32, 32))] * images,
      "reward_model": {"ground_truth": "a"},
      "extra_info": {"index": i},
    }

  recs = [record(0, images=0), record(1), record(2, source="no_such_source"), record(3), record(4)]
  path = write_deepeyes_parquet(tmp_path / "heldout.parquet", recs)
  config = ml_collections.ConfigDict({"seed": 0, "eval": {"data": str(path), "num_questions": 2}})
  assert [t.task_id for t in run_setup.held_out_tasks(config)] == ["vstar-1", "vstar-3"]
  config.eval.data = write_deepeyes_parquet(tmp_path / "bad.parquet", recs[:1] + recs[2:3])
  with pytest.raises(ValueError, match="all 2 records"):
    run_setup.held_out_tasks(config)
