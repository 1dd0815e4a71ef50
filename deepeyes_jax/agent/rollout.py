"""Batched multi-turn zoom rollouts on top of the sampler's `extend` / `decode`.

A batch of tasks x G samples runs in one KV cache (or, with `max_concurrent_rows`, in consecutive chunks of whole
groups, each in its own cache). Each round: `decode` generates one assistant turn for every
active row (finished rows have budget 0); then, on the host, each finished turn is parsed with the DeepEyes rules
(`protocol.execute_turn`): an answer or no tool call ends the row; a tool call produces an observation (an error
text, or the crop of the original image), which is tokenised, its crop preprocessed, and appended to that row's
cache with `extend` (the vision tower runs inside extend on the new crops only). Rows finish at different
turns and never affect each other: every row has its own PRNG key derived from (seed, task id, sample index).

Limits, each ending the row with a recorded reason (`trajectory.STOP_REASONS`): `max_turns` assistant turns
(a tool call in the last allowed turn is not executed), `max_tokens_per_turn` (a turn cut by length ends the
episode, as in DeepEyes), `max_total_tokens` (the cache capacity per row), `max_images` (original + crops).
"""

from __future__ import annotations

import dataclasses
import logging
import zlib
from typing import Any, Callable, Sequence

import numpy as np
from PIL import Image

from deepeyes_jax.agent import prompts, protocol
from deepeyes_jax.agent.trajectory import ToolRecord, Trajectory, Turn
from deepeyes_jax.models.qwen2_5_vl.rope import positions_for_tokens
from deepeyes_jax.processing import chat
from deepeyes_jax.processing import image as improc
from deepeyes_jax.sampling import rules
from deepeyes_jax.sampling.generate import encode_conversation, message_images
from deepeyes_jax.sampling.sampler import Chunk, Sampler, row_keys

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class AgentConfig:
  max_turns: int = 5  # assistant turns per trajectory (DeepEyes 7B: 5, i.e. at most 4 crops)
  max_tokens_per_turn: int = 10240
  max_total_tokens: int = 32768  # prompt + every turn + observations, per row (the cache capacity)
  max_images: int = 5  # original + crops
  coordinate_frame: str = "original"  # "original" (DeepEyes) | "resized" (boxes in the frame the model saw)
  min_pixels: int = improc.MIN_PIXELS  # for the question image and the crops
  max_pixels: int = improc.MAX_PIXELS
  sampling: rules.SamplingParams = rules.SamplingParams(temperature=1.0)
  # Rows (task x sample) rolled out at once, each chunk in its own KV cache, one after the other; rounded down to
  # whole GRPO groups (at least one group). Bounds the cache at this many rows x max_total_tokens. 0 = all rows.
  max_concurrent_rows: int = 0

  def __post_init__(self):
    if self.coordinate_frame not in ("original", "resized"):
      raise ValueError(f"coordinate_frame must be 'original' or 'resized', got {self.coordinate_frame!r}")
    for name in ("max_turns", "max_tokens_per_turn", "max_total_tokens", "max_images"):
      if getattr(self, name) < 1:
        raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
    if self.max_concurrent_rows < 0:
      raise ValueError(f"max_concurrent_rows must be >= 0 (0 = all rows at once), got {self.max_concurrent_rows}")


@dataclasses.dataclass
class Task:
  """One question about one image.

  Either `user_text` (the full user message text, question + DeepEyes suffix; rendered with the DeepEyes system
  prompt and the image first) or `messages_override` (chat messages with the image items in place, e.g. a
  DeepEyes dataset record kept byte for byte). `image` is the image the zoom tool crops.
  """

  task_id: str
  image: Image.Image
  user_text: str = ""
  system_prompt: str = prompts.SYSTEM_PROMPT
  metadata: dict[str, Any] = dataclasses.field(default_factory=dict)
  messages_override: list[dict] | None = None

  def messages(self) -> list[dict]:
    if self.messages_override is not None:
      return self.messages_override
    return [
      {"role": "system", "content": self.system_prompt},
      {"role": "user", "content": [{"type": "image", "image": self.image}, {"type": "text", "text": self.user_text}]},
    ]


@dataclasses.dataclass
class _Row:
  task: Task
  sample_index: int
  tokens: list[int]
  mask: list[int]
  logprobs: list[float]
  images: list[Image.Image]
  pixel_values: list[np.ndarray]
  grids: list[np.ndarray]
  seen_size: tuple[int, int]
  prompt_length: int
  turns: list[Turn] = dataclasses.field(default_factory=list)
  tool_calls: list[ToolRecord] = dataclasses.field(default_factory=list)
  answer: str | None = None
  stop_reason: str | None = None


def row_seed_id(task_id: str, sample_index: int) -> int:
  """A stable 32-bit id for (task, sample): the row's PRNG stream does not depend on its batch position."""
  return zlib.crc32(f"{task_id}\x00{sample_index}".encode())


def run_rollouts(
  sampler: Sampler,
  tokenizer,
  tasks: Sequence[Task],
  *,
  group_size: int = 1,
  config: AgentConfig = AgentConfig(),
  seed: int = 0,
  scripted_turns: Sequence[Sequence[str]] | None = None,
  on_turn: Callable[[int, int, Turn, ToolRecord | None], None] | None = None,
) -> list[Trajectory]:
  """Rolls out every task `group_size` times. Returns trajectories in (task, sample) order.

  The rows run in consecutive chunks of whole groups (`config.max_concurrent_rows`, 0 = all in one chunk), each
  chunk in its own KV cache, one after the other. The result does not depend on the chunking: a row's PRNG key
  comes from (seed, task id, sample index), and a row never affects the others of its batch.

  Args:
    scripted_turns: optional, per row, the text of each assistant turn to force instead of sampling (a scripted
      policy for tests and demos; the model still scores every token, so log-probs stay real).
    on_turn: called after each finished turn with (row index, turn number, turn, tool record) — live printing.
      The row index is that of the whole rollout, (task index) * group_size + sample index, whatever the chunk.
  """
  cfg = sampler.config
  rows, chunks = _prompt_rows(tokenizer, tasks, group_size, config, cfg)
  b = len(rows)
  if scripted_turns is not None and len(scripted_turns) != b:
    raise ValueError(f"scripted_turns has {len(scripted_turns)} rows, the rollout has {b}")
  capacity = config.max_total_tokens
  for row in rows:
    if row.prompt_length >= capacity:
      raise ValueError(
        f"task {row.task.task_id!r}: prompt of {row.prompt_length} tokens (image included) leaves no room in "
        f"max_total_tokens={capacity}"
      )
  if config.max_concurrent_rows:
    g = max(group_size, 1)
    per_chunk = max(1, config.max_concurrent_rows // g) * g  # whole groups: a chunk never splits a GRPO group
  else:
    per_chunk = max(b, 1)
  starts = range(0, b, per_chunk)
  for i, start in enumerate(starts):
    stop = min(start + per_chunk, b)
    log.info("rollout chunk %d/%d: rows %d-%d", i + 1, len(starts), start, stop - 1)
    _rollout_rows(
      sampler,
      tokenizer,
      rows[start:stop],
      chunks[start:stop],
      config=config,
      seed=seed,
      row_offset=start,
      scripted_turns=None if scripted_turns is None else scripted_turns[start:stop],
      on_turn=on_turn,
    )
  return [_finish(row, config, cfg.image_token_id, cfg.vision.spatial_merge_size) for row in rows]


def _rollout_rows(
  sampler: Sampler,
  tokenizer,
  rows: list[_Row],
  chunks: list[Chunk],
  *,
  config: AgentConfig,
  seed: int,
  row_offset: int,
  scripted_turns: Sequence[Sequence[str]] | None,
  on_turn: Callable[[int, int, Turn, ToolRecord | None], None] | None,
) -> None:
  """Rolls out `rows` (whose prompts are `chunks`) in one KV cache of len(rows) rows, updating them in place.

  `row_offset` is the global index of rows[0] (what `on_turn` receives); `scripted_turns` is this chunk's slice.
  """
  cfg = sampler.config
  im_end, eot = (tokenizer.convert_tokens_to_ids(t) for t in (chat.IM_END, chat.ENDOFTEXT))
  b = len(rows)
  capacity = config.max_total_tokens
  keys = row_keys(seed, [row_seed_id(r.task.task_id, r.sample_index) for r in rows])
  cache, logits = sampler.extend(sampler.init_cache(b, capacity), chunks)

  for turn in range(1, config.max_turns + 1):
    active = [r.stop_reason is None for r in rows]
    budgets = [min(config.max_tokens_per_turn, capacity - len(r.tokens)) if a else 0 for r, a in zip(rows, active)]
    forced = None
    if scripted_turns is not None:
      forced = []
      for r, row in enumerate(rows):
        script = scripted_turns[r]
        if active[r] and turn <= len(script):
          forced.append(tokenizer(script[turn - 1], add_special_tokens=False)["input_ids"])
        else:
          forced.append(None)
    cache, out = sampler.decode(
      cache,
      logits,
      max_new_tokens=budgets,
      stop_tokens=[im_end, eot],
      params=config.sampling,
      keys=keys,
      forced_tokens=forced,
    )
    next_chunks: list[Chunk | None] = [None] * b
    for r, row in enumerate(rows):
      if not active[r]:
        continue
      toks = out.tokens[r]
      t, record, next_chunks[r] = _take_turn(
        row, turn, toks, out.logprobs[r], out.stop_reason[r], config, tokenizer, cfg.image_token_id, capacity
      )
      if on_turn is not None:
        on_turn(row_offset + r, turn, t, record)
    if all(r.stop_reason is not None for r in rows):
      break
    cache, logits = sampler.extend(cache, next_chunks)


def demonstrate(
  tokenizer,
  tasks: Sequence[Task],
  scripts: Sequence[Sequence[str]],
  *,
  config: AgentConfig,
  model_config,
) -> list[Trajectory]:
  """Trajectories of a scripted policy built on the host, without the model: exactly the tokens, masks, crops and
  positions `run_rollouts(..., scripted_turns=scripts)` produces, but no forward passes (log-probs are 0).

  Each script is the text of each assistant turn; a turn should end with `<|im_end|>` (the rollout's stop token;
  a turn without it is recorded as cut, as a sampled turn that hit its length limit would be). Used for the
  supervised warm start (`deepeyes_jax/rl/warmstart.py`).
  """
  if len(scripts) != len(tasks):
    raise ValueError(f"{len(scripts)} scripts for {len(tasks)} tasks")
  im_end, eot = (tokenizer.convert_tokens_to_ids(t) for t in (chat.IM_END, chat.ENDOFTEXT))
  rows, _ = _prompt_rows(tokenizer, tasks, 1, config, model_config)
  capacity = config.max_total_tokens
  for row, script in zip(rows, scripts):
    for turn, text in enumerate(script[: config.max_turns], start=1):
      if row.stop_reason is not None:
        break
      toks = tokenizer(text, add_special_tokens=False)["input_ids"]
      budget = min(config.max_tokens_per_turn, capacity - len(row.tokens))
      cut = next((k + 1 for k, tok in enumerate(toks) if tok in (im_end, eot)), None)
      if cut is not None and cut <= budget:
        toks, stop = toks[:cut], "stop_token"
      else:
        toks, stop = toks[:budget], "length"
      _take_turn(row, turn, toks, [0.0] * len(toks), stop, config, tokenizer, model_config.image_token_id, capacity)
  return [_finish(row, config, model_config.image_token_id, model_config.vision.spatial_merge_size) for row in rows]


def _prompt_rows(tokenizer, tasks, group_size, config: AgentConfig, cfg) -> tuple[list[_Row], list[Chunk]]:
  """One row per (task, sample) holding the encoded prompt, and the prompt chunk of each row."""
  rows: list[_Row] = []
  chunks: list[Chunk] = []
  for task in tasks:
    msgs = task.messages()
    # Encoded once per task (tokenising and preprocessing are the same for all G samples).
    ch = encode_conversation(
      tokenizer, msgs, image_token_id=cfg.image_token_id, min_pixels=config.min_pixels, max_pixels=config.max_pixels
    )
    if not ch.images:
      raise ValueError(f"task {task.task_id!r}: the prompt has no image for the zoom tool")
    prompt_images = [improc.load_image(src) for src in message_images(msgs)]
    # The zoom tool crops `task.image`; the frame the model saw is that of the prompt image it corresponds to.
    crop_idx = next((k for k, im in enumerate(prompt_images) if im.size == task.image.size), 0)
    grid = ch.images[crop_idx][1]
    for g in range(group_size):
      rows.append(
        _Row(
          task=task,
          sample_index=g,
          tokens=list(ch.tokens),
          mask=[0] * len(ch.tokens),
          logprobs=[0.0] * len(ch.tokens),
          images=list(prompt_images),
          pixel_values=[pv for pv, _ in ch.images],
          grids=[np.asarray(gr) for _, gr in ch.images],
          seen_size=(int(grid[2]) * cfg.vision.patch_size, int(grid[1]) * cfg.vision.patch_size),
          prompt_length=len(ch.tokens),
        )
      )
      chunks.append(ch)
  return rows, chunks


def _take_turn(row: _Row, turn: int, toks, logprobs, stop: str, config, tokenizer, image_token_id, capacity):
  """Appends one assistant turn to `row`, runs the protocol on it, and appends the observation if any.

  Returns (the Turn, its ToolRecord or None, the observation Chunk to feed the model or None).
  """
  row.tokens += toks
  row.mask += [1] * len(toks)
  row.logprobs += [float(x) for x in logprobs]
  text = tokenizer.decode(toks, skip_special_tokens=False)
  record = chunk = None
  if stop != "stop_token":
    t = Turn(text=text, num_tokens=len(toks), stop=stop, kind="cut")
    cut_by_turn = stop == "length" and len(toks) >= config.max_tokens_per_turn
    row.stop_reason = "turn_length" if cut_by_turn else "max_sequence"
  else:
    outcome = protocol.execute_turn(text, row.task.image, frame=config.coordinate_frame, seen_size=row.seen_size)
    t = Turn(text=text, num_tokens=len(toks), stop=stop, kind=outcome.kind)
    if outcome.kind == "answer":
      row.answer, row.stop_reason = outcome.answer, "answer"
    elif outcome.kind == "end":
      row.stop_reason = "no_tool_call"
    else:
      record = _tool_record(turn, outcome.tool_call)
      row.tool_calls.append(record)
      chunk, reason = _observation(row, outcome, turn, config, tokenizer, image_token_id, capacity)
      if reason is not None:
        record.status, record.error = "not_executed", None
        row.stop_reason = reason
      else:
        t.observation = outcome.observation
  row.turns.append(t)
  return t, record, chunk


def _tool_record(turn: int, tc: protocol.ToolCall) -> ToolRecord:
  return ToolRecord(
    turn=turn,
    content=tc.content,
    name=tc.name,
    bbox_given=None if tc.bbox_given is None else list(tc.bbox_given),
    bbox=None if tc.bbox is None else [int(x) for x in tc.bbox],
    status=tc.status,
    error=tc.error,
  )


def _observation(row: _Row, outcome, turn, config, tokenizer, image_token_id, capacity):
  """Tokens (and crop) to append after a tool call, or the reason the row stops instead."""
  if turn >= config.max_turns:
    return None, "max_turns"
  images = []
  if outcome.crop is not None:
    if len(row.images) >= config.max_images:
      return None, "max_images"
    pv, grid = improc.preprocess(outcome.crop, min_pixels=config.min_pixels, max_pixels=config.max_pixels)
    images.append((pv, grid))
  ids = tokenizer(outcome.observation, add_special_tokens=False)["input_ids"]
  ids = chat.expand_image_pads(ids, [improc.num_image_tokens(g) for _, g in images], image_token_id)
  if len(row.tokens) + len(ids) + 1 > capacity:  # +1: room for at least one generated token
    return None, "max_sequence"
  row.tokens += ids
  row.mask += [0] * len(ids)
  row.logprobs += [0.0] * len(ids)
  if images:
    row.images.append(outcome.crop)
    row.pixel_values.append(images[0][0])
    row.grids.append(np.asarray(images[0][1]))
  return Chunk(ids, images), None


def _finish(row: _Row, config: AgentConfig, image_token_id: int, merge: int) -> Trajectory:
  tokens = np.asarray(row.tokens, np.int32)
  positions, _ = positions_for_tokens(tokens, iter(row.grids), image_token_id, merge)
  return Trajectory(
    uid=f"{row.task.task_id}/{row.sample_index}",
    task_id=row.task.task_id,
    sample_index=row.sample_index,
    token_ids=tokens,
    action_mask=np.asarray(row.mask, np.int8),
    logprobs=np.asarray(row.logprobs, np.float32),
    position_ids=positions.astype(np.int32),
    images=row.images,
    grids=np.stack(row.grids).astype(np.int64),
    prompt_length=row.prompt_length,
    turns=row.turns,
    tool_calls=row.tool_calls,
    answer=row.answer,
    stop_reason=row.stop_reason or "max_turns",
    image_min_pixels=config.min_pixels,
    image_max_pixels=config.max_pixels,
    metadata=dict(row.task.metadata),
    pixel_values=row.pixel_values,
  )
