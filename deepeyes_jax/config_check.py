"""Config validation: collect every problem of a config, then raise once, naming each field, its value and what
is allowed.

    p = Problems()
    p.number("optim.learning_rate", config.optim.learning_rate, gt=0)
    p.choice("rl.aggregation", config.rl.aggregation, ("token_mean", "seq_mean"))
    p.name("rl.advantage", config.rl.advantage, grpo.get_advantage_fn)   # a registry lookup
    p.raise_if_any("training config")   # ConfigError (a ValueError) listing every problem, one per line

The checks of a training config are `rl/train_config.validate`, of an evaluation config `eval/config.validate`;
both run before anything loads or compiles. Imports nothing from the rest of the package (every layer may use it).
"""

from __future__ import annotations

import logging
import math
import numbers
import operator
from collections.abc import Callable, Iterable
from typing import Any

log = logging.getLogger(__name__)


class ConfigError(ValueError):
  """A config with out-of-domain values; ``problems`` lists them (each names the field, its value and the domain)."""

  def __init__(self, what: str, problems: list[str]):
    self.problems = list(problems)
    lines = "\n".join(f"  - {p}" for p in self.problems)
    super().__init__(f"{what}: {len(self.problems)} problem(s):\n{lines}")


def _domain(gt, ge, lt, le) -> str:
  bounds = [f"{op} {v}" for op, v in ((">", gt), (">=", ge), ("<", lt), ("<=", le)) if v is not None]
  return (" " + " and ".join(bounds)) if bounds else ""


class Problems:
  """Collects the problems of one config. ``prefix`` is prepended to every field name ("config.")."""

  def __init__(self, prefix: str = "config."):
    self.prefix = prefix
    self.problems: list[str] = []
    self.warnings: list[str] = []

  def add(self, field: str, value: Any, allowed: str) -> None:
    """Records ``config.FIELD=VALUE: must be ALLOWED``."""
    self.problems.append(f"{self.prefix}{field}={value!r}: must be {allowed}")

  def warn(self, field: str, value: Any, message: str) -> None:
    """A legal value that is probably a mistake: logged (``warnings`` keeps it), never raised."""
    text = f"{self.prefix}{field}={value!r}: {message}"
    self.warnings.append(text)
    log.warning("%s", text)

  def check(self, field: str, value: Any, ok: bool, allowed: str) -> bool:
    """Adds a problem unless ``ok``; returns ``ok``."""
    if not ok:
      self.add(field, value, allowed)
    return ok

  def number(
    self,
    field: str,
    value: Any,
    *,
    gt: float | None = None,
    ge: float | None = None,
    lt: float | None = None,
    le: float | None = None,
    integer: bool = False,
    also: tuple = (),
    note: str = "",
  ) -> bool:
    """A finite real number (an integer with ``integer``) within the bounds, or one of the values ``also`` (values
    with a meaning of their own, e.g. ``(0, None)`` for "off", explained by ``note``). Returns True when it passed."""
    allowed = f"{'an integer' if integer else 'a finite number'}{_domain(gt, ge, lt, le)}"
    if also:
      allowed += f", or {' or '.join(map(repr, also))}" + (f" ({note})" if note else "")
    if any(value is v or (v is not None and value == v and not isinstance(value, bool)) for v in also):
      return True
    is_int = isinstance(value, numbers.Integral) and not isinstance(value, bool)
    is_real = is_int or (isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value))
    ok = (is_int if integer else is_real) and all(
      bound is None or cmp(value, bound)
      for bound, cmp in ((gt, operator.gt), (ge, operator.ge), (lt, operator.lt), (le, operator.le))
    )
    return self.check(field, value, ok, allowed)

  def choice(self, field: str, value: Any, choices: Iterable[Any]) -> bool:
    choices = tuple(choices)
    return self.check(field, value, value in choices, f"one of {', '.join(map(repr, choices))}")

  def name(self, field: str, value: Any, lookup: Callable[[Any], Any]) -> bool:
    """A registry name: ``lookup(value)`` (e.g. ``grpo.get_advantage_fn``) must not raise; its message (which
    names the known entries) is the problem."""
    try:
      lookup(value)
    except (KeyError, ValueError, TypeError) as e:
      self.problems.append(f"{self.prefix}{field}={value!r}: {e}")
      return False
    return True

  def run(self, field: str, value: Any, fn: Callable[[], Any]) -> bool:
    """Runs a check that raises ValueError / TypeError / ImportError (a constructor's own validation, an import);
    its message is the problem."""
    try:
      fn()
    except (ValueError, TypeError, ImportError) as e:
      self.problems.append(f"{self.prefix}{field}={value!r}: {type(e).__name__}: {e}")
      return False
    return True

  def raise_if_any(self, what: str) -> list[str]:
    """ConfigError listing every problem; returns the warnings when there is none."""
    if self.problems:
      raise ConfigError(what, self.problems)
    return self.warnings
