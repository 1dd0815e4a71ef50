"""The argument of a config file's `get_config(arg)`: "key=value,key=value" parsed against typed defaults.

`--config configs/NAME.py:ARG` hands ARG to `get_config`. Every config file reads it with one parser, in the style
of big_vision's `parse_arg`:

    def get_config(arg=None):
      args = parse_arg(arg, size="7b", no_tool=False, steps=0)   # the defaults give the types
      if args.no_tool: ...

Values take the type of their default: bool accepts 1/0, true/false, yes/no (any case); int and float parse the
number; str is kept as written. An item without "=", a key given twice, a key not in `spec` (unless `lazy`) or a
value of the wrong type raise ValueError naming the key and the known keys or the expected type.

Imports nothing from the rest of the package: config files import it before anything heavy.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, TypeVar

import ml_collections

T = TypeVar("T")

_TRUE = ("1", "true", "yes")
_FALSE = ("0", "false", "no")


def _convert(key: str, value: str, default):
  typ = type(default)
  if typ is bool:
    v = value.lower()
    if v in _TRUE or v in _FALSE:
      return v in _TRUE
    raise ValueError(f"config argument {key}={value!r}: expected a bool (1/0, true/false, yes/no)")
  if default is None or typ is str:
    return value
  try:
    return typ(value)
  except (TypeError, ValueError):
    raise ValueError(f"config argument {key}={value!r}: expected {typ.__name__}") from None


def parse_arg(arg: str | None, lazy: bool = False, **spec) -> ml_collections.ConfigDict:
  """`arg` ("a=1,b=x", or None / "" for the defaults) parsed against `spec` (name -> default value).

  Returns a ConfigDict holding every key of `spec` (its default, or the value given, converted to the default's
  type; a default of None keeps the string). `lazy=True` also keeps keys `spec` does not name, as strings (a config
  that hands the rest of its argument on). Empty items (a trailing comma) are ignored.
  """
  out = dict(spec)
  given = set()
  for item in (arg or "").split(","):
    item = item.strip()
    if not item:
      continue
    key, sep, value = item.partition("=")
    key, value = key.strip(), value.strip()
    if not sep or not key:
      raise ValueError(
        f"config argument {item!r} is not key=value; known keys: {', '.join(spec) or '(none)'} (got {arg!r})"
      )
    if key in given:
      raise ValueError(f"config argument {key!r} given twice in {arg!r}")
    given.add(key)
    if key in spec:
      out[key] = _convert(key, value, spec[key])
    elif lazy:
      out[key] = value
    else:
      raise ValueError(f"unknown config argument {key!r} in {arg!r}; known keys: {', '.join(spec) or '(none)'}")
  return ml_collections.ConfigDict(out)


def dataclass_from(cls: type[T], *blocks: Mapping[str, Any], **overrides: Any) -> T:
  """`cls(...)` with each dataclass field taken from `overrides`, else from the first of `blocks` (config blocks,
  e.g. `config.optim, config.rl`) that has a key of that name, else the field's default (an older config without
  the field). The one way the runs turn config blocks into typed configs (AgentConfig, LearnerConfig, ...)."""
  kwargs = {}
  for field in dataclasses.fields(cls):
    if field.name in overrides:
      kwargs[field.name] = overrides[field.name]
      continue
    for block in blocks:
      if field.name in block:
        kwargs[field.name] = block[field.name]
        break
  return cls(**kwargs)
