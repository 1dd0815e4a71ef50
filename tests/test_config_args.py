"""`config_args.parse_arg`: the one parser of `get_config(arg)` strings, and the config files that use it."""

import importlib.util
import os

import ml_collections
import pytest

from deepeyes_jax.config_args import parse_arg

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_config(name: str):
  spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "configs", f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.mark.parametrize("arg", [None, "", " , "])
def test_no_argument_gives_the_defaults(arg):
  args = parse_arg(arg, size="full", no_tool=False, steps=0, lr=1e-3)
  assert args.to_dict() == {"size": "full", "no_tool": False, "steps": 0, "lr": 1e-3}


def test_values_take_the_type_of_their_default():
  args = parse_arg(" size=tiny , no_tool=1,steps=12,lr=2.5e-4,", size="full", no_tool=False, steps=0, lr=1e-3)
  assert args.size == "tiny" and args.no_tool is True and args.steps == 12 and args.lr == 2.5e-4
  assert type(args.steps) is int and type(args.lr) is float
  assert parse_arg("name=a=b", name="").name == "a=b"  # split at the first "="
  assert parse_arg("x=7", x=None).x == "7"  # a default of None keeps the string


@pytest.mark.parametrize("value,want", [("1", True), ("TRUE", True), ("yes", True), ("0", False), ("False", False)])
def test_bools(value, want):
  assert parse_arg(f"flag={value}", flag=not want).flag is want
  assert parse_arg(f"flag={value}", flag=want).flag is want


@pytest.mark.parametrize(
  "arg,match",
  [
    ("sise=tiny", r"unknown config argument 'sise'.*known keys: size, no_tool"),
    ("size", r"'size' is not key=value; known keys: size, no_tool"),
    ("=tiny", r"'=tiny' is not key=value"),
    ("size=tiny,size=full", r"'size' given twice"),
    ("no_tool=2", r"no_tool='2': expected a bool"),
  ],
)
def test_errors_name_the_key(arg, match):
  with pytest.raises(ValueError, match=match):
    parse_arg(arg, size="full", no_tool=False)


def test_bad_numbers_name_the_key_and_type():
  with pytest.raises(ValueError, match=r"steps='1.5': expected int"):
    parse_arg("steps=1.5", steps=0)
  with pytest.raises(ValueError, match=r"lr='fast': expected float"):
    parse_arg("lr=fast", lr=1e-3)


def test_lazy_keeps_unknown_keys_as_strings():
  args = parse_arg("res=8k,extra=3", lazy=True, res="4k")
  assert args.res == "8k" and args.extra == "3"


def test_config_files_keep_their_variants():
  recipe, synthetic = load_config("deepeyes_7b"), load_config("synthetic")
  assert recipe.get_config().model.size == "7b"
  assert recipe.get_config("size=tiny").total_steps == 2
  assert synthetic.get_config("variant=ci").total_steps == 6
  with pytest.raises(ValueError, match="size must be one of"):
    recipe.get_config("size=13b")
  with pytest.raises(ValueError, match="unknown config argument 'variant'.*known keys: size"):
    recipe.get_config("variant=ci")

  vstar, hrbench, pope = load_config("eval_vstar"), load_config("eval_hrbench"), load_config("eval_pope")
  base = vstar.get_config()
  assert base.no_tool is False and base.dtype == "bfloat16"
  tiny = vstar.get_config("size=tiny,no_tool=true")
  assert tiny.no_tool is True and tiny.dtype == "float32" and tiny.batch_size == 2
  assert pope.get_config("no_tool=1").no_tool and pope.get_config().rollout.max_tokens_per_turn == 1024
  h8 = hrbench.get_config("res=8k,size=tiny")
  assert h8.benchmark == "hrbench_8k" and h8.batch_size == 2 and h8.rollout.max_tokens_per_turn == 16
  assert hrbench.get_config("res=8k").batch_size == 8 and hrbench.get_config().benchmark == "hrbench_4k"
  with pytest.raises(ValueError, match="unknown config argument 'resolution'.*known keys: res, size, no_tool"):
    hrbench.get_config("resolution=8k")
  with pytest.raises(ValueError, match="size must be 'full' or 'tiny'"):
    vstar.get_config("size=7b")


def test_dataclass_from_takes_fields_from_the_first_block_that_has_them():
  import dataclasses

  from deepeyes_jax.config_args import dataclass_from

  @dataclasses.dataclass(frozen=True)
  class Opt:
    lr: float = 1.0
    clip: float | None = 1.0
    name: str = "adam"
    steps: int = 7

  optim = ml_collections.ConfigDict({"lr": 0.5, "clip": 2.0, "unrelated": 3})
  rl = ml_collections.ConfigDict({"clip": 9.0, "name": "sgd"})
  got = dataclass_from(Opt, optim, rl, clip=None)
  assert got == Opt(lr=0.5, clip=None, name="sgd", steps=7)  # override > first block > later block > default
