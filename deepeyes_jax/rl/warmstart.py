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
- ``"no_tool"``: the same question with no tool offered (the prompt of the "tool disabled" evaluation);
- ``"ground"`` and ``"read"``: perception exercises with no tool and no format (`warmstart.ground_fraction`,
  `warmstart.read_fraction`): point at the named object, read a close-up. A real base VLM knows both from
  pretraining; a model made by code has to be taught them (see `data/synthetic.py`).

A demonstrator returns (messages, assistant turns) or (messages, assistant turns, image) when the example's image
is not the one shown (a close-up for "read").
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Sequence

import ml_collections
import numpy as np

from deepeyes_jax import run_setup
from deepeyes_jax.agent import prompts
from deepeyes_jax.agent.rollout import AgentConfig, Task, demonstrate
from deepeyes_jax.agent.trajectory import Trajectory
from deepeyes_jax.data import synthetic
from deepeyes_jax.data.deepeyes import decode_example
from deepeyes_jax.registry import Registry
from deepeyes_jax.rl import packing

Demonstrator = Callable[..., tuple[list[dict], list[str]]]
DEMONSTRATORS: Registry[Demonstrator] = Registry("demonstrator")
MODES = ("zoom", "direct", "no_tool", "ground", "read")


def register_demonstrator(name: str, *aliases: str, overwrite: bool = False) -> Callable[[Demonstrator], Demonstrator]:
  return DEMONSTRATORS.register(name, *aliases, overwrite=overwrite)


def get_demonstrator(name: str) -> Demonstrator:
  """The demonstrator registered as `name`; UnknownNameError (a KeyError and a ValueError) otherwise."""
  return DEMONSTRATORS.get(name)


def draw_modes(
  uids: Sequence[str],
  seed: int,
  *,
  zoom_fraction: float,
  no_tool_fraction: float,
  ground_fraction: float = 0.0,
  read_fraction: float = 0.0,
) -> list[str]:
  """One mode per example, a function of (seed, uid) only (reproducible across restarts and batch layouts).

  no_tool / ground / read take their fractions of the examples; the rest are tool questions, of which
  `zoom_fraction` are demonstrated with a zoom and the others answered directly."""
  fractions = {"zoom": zoom_fraction, "no_tool": no_tool_fraction, "ground": ground_fraction, "read": read_fraction}
  if not all(0 <= f <= 1 for f in fractions.values()) or no_tool_fraction + ground_fraction + read_fraction > 1:
    raise ValueError(f"fractions must be in [0, 1] and no_tool + ground + read <= 1, got {fractions}")
  edges = np.cumsum([no_tool_fraction, ground_fraction, read_fraction])
  modes = []
  for uid in uids:
    u = np.random.default_rng([seed, zlib.crc32(uid.encode())]).random(2)
    k = int(np.searchsorted(edges, u[0], side="right"))
    modes.append(("no_tool", "ground", "read")[k] if k < 3 else ("zoom" if u[1] < zoom_fraction else "direct"))
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
    messages, turns, *image = demo(ex, mode, agent_config=agent_config)
    tasks.append(
      Task(
        task_id=f"{ex.uid}/{mode}",
        image=image[0] if image else ex.images[0],
        messages_override=messages,
        metadata={"data_source": ex.data_source, "ground_truth": ex.ground_truth, "mode": mode},
      )
    )
    scripts.append(turns)
  return demonstrate(tokenizer, tasks, scripts, config=agent_config, model_config=model_config)


def content_token_ids(tokenizer, labels: Sequence[str] = ()) -> np.ndarray:
  """Ids of the tokens a demonstration's content lives in: the ten digits (boxes, digit answers) and the first
  token of each answer label (e.g. colour names), alone ("lime<|im_end|>" of a reading exercise) and after the
  answer tag (a byte-level BPE may merge ">lime" in "<answer>lime</answer>")."""
  ids = {tokenizer.convert_tokens_to_ids(str(d)) for d in range(10)}
  for label in labels:
    ids.add(tokenizer(label, add_special_tokens=False)["input_ids"][0])
    tagged = tokenizer(">" + label, add_special_tokens=False)["input_ids"][0]
    if tokenizer.decode([tagged]) != ">":  # merged with the tag; a lone ">" is format, not content
      ids.add(tagged)
  return np.array(sorted(ids), np.int32)


def skill_accuracy(learner, packed: dict[str, list], content_ids: np.ndarray) -> dict[str, float]:
  """Per mode, the fraction of demonstrations whose content tokens (`content_token_ids` among the action tokens:
  the box coordinates, the answer) the policy predicts all right, teacher-forced.

  A cheap probe of each skill on held-out scenes during the warm start: "ground" = writing the named object's box,
  "read" = reading a crop, "zoom" = both inside the full protocol. The format tokens are excluded: they are learned
  in a few steps and would hide whether the content is. `packed`: mode -> packed micro-batches (`minibatches`).
  """
  out = {}
  for mode, micro in packed.items():
    right = total = 0
    for mb in micro:
      pred = learner.predict(mb)[:, :-1]
      target, action = mb.tokens[:, 1:], mb.loss_mask[:, 1:] > 0
      content = action & np.isin(target, content_ids)
      wrong = content & (pred != target)
      seg = mb.segment_ids[:, 1:]
      for r in range(seg.shape[0]):
        for s in np.unique(seg[r][content[r]]):
          total += 1
          right += not wrong[r][seg[r] == s].any()
    out[mode] = right / max(total, 1)
  return out


@register_demonstrator("synthetic")
def synthetic_demonstrator(example, mode: str, *, agent_config: AgentConfig) -> tuple[list[dict], list[str]]:
  """The scripted teacher of the synthetic zoom task (`data/synthetic.py`)."""
  info = example.extra["extra_info"]
  image = example.images[0]
  if agent_config.coordinate_frame != "resized":
    raise ValueError("the synthetic demonstrator writes boxes in the frame the model sees: coordinate_frame='resized'")
  seen = synthetic.seen_size(image.size, min_pixels=agent_config.min_pixels, max_pixels=agent_config.max_pixels)
  if mode == "no_tool":
    return prompts.no_tool_messages(image, info["question"]), synthetic.demonstration(info, seen, zoom=False)
  if mode == "ground":
    question, turns = synthetic.grounding(info, seen)
    return synthetic.plain_messages(image, question), turns
  if mode == "read":
    crop, question, turns = synthetic.reading(image, info, seen)
    return synthetic.plain_messages(crop, question), turns, crop
  return example.messages, synthetic.demonstration(info, seen, zoom=mode == "zoom")


# --------------------------------------------------------------------------------------------------------------
# In the trainer: the skill probe and one behaviour-cloning step
# --------------------------------------------------------------------------------------------------------------
class SkillProbe:
  """`skill_accuracy` on fixed demonstrations of `probe_questions` held-out questions
  (`eval.data`), built once: which skills (grounding, reading, both through the protocol) the warm start has
  learned so far, as `skills/{ground,read,zoom}` metrics."""

  MODES = ("ground", "read", "zoom")

  def __init__(self, config, tokenizer, agent_cfg: AgentConfig, model_cfg, learner):
    ws = config.warmstart
    source = run_setup.data_source(config.eval.data, config)
    n = min(ws.get("probe_questions", 32), len(source))
    examples = [decode_example(source[i], i, source_name=repr(source)) for i in range(n)]
    labels = sorted({e.ground_truth for e in examples})
    self.content_ids = content_token_ids(tokenizer, labels)
    probe_cfg = config.copy_and_resolve_references()
    probe_cfg.rl.old_logprobs = "sampler"  # demonstrations: nothing to recompute
    self.packed = {}
    for mode in self.MODES:
      trajs = demonstrations(
        examples,
        [mode] * n,
        demonstrator=ws.demonstrator,
        tokenizer=tokenizer,
        agent_config=agent_cfg,
        model_config=model_cfg,
      )
      zeros = np.zeros(n, np.float32)
      self.packed[mode] = packing.minibatches(trajs, zeros, probe_cfg.rl, model_cfg.vision, learner)[0]

  def __call__(self, learner) -> dict[str, float]:
    return skill_accuracy(learner, self.packed, self.content_ids)


def warmstart_step(ws_iter, config, tokenizer, agent_cfg: AgentConfig, model_cfg, learner, step: int):
  """One behaviour-cloning step on a batch of the demonstrator's trajectories (`demonstrations`)."""
  ws = config.warmstart
  examples = next(ws_iter)
  modes = draw_modes(
    [e.uid for e in examples],
    zlib.crc32(f"{config.seed}/warmstart/{step}".encode()),
    zoom_fraction=ws.zoom_fraction,
    no_tool_fraction=ws.no_tool_fraction,
    ground_fraction=ws.get("ground_fraction", 0.0),
    read_fraction=ws.get("read_fraction", 0.0),
  )
  trajs = demonstrations(
    examples, modes, demonstrator=ws.demonstrator, tokenizer=tokenizer, agent_config=agent_cfg, model_config=model_cfg
  )
  update: dict[str, float] = {}
  # Demonstrations: nothing to recompute (the nll loss has no ratio), whatever `rl.old_logprobs` the RL phase uses.
  rl = ml_collections.ConfigDict({**config.rl.to_dict(), "old_logprobs": "sampler"})
  for micro in packing.minibatches(trajs, np.ones(len(trajs), np.float32), rl, model_cfg.vision, learner):
    update = learner.update(micro)
  # (mismatch/* compares with the demonstrations' log-probs, which are 0: not a measurement)
  out = {f"train/{k}": v for k, v in update.items() if not k.startswith("mismatch/")}
  out["loss"] = update.get("loss", 0.0)
  for mode in MODES:
    out[f"warmstart/{mode}_fraction"] = modes.count(mode) / max(1, len(modes))
  out["length/total"] = float(np.mean([len(t.token_ids) for t in trajs]))
  return out
