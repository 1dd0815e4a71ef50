"""Batched multi-turn zoom rollouts: the continuous engine (the default) and the lock-step reference.

Every assistant turn is parsed on the host with the DeepEyes rules (`protocol.execute_turn`): an answer or no tool
call ends the row; a tool call produces an observation (an error text, or the crop of the original image), which
is tokenised, its crop preprocessed, and appended to that row's cache (the vision tower runs on the new crops only;
the prefix is never recomputed). Rows finish at different turns and never affect each other: every row has its own
PRNG key derived from (seed, task id, sample index), so its trajectory does not depend on the engine or the batch.

- `engine="continuous"` (`_rollout_continuous`): decode slots over a paged KV pool (`sampling.paged`), one prompt
  prefill per group, decode segments that end once some rows ended their turn, so that the host serves those rows
  while the others keep their state (docs/agent.md).
- `engine="lockstep"` (`_rollout_rows`): one contiguous cache of rows x max_total_tokens per chunk of whole groups;
  each round decodes one turn of every active row, then extends every row's observation.

Limits, each ending the row with a recorded reason (`trajectory.STOP_REASONS`): `max_turns` assistant turns
(a tool call in the last allowed turn is not executed), `max_tokens_per_turn` (a turn cut by length ends the
episode, as in DeepEyes), `max_total_tokens` (per row), `max_images` (original + crops), `prompt_too_long`.

One bad row never stops the others: an exception while encoding a task's prompt (e.g. an image the processor
rejects) or serving a row's turn (parsing, cropping, preprocessing the crop, tokenising the observation) ends that
row with the stop reason `error` and `metadata["error"] = "ExceptionType: message"`; the other rows come out exactly
as they would without it. Only a systematic failure, every row of the call failing, raises (with the first error).
Text the model wrote is data: an observation echoing it (an unknown tool name, bad JSON) is tokenised with special
tokens recognised in the template only (`processing.chat.encode_parts`).
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import zlib
from typing import Any, Callable, Sequence

import jax.numpy as jnp
import numpy as np
from PIL import Image

from deepeyes_jax.agent import prompts, protocol
from deepeyes_jax.agent.trajectory import ToolRecord, Trajectory, Turn
from deepeyes_jax.models.qwen2_5_vl.rope import positions_for_tokens
from deepeyes_jax.processing import chat
from deepeyes_jax.processing import image as improc
from deepeyes_jax.sampling import paged, rules
from deepeyes_jax.sampling.generate import encode_conversation, message_images
from deepeyes_jax.sampling.sampler import Chunk, Sampler, bucket, row_keys, set_rows

log = logging.getLogger(__name__)

ENGINES = ("continuous", "lockstep")


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
  # Rows (task x sample) in flight at once. "continuous": the number of decode slots (a row takes a free slot when
  # one frees); "lockstep": chunks of whole GRPO groups, each in its own contiguous cache. 0 = all rows.
  max_concurrent_rows: int = 0
  engine: str = "continuous"  # "continuous" (paged KV, continuous batching) | "lockstep" (the reference engine)
  page_size: int = 16  # tokens per KV page (continuous engine)
  kv_pages: int = 0  # pages in the KV pool; 0 = grow on demand (powers of two), > 0 = fixed (rows wait or restart)
  segment_steps: int = 64  # decode steps per segment at most (continuous engine)
  # A segment also ends once this fraction of the rows in flight ended their turn (at least one row): the host
  # then serves them (parse, crop, extend) while the others keep their state. Lower = less waiting, more segments.
  segment_release: float = 0.25

  def __post_init__(self):
    if self.coordinate_frame not in ("original", "resized"):
      raise ValueError(f"coordinate_frame must be 'original' or 'resized', got {self.coordinate_frame!r}")
    for name in ("max_turns", "max_tokens_per_turn", "max_total_tokens", "max_images", "page_size", "segment_steps"):
      if getattr(self, name) < 1:
        raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
    if self.max_concurrent_rows < 0:
      raise ValueError(f"max_concurrent_rows must be >= 0 (0 = all rows at once), got {self.max_concurrent_rows}")
    if self.kv_pages < 0:
      raise ValueError(f"kv_pages must be >= 0 (0 = grow on demand), got {self.kv_pages}")
    if self.engine not in ENGINES:
      raise ValueError(f"engine must be one of {', '.join(ENGINES)}, got {self.engine!r}")
    if not 0.0 <= self.segment_release <= 1.0:
      raise ValueError(f"segment_release must be in [0, 1], got {self.segment_release}")


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
  prompt_images: int = 0
  turns: list[Turn] = dataclasses.field(default_factory=list)
  tool_calls: list[ToolRecord] = dataclasses.field(default_factory=list)
  answer: str | None = None
  stop_reason: str | None = None
  failure: Exception | None = None  # what ended the row when stop_reason == "error"


def _fail(row: _Row, e: Exception, where: str) -> None:
  """Ends `row` with the stop reason "error" (the rollout goes on without it)."""
  row.stop_reason, row.failure = "error", e
  log.warning("task %r, sample %d: %s failed, row ended: %s", row.task.task_id, row.sample_index, where, _message(e))


class RolloutCancelled(Exception):
  """`run_rollouts` stopped early because its `cancel` callable returned True."""


def _check_cancel(cancel: Callable[[], bool] | None) -> None:
  if cancel is not None and cancel():
    raise RolloutCancelled("rollout cancelled")


def _message(e: Exception) -> str:
  return f"{type(e).__name__}: {e}"


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
  stats: RolloutStats | None = None,
  cancel: Callable[[], bool] | None = None,
) -> list[Trajectory]:
  """Rolls out every task `group_size` times. Returns trajectories in (task, sample) order.

  `config.engine` runs them: "continuous" in `config.max_concurrent_rows` decode slots (0 = one per row) over a
  paged KV pool, "lockstep" in consecutive chunks of that many rows (whole groups), each in its own cache. The result
  does not depend on the engine or its sizes: a row's PRNG key comes from (seed, task id, sample index), and a row
  never affects the others of its batch.

  A row whose prompt cannot be encoded, or whose turn cannot be served, ends with the stop reason "error" (the
  message in its metadata["error"]) and the others go on; if every row fails, the first error is raised.

  Args:
    scripted_turns: optional, per row, each assistant turn to force instead of sampling: its text (tokenised with
      special tokens parsed, so "<|im_end|>" ends it) or its token ids (a scripted policy for tests and demos; the
      model still scores every token, so log-probs stay real).
    on_turn: called after each finished turn with (row index, turn number, turn, tool record) — live printing.
      The row index is that of the whole rollout, (task index) * group_size + sample index, whatever the chunk.
    cancel: polled between decode segments (lock-step: between turns); once it returns True the rollout stops
      there and raises `RolloutCancelled` (a trainer dropping prefetched rollouts on SIGTERM need not wait for them).
  """
  cfg = sampler.config
  rows, chunks = _prompt_rows(tokenizer, tasks, group_size, config, cfg)
  b = len(rows)
  if scripted_turns is not None and len(scripted_turns) != b:
    raise ValueError(f"scripted_turns has {len(scripted_turns)} rows, the rollout has {b}")
  capacity = config.max_total_tokens
  for row in rows:
    if row.prompt_length >= capacity:  # recorded, not raised: one long prompt never stops the rollout
      row.stop_reason = "prompt_too_long"
      log.warning(
        "task %r: prompt of %d tokens (image included) leaves no room in max_total_tokens=%d; row skipped",
        row.task.task_id,
        row.prompt_length,
        capacity,
      )
  runnable = [i for i, row in enumerate(rows) if row.stop_reason is None]
  stats = RolloutStats() if stats is None else stats
  kw = dict(config=config, seed=seed, scripted_turns=scripted_turns, on_turn=on_turn, stats=stats, cancel=cancel)
  if config.engine == "continuous":
    _rollout_continuous(sampler, tokenizer, rows, chunks, runnable, group_size=max(group_size, 1), **kw)
  else:
    if config.max_concurrent_rows:
      g = max(group_size, 1)
      per_chunk = max(1, config.max_concurrent_rows // g) * g  # whole groups: a chunk never splits a GRPO group
    else:
      per_chunk = max(b, 1)
    starts = range(0, b, per_chunk)
    for i, start in enumerate(starts):
      stop = min(start + per_chunk, b)
      log.info("rollout chunk %d/%d: rows %d-%d", i + 1, len(starts), start, stop - 1)
      indices = [r for r in runnable if start <= r < stop]
      if indices:
        _rollout_rows(sampler, tokenizer, rows, chunks, indices, **kw)
  trajectories = [_finish(row, config, cfg.image_token_id, cfg.vision.spatial_merge_size) for row in rows]
  failed = [row for row in rows if row.stop_reason == "error"]
  if failed and len(failed) == len(rows):
    first = failed[0]
    raise RuntimeError(
      f"every row of the rollout failed ({len(rows)} rows); the first, task {first.task.task_id!r}: "
      f"{_message(first.failure)}"
    ) from first.failure
  return trajectories


def _script(tokenizer, scripted_turns, r: int, turn: int) -> list[int] | None:
  """The forced tokens of row r's turn (1-based), or None to sample."""
  if scripted_turns is None or turn > len(scripted_turns[r]):
    return None
  script = scripted_turns[r][turn - 1]
  if not isinstance(script, str):  # token ids
    return [int(t) for t in script]
  return tokenizer(script, add_special_tokens=False)["input_ids"]


def _rollout_rows(
  sampler: Sampler,
  tokenizer,
  all_rows: list[_Row],
  all_chunks: list[Chunk],
  indices: list[int],
  *,
  config: AgentConfig,
  seed: int,
  scripted_turns: Sequence[Sequence[str]] | None,
  on_turn: Callable[[int, int, Turn, ToolRecord | None], None] | None,
  stats: RolloutStats,
  cancel: Callable[[], bool] | None = None,
) -> None:
  """The lock-step engine: rolls out rows `indices` in one contiguous KV cache of len(indices) rows x
  max_total_tokens, one turn of every row per round, updating them in place (the reference for the continuous
  engine, and what `engine="lockstep"` runs)."""
  cfg = sampler.config
  im_end, eot = (tokenizer.convert_tokens_to_ids(t) for t in (chat.IM_END, chat.ENDOFTEXT))
  rows = [all_rows[i] for i in indices]
  b = len(rows)
  capacity = config.max_total_tokens
  keys = row_keys(seed, [row_seed_id(r.task.task_id, r.sample_index) for r in rows])
  cache, logits = sampler.extend(sampler.init_cache(b, capacity), [all_chunks[i] for i in indices])
  stats.prefill_tokens += sum(len(all_chunks[i].tokens) for i in indices)
  stats.kv_bytes = max(stats.kv_bytes, sum(x.size * x.dtype.itemsize for x in cache.k + cache.v))
  stats.kv_peak_used_bytes = stats.kv_bytes  # every row holds max_total_tokens slots from the start

  for turn in range(1, config.max_turns + 1):
    _check_cancel(cancel)
    active = [r.stop_reason is None for r in rows]
    budgets = [min(config.max_tokens_per_turn, capacity - len(r.tokens)) if a else 0 for r, a in zip(rows, active)]
    forced = [_script(tokenizer, scripted_turns, i, turn) if a else None for i, a in zip(indices, active)]
    cache, out = sampler.decode(
      cache,
      logits,
      max_new_tokens=budgets,
      stop_tokens=[im_end, eot],
      params=config.sampling,
      keys=keys,
      forced_tokens=forced if scripted_turns is not None else None,
    )
    counts = [len(t) for t in out.tokens]
    stats.segments += 1
    stats.slot_steps += max(counts) * b
    stats.token_steps += sum(counts)
    next_chunks: list[Chunk | None] = [None] * b
    for r, row in enumerate(rows):
      if not active[r]:
        continue
      toks = out.tokens[r]
      t, record, next_chunks[r] = _take_turn(
        row, turn, toks, out.logprobs[r], out.stop_reason[r], config, tokenizer, cfg.image_token_id, capacity
      )
      if on_turn is not None:
        on_turn(indices[r], turn, t, record)
    if all(r.stop_reason is not None for r in rows):
      break
    cache, logits = sampler.extend(cache, next_chunks)
    stats.extend_tokens += sum(len(c.tokens) for c in next_chunks if c is not None)


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
  out = [_finish(row, config, model_config.image_token_id, model_config.vision.spatial_merge_size) for row in rows]
  for row in rows:  # a demonstration is built by our own code: an error there is a bug, not a bad sample
    if row.stop_reason == "error":
      raise ValueError(f"task {row.task.task_id!r}: demonstration failed: {_message(row.failure)}") from row.failure
  return out


def _prompt_rows(tokenizer, tasks, group_size, config: AgentConfig, cfg) -> tuple[list[_Row], list[Chunk | None]]:
  """One row per (task, sample) holding the encoded prompt, and the prompt chunk of each row.

  A task whose prompt cannot be encoded gives rows that end at once with the stop reason "error" (no tokens, chunk
  None)."""
  rows: list[_Row] = []
  chunks: list[Chunk | None] = []
  for task in tasks:
    try:
      msgs = task.messages()
      # Encoded once per task (tokenising and preprocessing are the same for all G samples).
      ch = encode_conversation(
        tokenizer, msgs, image_token_id=cfg.image_token_id, min_pixels=config.min_pixels, max_pixels=config.max_pixels
      )
      if not ch.images:
        raise ValueError(f"task {task.task_id!r}: the prompt has no image for the zoom tool")
      prompt_images = [improc.load_image(src) for src in message_images(msgs)]
    except Exception as e:  # this task's rows end with "error"; the other tasks go on
      for g in range(group_size):
        row = _Row(task, g, [], [], [], [], [], [], seen_size=(0, 0), prompt_length=0)  # no tokens, no images
        _fail(row, e, "encoding the prompt")
        rows.append(row)
        chunks.append(None)
      continue
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
          prompt_images=len(ch.images),
        )
      )
      chunks.append(ch)
  return rows, chunks


def _take_turn(row: _Row, turn: int, toks, logprobs, stop: str, config, tokenizer, image_token_id, capacity):
  """Appends one assistant turn to `row`, runs the protocol on it, and appends the observation if any.

  Returns (the Turn, its ToolRecord or None, the observation Chunk to feed the model or None).

  An exception while serving the turn ends the row with "error": the turn is recorded with kind "error" (its tool
  call, if it got that far, with status "error" and the message), and no observation follows.
  """
  row.tokens += toks
  row.mask += [1] * len(toks)
  row.logprobs += [float(x) for x in logprobs]
  text = tokenizer.decode(toks, skip_special_tokens=False)
  record = chunk = None
  t = Turn(text=text, num_tokens=len(toks), stop=stop, kind="error")
  try:
    if stop != "stop_token":
      t.kind = "cut"
      cut_by_turn = stop == "length" and len(toks) >= config.max_tokens_per_turn
      row.stop_reason = "turn_length" if cut_by_turn else "max_sequence"
    else:
      outcome = protocol.execute_turn(text, row.task.image, frame=config.coordinate_frame, seen_size=row.seen_size)
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
      t.kind = outcome.kind
  except Exception as e:  # this row ends; the others go on
    if record is not None:
      record.status, record.error = "error", _message(e)
    chunk = None
    _fail(row, e, f"turn {turn}")
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
  """Tokens (and crop) to append after a tool call, or the reason the row stops instead.

  Only the observation template's special tokens are special (the crop's image placeholder, the turn markers): an
  error message echoing the model's text is tokenised as plain text (`TurnOutcome.observation_parts`).
  """
  if turn >= config.max_turns:
    return None, "max_turns"
  images = []
  if outcome.crop is not None:
    if len(row.images) >= config.max_images:
      return None, "max_images"
    pv, grid = improc.preprocess(outcome.crop, min_pixels=config.min_pixels, max_pixels=config.max_pixels)
    images.append((pv, grid))
  ids = chat.encode_parts(tokenizer, outcome.observation_parts())
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
  try:
    positions, _ = positions_for_tokens(np.asarray(row.tokens, np.int32), iter(row.grids), image_token_id, merge)
  except ValueError as e:  # image pads that are no image's (a script forced them): the row keeps its prompt only
    _fail(row, e, "laying out the trajectory")
    row.answer, n, k = None, row.prompt_length, row.prompt_images
    del row.tokens[n:], row.mask[n:], row.logprobs[n:], row.images[k:], row.pixel_values[k:], row.grids[k:]
    positions, _ = positions_for_tokens(np.asarray(row.tokens, np.int32), iter(row.grids), image_token_id, merge)
  tokens = np.asarray(row.tokens, np.int32)
  metadata = dict(row.task.metadata)
  if row.failure is not None:
    metadata["error"] = _message(row.failure)
  return Trajectory(
    uid=f"{row.task.task_id}/{row.sample_index}",
    task_id=row.task.task_id,
    sample_index=row.sample_index,
    token_ids=tokens,
    action_mask=np.asarray(row.mask, np.int8),
    logprobs=np.asarray(row.logprobs, np.float32),
    position_ids=positions.astype(np.int32),
    images=row.images,
    grids=np.asarray(row.grids, np.int64).reshape(-1, 3),
    prompt_length=row.prompt_length,
    turns=row.turns,
    tool_calls=row.tool_calls,
    answer=row.answer,
    stop_reason=row.stop_reason or "max_turns",
    image_min_pixels=config.min_pixels,
    image_max_pixels=config.max_pixels,
    metadata=metadata,
    pixel_values=row.pixel_values,
  )


# --------------------------------------------------------------------------------------------------------------
# The continuous engine: decode slots over a paged KV pool
# --------------------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class RolloutStats:
  """What a rollout cost (filled by `run_rollouts(..., stats=RolloutStats())`; benchmarks and logs).

  prefill_tokens: prompt tokens run through the model (once per group in the continuous engine, once per row in
    the lock-step one); extend_tokens: observation tokens (tool results, crops) appended after turns.
  slot_steps: decode steps x rows the step computed (idle or finished rows included); token_steps: tokens
    generated. Their ratio is the slot utilisation.
  kv_bytes: bytes of KV memory allocated (the continuous engine's pool at its largest, the lock-step engine's
    largest chunk cache); kv_peak_used_bytes: of those, the most held by rows at once (pages in use).
  """

  prefill_tokens: int = 0
  extend_tokens: int = 0
  slot_steps: int = 0
  token_steps: int = 0
  kv_bytes: int = 0
  kv_peak_used_bytes: int = 0
  segments: int = 0
  restarts: int = 0  # rows restarted from their prompt because a fixed pool (kv_pages) ran out
  pool_failures: int = 0  # rows ended ("error") because a fixed pool cannot hold them even alone
  pool_grows: int = 0

  @property
  def slot_utilisation(self) -> float:
    return self.token_steps / max(self.slot_steps, 1)

  def metrics(self) -> dict[str, float]:
    """What a trainer logs per step (`engine/*`): where a fixed pool's pressure and the slots' idling show."""
    return {
      "engine/slot_utilisation": self.slot_utilisation,
      "engine/prefill_tokens": float(self.prefill_tokens),
      "engine/segments": float(self.segments),
      "engine/kv_allocated_gib": self.kv_bytes / 2**30,
      "engine/kv_peak_used_gib": self.kv_peak_used_bytes / 2**30,
      "engine/restarts": float(self.restarts),
      "engine/pool_failures": float(self.pool_failures),
      "engine/pool_grows": float(self.pool_grows),
    }


@dataclasses.dataclass
class _Live:
  """A row in a decode slot: its pages, what the cache holds of it, and its turn in progress."""

  index: int  # global row index
  slot: int
  shard: int  # the data x fsdp shard of its slot, which holds its pages (local page ids)
  pages: list[int]
  cached: int  # tokens in the cache
  next_pos: int  # M-RoPE position of the next text token
  order: int  # admission order: a fixed pool that runs out restarts the youngest row first
  turn: int = 1
  budget: int = 0  # tokens the row may still generate in this turn
  toks: list[int] = dataclasses.field(default_factory=list)  # this turn's tokens so far
  lps: list[float] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class _Prompt:
  """A group's prompt prefilled on one shard: its pages (the full ones shared by the group's rows there), its length,
  next M-RoPE position and logits (V,) (those of every sample's first token)."""

  pages: list[int]
  length: int
  next_pos: int = 0
  logits: Any = None


def _fresh(row: _Row) -> _Row:
  """A copy of a row in its prompt state (for a restart)."""
  return dataclasses.replace(
    row,
    tokens=list(row.tokens),
    mask=list(row.mask),
    logprobs=list(row.logprobs),
    images=list(row.images),
    pixel_values=list(row.pixel_values),
    grids=list(row.grids),
    turns=[],
    tool_calls=[],
  )


def _rollout_continuous(
  sampler: Sampler,
  tokenizer,
  rows: list[_Row],
  chunks: list[Chunk],
  runnable: list[int],
  *,
  group_size: int,
  config: AgentConfig,
  seed: int,
  scripted_turns: Sequence[Sequence[str]] | None,
  on_turn: Callable[[int, int, Turn, ToolRecord | None], None] | None,
  stats: RolloutStats,
  cancel: Callable[[], bool] | None = None,
) -> None:
  """Rolls out rows `runnable` (updated in place) with continuous batching over a paged KV pool.

  The engine owns `max_concurrent_rows` decode slots (all rows if 0). A row takes a slot when one frees, in row
  order; its group's prompt (vision tower + prefill) runs once, when the group's first row is admitted, and the
  group's rows read its full pages in place (each gets a copy of the last, partly filled page; the last row
  admitted takes the group's own). Decode runs in segments of at most `segment_steps` steps that end once a
  `segment_release` fraction of the rows in flight ended their turn; between segments the host parses those
  turns, crops, and extends only those rows, while the others keep their state and pages. A finished row gives
  its pages back. With `kv_pages` = 0 the pool grows (doubling) when it runs out; with a fixed pool, rows wait for
  pages to be admitted, and a row in flight that needs pages none can give restarts the youngest other row from
  its prompt (its trajectory comes out the same: a row's tokens depend only on its key and its own tokens).
  """
  if not runnable:
    return
  cfg = sampler.config
  im_end, eot = (tokenizer.convert_tokens_to_ids(t) for t in (chat.IM_END, chat.ENDOFTEXT))
  # The decode segment's length as the sampler runs it (a power of two): what each row holds pages for.
  capacity, page, steps = config.max_total_tokens, config.page_size, bucket(config.segment_steps, 1)
  shards = sampler.pool_shards  # slots and pages split over data x fsdp: a row's pages live on its slot's shard
  n_slots = -(-min(config.max_concurrent_rows or len(runnable), len(runnable)) // shards) * shards
  per_shard = n_slots // shards
  keys = row_keys(seed, [row_seed_id(r.task.task_id, r.sample_index) for r in rows])
  templates = {i: _fresh(rows[i]) for i in runnable} if config.kv_pages else {}
  per_page = paged.page_bytes(cfg, page, sampler.dtype)

  # The pool: fixed, or a first guess (the first wave's prompts + a segment of every slot) that grows by doubling.
  if config.kv_pages:
    pages_per_shard = -(-config.kv_pages // shards)
  else:
    first = {i // group_size: rows[i].prompt_length for i in runnable[:n_slots]}  # the first wave's groups
    prompt_pages = sum(paged.pages_for(n, page) for n in first.values())
    pages_per_shard = bucket(-(-(prompt_pages + n_slots * (1 + paged.pages_for(steps, page))) // shards), 16)
  alloc = paged.ShardedAllocator(shards, pages_per_shard)
  kv = sampler.init_pool(alloc.num_pages, page)
  logits = jnp.zeros((n_slots, cfg.text.vocab_size), jnp.float32)
  queue = collections.deque(runnable)
  pending = collections.Counter(i // group_size for i in runnable)  # rows of each group not admitted yet
  prompts: dict[tuple[int, int], _Prompt] = {}  # (group, shard) -> its prefilled prompt on that shard
  slots: list[_Live | None] = [None] * n_slots
  reported = collections.Counter()  # turns of each row passed to on_turn (a restarted row does not repeat them)
  order = 0

  def ensure(d: int, n: int) -> bool:
    """n free pages on shard d, growing the pool if it may grow."""
    nonlocal kv
    if alloc.can_alloc(d, n):
      return True
    if config.kv_pages:
      return False
    grown = max(2 * alloc.pages_per_shard, bucket(alloc.shards[d].in_use + n, 16))
    log.info("rollout: KV pool %d -> %d pages of %d tokens", alloc.num_pages, grown * shards, page)
    alloc.add_pages(grown)
    kv = sampler.grow_pool(kv, grown)
    stats.pool_grows += 1
    return True

  def pool_too_small(what: str) -> str:
    return (
      f"rollout.kv_pages={config.kv_pages} pages of {page} tokens ({alloc.pages_per_shard} per shard) cannot hold "
      f"{what}; raise kv_pages or use 0 (grow on demand)"
    )

  def drop_prompts(keep: Callable[[int, int], bool]) -> int:
    """Releases the cached prompts (group g, shard d) that `keep` does not keep; returns how many. A dropped group's
    prompt is prefilled again when one of its rows starts."""
    dropped = [key for key in prompts if not keep(*key)]
    for g, d in dropped:
      alloc.release(d, prompts.pop((g, d)).pages)
    return len(dropped)

  def restart(live: _Live) -> None:
    alloc.release(live.shard, live.pages)
    rows[live.index] = _fresh(templates[live.index])
    slots[live.slot] = None
    queue.appendleft(live.index)
    pending[live.index // group_size] += 1
    stats.restarts += 1
    log.info("rollout: KV pool full (kv_pages=%d): row %d restarts from its prompt", config.kv_pages, live.index)

  def pages_for_row(live: _Live, tokens: int) -> None:
    """Gives `live` the pages to hold `tokens` tokens. When a fixed pool is full, the youngest row of the shard
    restarts from its prompt, `live` itself if it is the youngest (older rows keep their progress)."""
    need = paged.pages_for(tokens, page) - len(live.pages)
    if need <= 0:
      return
    while not ensure(live.shard, need):
      rows_here = [x for x in slots if x is not None and x.shard == live.shard]
      if rows_here == [live]:
        if drop_prompts(keep=lambda g, d: d != live.shard or g == live.index // group_size):
          continue  # other groups' cached prompts on this shard made room
        # recorded, not raised: the row ends, the rollout goes on
        msg = f"row {live.index} alone ({tokens} tokens)"
        _fail(rows[live.index], MemoryError(pool_too_small(msg)), "KV pages")
        alloc.release(live.shard, live.pages)
        slots[live.slot] = None
        stats.pool_failures += 1
        return
      youngest = max(rows_here, key=lambda x: x.order)
      restart(youngest)
      if youngest is live:
        return
    live.pages += alloc.alloc(live.shard, need)

  def peak():
    stats.kv_peak_used_bytes = max(stats.kv_peak_used_bytes, alloc.peak_in_use * per_page)

  while queue or any(x is not None for x in slots):
    _check_cancel(cancel)
    # 1. Admission: free slots take the next rows, preferring a shard that holds the row's group prompt (a prompt
    # is prefilled once per shard that runs its group). Every page a row starts with is taken here; a fixed pool
    # also keeps a segment's growth free for the row.
    admitted, to_prefill = [], []
    headroom = paged.pages_for(steps, page) if config.kv_pages else 0
    full_shards: set[int] = set()
    while queue:
      free = [s for s in range(n_slots) if slots[s] is None and s // per_shard not in full_shards]
      if not free:
        break
      i = queue[0]
      g = i // group_size
      s = next((s for s in free if (g, s // per_shard) in prompts), free[0])
      d = s // per_shard
      last = pending[g] == 1  # the group's last row takes the group's pages on its shard (no copy)
      copy = 0 if last else 1
      fresh = (g, d) not in prompts
      n = paged.pages_for(rows[i].prompt_length, page) if fresh else 0
      if not ensure(d, n + copy + headroom):
        full_shards.add(d)  # this shard is full; another may have room
        continue
      if fresh:
        prompts[g, d] = _Prompt(pages=alloc.alloc(d, n), length=rows[i].prompt_length)
        to_prefill.append((g, d, i))
      queue.popleft()
      pending[g] -= 1
      slots[s] = _Live(index=i, slot=s, shard=d, pages=alloc.alloc(d, copy), cached=0, next_pos=0, order=order)
      order += 1
      admitted.append((slots[s], g, last))
    if not admitted and not any(x is not None for x in slots):
      # Nothing in flight will free pages: the row at the head of the queue cannot start. Other groups' cached
      # prompts go first (prefilled again when their rows start); if there are none, the row ends (recorded, not
      # raised), and with it its group's prompts if it was the group's last row; the others go on.
      if drop_prompts(keep=lambda g, d: g == queue[0] // group_size):
        continue
      i = queue.popleft()
      msg = f"the prompt of row {i} ({rows[i].prompt_length} tokens) with a segment's growth"
      _fail(rows[i], MemoryError(pool_too_small(msg)), "KV pages")
      stats.pool_failures += 1
      pending[i // group_size] -= 1
      if not pending[i // group_size]:
        drop_prompts(keep=lambda g, d: g != i // group_size)
      continue
    if to_prefill:
      kv, lg, nxt = sampler.extend_paged(
        kv,
        [prompts[g, d].pages for g, d, _ in to_prefill],
        [0] * len(to_prefill),
        [0] * len(to_prefill),
        [chunks[i] for _, _, i in to_prefill],
        shards=[d for _, d, _ in to_prefill],
      )
      for k, (g, d, _) in enumerate(to_prefill):
        prompts[g, d].logits, prompts[g, d].next_pos = lg[k], int(nxt[k])
        stats.prefill_tokens += prompts[g, d].length
    if admitted:
      copies, first_logits = [], []
      for live, g, last in admitted:
        d = live.shard
        p = prompts[g, d]
        full = p.length // page
        if last:  # inherits the group's references on this shard; its prompts on other shards are done
          live.pages = p.pages
          for key in [key for key in prompts if key[0] == g]:
            if key != (g, d):
              alloc.release(key[1], prompts[key].pages)
            del prompts[key]
        else:
          alloc.share(d, p.pages[:full])
          reserved, live.pages = live.pages, p.pages[:full]
          if p.length % page:  # copy on write: the prompt's last page, which the row's tokens will fill
            live.pages = live.pages + reserved
            copies.append((d, p.pages[full], reserved[0]))
          else:  # the prompt fills whole pages: the reserved page is not needed
            alloc.release(d, reserved)
        live.cached, live.next_pos = p.length, p.next_pos
        live.budget = min(config.max_tokens_per_turn, capacity - len(rows[live.index].tokens))
        first_logits.append(p.logits)
      if copies:
        kv = sampler.copy_pages(kv, copies)
      idx = np.asarray([live.slot for live, _, _ in admitted], np.int32)
      logits = set_rows(logits, idx, jnp.stack(first_logits))
      peak()

    # 2. A decode segment over every slot; each row in flight holds pages for what the segment may add.
    for live in list(slots):
      if live is not None and slots[live.slot] is live:
        pages_for_row(live, live.cached + min(steps, live.budget))
    peak()
    in_flight = [x for x in slots if x is not None]
    if not in_flight:
      continue
    forced = None
    if scripted_turns is not None:
      forced = [None] * n_slots
      for live in in_flight:
        script = _script(tokenizer, scripted_turns, live.index, live.turn)
        if script is not None:
          forced[live.slot] = script[len(live.toks) :] or [-1]  # -1: sample (the script is used up)
    kv, logits, out = sampler.decode_segment(
      kv,
      logits,
      page_tables=[x.pages if x else [] for x in slots],
      lengths=[x.cached if x else 0 for x in slots],
      next_pos=[x.next_pos if x else 0 for x in slots],
      budgets=[x.budget if x else 0 for x in slots],
      keys=keys[np.asarray([x.index if x else 0 for x in slots])],
      steps=steps,
      stop_tokens=[im_end, eot],
      params=config.sampling,
      forced_tokens=forced,
      release=max(1, int(config.segment_release * len(in_flight))),
    )
    counts = [len(t) for t in out.tokens]
    stats.segments += 1
    stats.slot_steps += max(counts) * n_slots
    stats.token_steps += sum(counts)

    # 3. The host serves the rows whose turn ended: parse, crop, and queue their observation.
    to_extend = []
    for live in in_flight:
      s = live.slot
      live.toks += out.tokens[s]
      live.lps += [float(x) for x in out.logprobs[s]]
      live.cached += counts[s]
      live.next_pos += counts[s]
      live.budget -= counts[s]
      if out.stop_reason[s] not in ("stop_token", "length"):
        continue
      row = rows[live.index]
      t, record, chunk = _take_turn(
        row, live.turn, live.toks, live.lps, out.stop_reason[s], config, tokenizer, cfg.image_token_id, capacity
      )
      if on_turn is not None and live.turn > reported[live.index]:
        reported[live.index] = live.turn
        on_turn(live.index, live.turn, t, record)
      if row.stop_reason is not None:
        alloc.release(live.shard, live.pages)
        slots[s] = None
      else:
        to_extend.append((live, chunk))

    # 4. Their observations (tool results, crops) go into their pages; the next turn starts.
    for live, chunk in to_extend:
      if slots[live.slot] is live:
        pages_for_row(live, live.cached + len(chunk.tokens))
    to_extend = [(live, chunk) for live, chunk in to_extend if slots[live.slot] is live]
    if to_extend:
      kv, lg, nxt = sampler.extend_paged(
        kv,
        [live.pages for live, _ in to_extend],
        [live.cached for live, _ in to_extend],
        [live.next_pos for live, _ in to_extend],
        [chunk for _, chunk in to_extend],
        shards=[live.shard for live, _ in to_extend],
      )
      logits = set_rows(logits, np.asarray([live.slot for live, _ in to_extend], np.int32), lg)
      for k, (live, chunk) in enumerate(to_extend):
        live.cached += len(chunk.tokens)
        live.next_pos = int(nxt[k])
        live.turn += 1
        live.toks, live.lps = [], []
        live.budget = min(config.max_tokens_per_turn, capacity - len(rows[live.index].tokens))
        stats.extend_tokens += len(chunk.tokens)
    peak()
  stats.kv_bytes = max(stats.kv_bytes, alloc.num_pages * per_page)
