"""Named registries: advantage estimators, policy losses, demonstrators, reward functions, model presets.

    ADVANTAGES = Registry("advantage estimator")

    @ADVANTAGES.register("grpo")
    def grpo_advantages(rewards, group_ids, **kw): ...

    ADVANTAGES.get("grpo")       # the function; an unknown name raises UnknownNameError naming the known ones
    "grpo" in ADVANTAGES, ADVANTAGES.names()

A Registry is a read-only mapping (`registry[name]`, iteration, `len`) with `register` and `unregister` on top.
Imports nothing from the rest of the package.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterator, Mapping
from typing import Generic, TypeVar

T = TypeVar("T")


class UnknownNameError(KeyError, ValueError):
  """A name no entry of a registry has. A KeyError (a registry is a mapping) and a ValueError (the name usually
  comes from a config value); the message names the registry, the name, the known names and the closest one."""

  def __str__(self) -> str:  # KeyError's str() would quote the message
    return str(self.args[0]) if self.args else ""


class Registry(Mapping[str, T], Generic[T]):
  """Entries by name. `kind` names what the registry holds in error messages ("advantage estimator")."""

  def __init__(self, kind: str):
    self.kind = kind
    self._entries: dict[str, T] = {}

  def register(self, name: str, *aliases: str, overwrite: bool = False) -> Callable[[T], T]:
    """Decorator: registers its argument under `name` and `aliases` and returns it unchanged.

    A name that already holds another entry raises ValueError unless `overwrite=True`."""

    def decorator(entry: T) -> T:
      for n in (name, *aliases):
        if n in self._entries and self._entries[n] is not entry and not overwrite:
          raise ValueError(f"a {self.kind} is already registered as {n!r}; pass overwrite=True to replace it")
      for n in (name, *aliases):
        self._entries[n] = entry
      return entry

    return decorator

  def unregister(self, name: str) -> T | None:
    """Removes `name` (not its aliases); returns its entry, or None when there was none."""
    return self._entries.pop(name, None)

  def get(self, name: str) -> T:  # type: ignore[override]  # no default: an unknown name is an error
    """The entry registered as `name`; UnknownNameError (a KeyError) naming the known names otherwise."""
    try:
      return self._entries[name]
    except (KeyError, TypeError):
      raise UnknownNameError(self.unknown_message(name)) from None

  def unknown_message(self, name) -> str:
    known = self.names()
    by_lower = {n.lower(): n for n in known}  # "7B" -> "7b": case is the commonest slip
    close = difflib.get_close_matches(str(name).lower(), list(by_lower), n=1)
    hint = f"; did you mean {by_lower[close[0]]!r}?" if close else ""
    return f"unknown {self.kind} {name!r}; registered: {', '.join(known) or '(none)'}{hint}"

  def names(self) -> list[str]:
    """The registered names (aliases included), sorted."""
    return sorted(self._entries)

  def __getitem__(self, name: str) -> T:
    return self.get(name)

  def __contains__(self, name) -> bool:
    return name in self._entries

  def __iter__(self) -> Iterator[str]:
    return iter(self._entries)

  def __len__(self) -> int:
    return len(self._entries)

  def __repr__(self) -> str:
    return f"Registry({self.kind!r}, {self.names()})"
