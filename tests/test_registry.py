"""`registry.Registry` and the registries built on it (advantages, policy losses, demonstrators)."""

import pytest

from deepeyes_jax.registry import Registry, UnknownNameError


def f():
  return 1


def g():
  return 2


def test_register_get_names_contains():
  reg = Registry("widget")
  assert reg.register("one", "uno")(f) is f  # a decorator that returns its argument
  reg.register("two")(g)
  assert reg.get("one") is f and reg.get("uno") is f and reg["two"] is g
  assert reg.names() == ["one", "two", "uno"] and sorted(reg) == reg.names() and len(reg) == 3
  assert "uno" in reg and "three" not in reg and 3 not in reg
  assert dict(reg.items()) == {"one": f, "uno": f, "two": g}
  assert reg.unregister("uno") is f and "uno" not in reg and reg.unregister("uno") is None


def test_unknown_name_names_kind_name_known_and_the_closest():
  reg = Registry("widget")
  reg.register("ppo_clip")(f)
  reg.register("nll")(g)
  with pytest.raises(UnknownNameError) as err:
    reg.get("ppo_clp")
  message = str(err.value)
  assert message == "unknown widget 'ppo_clp'; registered: nll, ppo_clip; did you mean 'ppo_clip'?"
  assert isinstance(err.value, KeyError) and isinstance(err.value, ValueError)
  with pytest.raises(KeyError, match=r"did you mean 'ppo_clip'\?$"):
    reg.get("PPO_Clip")  # case is ignored when looking for the closest name
  with pytest.raises(KeyError, match=r"unknown widget 'zzz'; registered: nll, ppo_clip$"):
    reg["zzz"]  # no close match: no suggestion
  with pytest.raises(KeyError, match=r"registered: \(none\)"):
    Registry("gadget").get("x")
  with pytest.raises(KeyError, match=r"unknown widget \['a'\]"):
    reg.get(["a"])  # unhashable: still the registry's error


def test_re_registering_needs_overwrite():
  reg = Registry("widget")
  reg.register("a")(f)
  reg.register("a")(f)  # the same entry again (a module imported twice): fine
  with pytest.raises(ValueError, match="a widget is already registered as 'a'; pass overwrite=True"):
    reg.register("b", "a")(g)
  assert "b" not in reg  # nothing registered when one name clashes
  reg.register("a", overwrite=True)(g)
  assert reg.get("a") is g


def test_package_registries_keep_their_functions():
  from deepeyes_jax.rl import grpo, warmstart

  assert grpo.get_advantage_fn("grpo") is grpo.ADVANTAGES["grpo"]
  assert set(grpo.ADVANTAGES.names()) >= {"grpo", "dr_grpo", "rloo"}
  assert set(grpo.POLICY_LOSSES.names()) >= {"ppo_clip", "nll"}
  assert grpo.get_policy_loss("nll") is grpo.POLICY_LOSSES.get("nll")
  with pytest.raises(KeyError, match="unknown policy loss 'ppoclip'.*did you mean 'ppo_clip'"):
    grpo.get_policy_loss("ppoclip")
  assert warmstart.get_demonstrator("synthetic") is warmstart.synthetic_demonstrator
  with pytest.raises(ValueError, match="unknown demonstrator 'synthetc'.*did you mean 'synthetic'"):
    warmstart.get_demonstrator("synthetc")
