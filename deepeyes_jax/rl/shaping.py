"""Host-side decisions on a step's trajectories before the update (numpy): reward shaping and which rows learn.

    totals = rewards + overlong_penalty(response_lengths, budgets, buffer=..., factor=...)   # DAPO
    keep &= ~over_turn([t.stop_reason for t in trajectories])                                 # Mini-o3
    signal = groups_with_signal(totals, group_ids, ok)                                        # DAPO dynamic sampling

docs/training.md ("RL algorithms") has the table of what each does, its config and its source.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

# Why a trajectory ended that means "the limits cut it", not "the policy chose to stop" (agent/trajectory.STOP_REASONS):
# the turn limit, the image limit, the context (max_total_tokens). Not "turn_length" (one turn ran to
# max_tokens_per_turn): that is mostly runaway repetition, and its negative reward is the signal against it.
OVER_LIMIT_STOPS = ("max_turns", "max_images", "max_sequence")


def overlong_penalty(lengths, budgets, *, buffer: int, factor: float = 1.0) -> np.ndarray:
  """DAPO's soft overlong punishment (Yu et al. 2025, arXiv:2503.14476, eq. 13), per trajectory (N,) float32.

  lengths: (N,) response tokens (generated + tool observations); budgets: (N,) the most a response may hold (the
  row's max_total_tokens minus its prompt). 0 while length <= budget - buffer, then falling linearly to -factor at
  the budget, -factor beyond it. buffer = 0: no penalty.
  """
  lengths = np.asarray(lengths, np.float64)
  budgets = np.asarray(budgets, np.float64)
  if buffer <= 0:
    return np.zeros(lengths.shape, np.float32)
  over = lengths - (budgets - buffer)  # tokens into the buffer
  pen = np.where(over <= 0, 0.0, np.where(lengths <= budgets, -over / buffer, -1.0))
  return (factor * pen).astype(np.float32)


def over_turn(stop_reasons: Sequence[str]) -> np.ndarray:
  """(N,) bool: trajectories the limits ended (`OVER_LIMIT_STOPS`). Over-turn masking (Mini-o3, Lai et al. 2025,
  arXiv:2509.07969) leaves them out of the loss instead of punishing an answer the limits never let them give, so
  the policy is free to use more turns at test time than it was trained with."""
  return np.asarray([s in OVER_LIMIT_STOPS for s in stop_reasons], bool)


def groups_with_signal(totals, group_ids, ok=None) -> dict:
  """Group id -> whether its rewards differ (a group whose rewards are all equal has zero advantage everywhere:
  no learning signal). Rows with ok False (errors) are left out; a group with fewer than 2 ok rows has no signal.
  Ordered as the groups first appear. One pass over the rows (the 7B recipe: 4,096 rows per round)."""
  totals = np.asarray(totals, np.float64)
  ok = np.ones(len(totals), bool) if ok is None else np.asarray(ok, bool)
  lo: dict = {}
  hi: dict = {}
  for gid, r, o in zip(group_ids, totals, ok):
    lo.setdefault(gid, np.inf)
    hi.setdefault(gid, -np.inf)
    if o:
      lo[gid], hi[gid] = min(lo[gid], r), max(hi[gid], r)
  return {gid: bool(hi[gid] > lo[gid]) for gid in lo}
