"""The supervised warm start: behaviour cloning of a scripted demonstrator before GRPO (`config.warmstart`).

A tiny model trained from scratch cannot discover the DeepEyes output format (think, tool-call JSON, answer tags)
by sampling, so the embedded default first imitates a demonstrator for `warmstart.steps` steps. Demonstrations are
built on the host by the same agent code as rollouts (`agent.rollout.demonstrate`: real prompts, real crops and
observations, real token layout) and trained with the `nll` policy loss on the assistant tokens only.

Demonstrators are registered by name (`@register_demonstrator`). Each turns a data-pipeline `Example` and a mode
into (chat messages, assistant turns). Modes, drawn per example with `warmstart.no_tool_fraction` and
`warmstart.zoom_fraction`:

- ``"zoom"``: call the zoom tool on the right region, then answer from the crop;
- ``"direct"``: answer at once from the global view (with the tool offered);
- ``"no_tool"``: the same question with no tool offered (the prompt of the "tool disabled" evaluation).
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Sequence

import numpy as np

from deepeyes_jax.agent.rollout import AgentConfig, Task, demonstrate
from deepeyes_jax.agent.trajectory import Trajectory

Demonstrator = Callable[..., tuple[list[dict], list[str]]]
DEMONSTRATORS: dict[str, Demonstrator] = {}
MODES = ("zoom", "direct", "no_tool")


def register_demonstrator(name: str) -> Callable[[Demonstrator], Demonstrator]:
  def deco(fn: Demonstrator) -> Demonstrator:
    DEMONSTRATORS[name] = fn
    return fn

  return deco


def get_demonstrator(name: str) -> Demonstrator:
  if name not in DEMONSTRATORS:
    raise ValueError(f"unknown demonstrator {name!r}; registered: {sorted(DEMONSTRATORS)}")
  return DEMONSTRATORS[name]


def draw_modes(uids: Sequence[str], seed: int, *, zoom_fraction: float, no_tool_fraction: float) -> list[str]:
  """One mode per example, a function of (seed, uid) only (reproducible across restarts and batch layouts)."""
  if not (0 <= zoom_fraction <= 1 and 0 <= no_tool_fraction <= 1):
    raise ValueError(f"fractions must be in [0, 1], got zoom {zoom_fraction}, no_tool {no_tool_fraction}")
  modes = []
  for uid in uids:
    u = np.random.default_rng([seed, zlib.crc32(uid.encode())]).random(2)
    if u[0] < no_tool_fraction:
      modes.append("no_tool")
    else:
      modes.append("zoom" if u[1] < zoom_fraction else "direct")
  return modes


def demonstrations(
  examples,
  modes: Sequence[str],
  *,
  demonstrator: str,
  tokenizer,
  agent_config: AgentConfig,
  model_config,
) -> list[Trajectory]:
  """The demonstrator's trajectories for `examples` (one each, in `modes`), tokenised exactly like rollouts."""
  demo = get_demonstrator(demonstrator)
  tasks, scripts = [], []
  for ex, mode in zip(examples, modes, strict=True):
    if mode not in MODES:
      raise ValueError(f"unknown demonstration mode {mode!r}; one of {MODES}")
    messages, turns = demo(ex, mode, agent_config=agent_config)
    tasks.append(
      Task(
        task_id=f"{ex.uid}/{mode}",
        image=ex.images[0],
        messages_override=messages,
        metadata={"data_source": ex.data_source, "ground_truth": ex.ground_truth, "mode": mode},
      )
    )
    scripts.append(turns)
  return demonstrate(tokenizer, tasks, scripts, config=agent_config, model_config=model_config)


@register_demonstrator("synthetic")
def synthetic_demonstrator(example, mode: str, *, agent_config: AgentConfig) -> tuple[list[dict], list[str]]:
  """The scripted teacher of the synthetic zoom task (`data/synthetic.py`)."""
  from deepeyes_jax.data import synthetic

  info = example.extra["extra_info"]
  image = example.images[0]
  if agent_config.coordinate_frame != "resized":
    raise ValueError("the synthetic demonstrator writes boxes in the frame the model sees: coordinate_frame='resized'")
  seen = synthetic.seen_size(image.size, min_pixels=agent_config.min_pixels, max_pixels=agent_config.max_pixels)
  if mode == "no_tool":
    return synthetic.no_tool_messages(image, info["question"]), synthetic.demonstration(info, seen, zoom=False)
  return example.messages, synthetic.demonstration(info, seen, zoom=mode == "zoom")
