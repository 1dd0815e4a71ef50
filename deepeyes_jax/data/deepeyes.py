"""DeepEyes-Datasets-47k records: lazy parquet/JSONL sources, decoding into ``Example``, and writers.

Record layout (one parquet row, or one JSON object per JSONL line)::

    data_source   str                     "vstar" | "chart" | "thinklite_eureka" | ...
    prompt        list[{role, content}]   the user content holds one literal "<image>" per image
    images        list[{bytes, path}]     PNG/JPEG bytes (JSONL: base64 str), or a path (relative to the file)
    reward_model  {ground_truth, style}
    extra_info    {question, answer, index, ...}
    ability       str
    env_name      str                     "visual_toolbox_v2" = multi-turn zoom, "" = single turn

``DeepEyesSource`` is a grain ``RandomAccessDataSource`` over any mix of parquet and JSONL files. It reads lazily:
construction keeps only parquet row-group metadata and the byte offsets of JSONL lines; ``source[i]`` reads the
row group holding row ``i`` (kept in a small LRU cache shared by all files) or seeks to the line. It returns the raw
record dict with images still encoded, plus three bookkeeping keys: ``_file`` (path), ``_row`` (row in that file)
and ``_index`` (global index). A JSONL line that is not a JSON object comes back as ``{"_error": ..., ...}`` so that
``decode_example`` can reject it as a ``BadRecord`` instead of crashing the input pipeline. A file that cannot be read
at all (not parquet, a corrupt footer or row group, an I/O error) raises ``DataFileError`` naming the file: one bad row
is skipped, one bad file stops the run.

Random access into parquet costs one row-group read per cache miss, so files meant for shuffled training should be
written with small row groups (``write_deepeyes_parquet`` uses 128 rows by default).

``decode_example`` turns a record into an ``Example`` whose ``messages`` use this package's chat format
(``deepeyes_jax.processing.chat``): each ``<image>`` placeholder in a message's string content becomes an image item
holding the next decoded image, the text around it is kept byte for byte (empty pieces are dropped), and a message
without a placeholder keeps its plain string content.

Rows are validated where they are read, so that a bad row is skipped and counted by the pipeline instead of failing
mid-rollout: required fields and types, one image per ``<image>`` placeholder, at least one image (the zoom tool crops
it), images that decode within ``max_decoded_pixels`` and whose size ``smart_resize`` accepts (aspect ratio at most
200: ``processing.image.check_resizable``), and, when the caller says which are known, the ``data_source``
(``check_data_source``; the reward registry lives in a later layer, so the caller passes the predicate). A prompt
longer than the rollout budget needs the tokenizer and the image grids; the rollout engine ends such rows with the
stop reason ``prompt_too_long`` before any prefill (counted as ``stop/prompt_too_long``).
"""

from __future__ import annotations

import base64
import binascii
import collections
import dataclasses
import glob
import io
import json
import operator
import os
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np
from PIL import Image

from deepeyes_jax.processing.image import MAX_DECODED_PIXELS, ImageError, ImageSizeError, check_resizable, load_image

IMAGE_PLACEHOLDER = "<image>"
ROLES = ("system", "user", "assistant")
MULTI_TURN_ENV = "visual_toolbox_v2"
PARQUET_SUFFIXES = (".parquet",)
JSONL_SUFFIXES = (".jsonl", ".ndjson")
DEFAULT_ROW_GROUP_SIZE = 128

# Bookkeeping keys DeepEyesSource adds to every record.
FILE_KEY = "_file"
ROW_KEY = "_row"
INDEX_KEY = "_index"
ERROR_KEY = "_error"

# BadRecord.reason values (the keys of the pipeline's skip counters).
UNREADABLE = "unreadable_record"
MISSING_FIELD = "missing_field"
WRONG_TYPE = "wrong_type"
BAD_IMAGE = "bad_image"
IMAGE_SIZE = "image_size"  # empty, above max_decoded_pixels (a decompression bomb), or aspect ratio above 200
IMAGE_COUNT = "image_count_mismatch"
NO_IMAGE = "no_image"
UNKNOWN_SOURCE = "unknown_data_source"
REASONS = (UNREADABLE, MISSING_FIELD, WRONG_TYPE, BAD_IMAGE, IMAGE_SIZE, IMAGE_COUNT, NO_IMAGE, UNKNOWN_SOURCE)

_KNOWN_COLUMNS = ("data_source", "prompt", "images", "reward_model", "extra_info", "ability", "env_name")


class BadRecord(ValueError):
  """A record that cannot become an ``Example``. ``reason`` is one of the module's reason constants."""

  def __init__(self, message: str, reason: str, index: int | None = None, source: str | None = None):
    super().__init__(message)
    self.reason = reason
    self.index = index
    self.source = source

  def __reduce__(self):
    return (type(self), (str(self), self.reason, self.index, self.source))


class DataFileError(OSError):
  """A data file that cannot be read (not the format its name says, a corrupt footer or row group): the message
  names the file. Unlike a ``BadRecord`` it stops the run: skipping a whole file would silently change the data."""


@dataclasses.dataclass
class Example:
  """One decoded DeepEyes training/eval item.

  ``messages`` is in our chat format: ``{"role", "content": str | [{"type": "image", "image": PIL} |
  {"type": "text", "text": str}]}``; the image items hold the same objects as ``images`` (RGB), in order.
  ``extra`` keeps ``reward_model`` and ``extra_info`` as read, any unknown columns, and the ``source`` file and
  ``row`` in it.
  """

  index: int
  uid: str
  data_source: str
  messages: list[dict]
  images: list[Image.Image]
  question: str
  ground_truth: str
  env_name: str = ""
  ability: str = ""
  extra: dict = dataclasses.field(default_factory=dict)

  @property
  def multi_turn(self) -> bool:
    """True for the multi-turn zoom environment (non-empty ``env_name``), False for single-turn items."""
    return bool(self.env_name)


# ----------------------------------------------------------------------------------------------------------------------
# Decoding


def _image_source(item: Any, i: int, fail) -> Any:
  """The thing ``load_image`` should decode for ``images[i]``: bytes, a path or a PIL image."""
  if isinstance(item, Image.Image | bytes | bytearray | memoryview):
    return item
  if isinstance(item, str):
    return _b64decode(item, i, fail) if item.startswith("data:") else item
  if isinstance(item, Mapping):
    data, path = item.get("bytes"), item.get("path")
    if isinstance(data, str) and data:
      return _b64decode(data, i, fail)
    if isinstance(data, bytes | bytearray | memoryview) and len(data):
      return data
    if data is not None and not isinstance(data, str | bytes | bytearray | memoryview):
      fail(WRONG_TYPE, f"images[{i}]['bytes'] must be bytes or a base64 str, got {type(data).__name__}")
    if path:
      if isinstance(path, str | os.PathLike):
        return path
      fail(WRONG_TYPE, f"images[{i}]['path'] must be a str, got {type(path).__name__}")
    fail(MISSING_FIELD, f"images[{i}] has neither 'bytes' nor 'path'")
  fail(WRONG_TYPE, f"images[{i}] must be a dict with 'bytes'/'path', bytes, a path or a PIL image, got {type(item)}")


def _b64decode(text: str, i: int, fail) -> bytes:
  if text.startswith("data:"):  # data:image/png;base64,....
    text = text.partition(",")[2]
  try:
    return base64.b64decode(text, validate=True)
  except (binascii.Error, ValueError) as e:
    fail(BAD_IMAGE, f"images[{i}]: invalid base64: {e}")


def _split_placeholders(content: str, images: Iterable[Image.Image]) -> str | list[dict]:
  """String content -> the same string (no placeholder) or a list of text/image items, text kept byte for byte."""
  if IMAGE_PLACEHOLDER not in content:
    return content
  pieces = content.split(IMAGE_PLACEHOLDER)
  it = iter(images)
  items: list[dict] = []
  for k, piece in enumerate(pieces):
    if piece:
      items.append({"type": "text", "text": piece})
    if k < len(pieces) - 1:
      items.append({"type": "image", "image": next(it)})
  return items


def decode_example(
  record: Mapping[str, Any],
  index: int,
  *,
  source_name: str,
  max_decoded_pixels: int = MAX_DECODED_PIXELS,
  require_image: bool = True,
) -> Example:
  """Validate one raw record and decode its images into an ``Example``.

  ``index`` is the record's global index in its source; ``source_name`` names the file in error messages.
  Raises ``BadRecord`` (a ValueError) naming the file, index and problem, with its ``reason``: an unreadable record
  (``unreadable_record``), a missing required field (``data_source``, ``prompt``, ``reward_model.ground_truth``:
  ``missing_field``), a field of the wrong type or a message role other than system/user/assistant
  (``wrong_type``), a number of ``<image>`` placeholders different from the number of images
  (``image_count_mismatch``), no image at all when ``require_image`` (``no_image``: the zoom tool needs one), an
  image that does not decode (``bad_image``), or one whose size the processor refuses: more than
  ``max_decoded_pixels`` pixels, empty, or an aspect ratio above 200 (``image_size``).
  """
  row = record.get(ROW_KEY) if isinstance(record, Mapping) else None
  where = f"{source_name} (index {index}" + (f", row {row} of the file)" if row is not None else ")")

  def fail(reason: str, problem: str):
    raise BadRecord(f"{where}: {problem}", reason, index, source_name)

  if not isinstance(record, Mapping):
    fail(WRONG_TYPE, f"a record must be a dict, got {type(record).__name__}")
  if record.get(ERROR_KEY):
    fail(UNREADABLE, str(record[ERROR_KEY]))

  def optional_str(key: str) -> str:
    value = record.get(key)
    if value is None:
      return ""
    if not isinstance(value, str):
      fail(WRONG_TYPE, f"{key!r} must be a str, got {type(value).__name__}")
    return value

  data_source = record.get("data_source")
  if data_source is None or data_source == "":
    fail(MISSING_FIELD, "missing 'data_source'")
  if not isinstance(data_source, str):
    fail(WRONG_TYPE, f"'data_source' must be a str, got {type(data_source).__name__}")
  env_name, ability = optional_str("env_name"), optional_str("ability")

  reward_model = record.get("reward_model")
  if reward_model is None:
    fail(MISSING_FIELD, "missing 'reward_model'")
  if not isinstance(reward_model, Mapping):
    fail(WRONG_TYPE, f"'reward_model' must be a dict, got {type(reward_model).__name__}")
  ground_truth = reward_model.get("ground_truth")
  if ground_truth is None:
    fail(MISSING_FIELD, "missing 'reward_model.ground_truth'")
  if isinstance(ground_truth, int | float) and not isinstance(ground_truth, bool):
    ground_truth = str(ground_truth)
  if not isinstance(ground_truth, str):
    fail(WRONG_TYPE, f"'reward_model.ground_truth' must be a str, got {type(ground_truth).__name__}")

  extra_info = record.get("extra_info")
  if extra_info is None:
    extra_info = {}
  if not isinstance(extra_info, Mapping):
    fail(WRONG_TYPE, f"'extra_info' must be a dict, got {type(extra_info).__name__}")

  prompt = record.get("prompt")
  if prompt is None:
    fail(MISSING_FIELD, "missing 'prompt'")
  if not isinstance(prompt, list | tuple) or not prompt:
    fail(WRONG_TYPE, f"'prompt' must be a non-empty list of messages, got {type(prompt).__name__} {prompt!r:.80}")
  n_placeholders = 0
  for m, msg in enumerate(prompt):
    if not isinstance(msg, Mapping):
      fail(WRONG_TYPE, f"prompt[{m}] must be a dict, got {type(msg).__name__}")
    if msg.get("role") not in ROLES:
      fail(WRONG_TYPE, f"prompt[{m}] has role {msg.get('role')!r}, expected one of {', '.join(ROLES)}")
    if msg.get("content") is None:
      fail(MISSING_FIELD, f"prompt[{m}] has no 'content'")
    if not isinstance(msg["content"], str):
      fail(WRONG_TYPE, f"prompt[{m}]['content'] must be a str, got {type(msg['content']).__name__}")
    n_placeholders += msg["content"].count(IMAGE_PLACEHOLDER)

  raw_images = record.get("images")
  if raw_images is None:
    raw_images = []
  if not isinstance(raw_images, list | tuple):
    fail(WRONG_TYPE, f"'images' must be a list, got {type(raw_images).__name__}")
  if n_placeholders != len(raw_images):
    fail(
      IMAGE_COUNT, f"{n_placeholders} {IMAGE_PLACEHOLDER} placeholder(s) in the prompt but {len(raw_images)} image(s)"
    )
  if require_image and not raw_images:
    fail(NO_IMAGE, "no image (and no <image> placeholder): the zoom tool needs one")

  images = []
  for i, item in enumerate(raw_images):
    src = _image_source(item, i, fail)
    try:
      images.append(load_image(src, max_decoded_pixels=max_decoded_pixels))
      check_resizable(images[-1].height, images[-1].width)
    except ImageSizeError as e:
      fail(IMAGE_SIZE, f"images[{i}]: {e}")
    except ImageError as e:
      fail(BAD_IMAGE, f"images[{i}]: {e}")
    except (OSError, TypeError) as e:  # e.g. a path naming a directory
      fail(BAD_IMAGE, f"images[{i}]: {type(e).__name__}: {e}")

  it = iter(images)
  messages = [{"role": msg["role"], "content": _split_placeholders(msg["content"], it)} for msg in prompt]

  question = extra_info.get("question")
  if not isinstance(question, str):
    users = [msg["content"] for msg in prompt if msg["role"] == "user"]
    question = users[-1].replace(IMAGE_PLACEHOLDER, "").strip() if users else ""
  key = extra_info.get("index")
  uid = f"{data_source}-{key if key is not None and key != '' else index}"
  extra = {k: v for k, v in record.items() if k not in _KNOWN_COLUMNS and not k.startswith("_")}
  extra.update(reward_model=dict(reward_model), extra_info=dict(extra_info), source=source_name, row=row)
  return Example(
    index=int(index),
    uid=uid,
    data_source=data_source,
    messages=messages,
    images=images,
    question=question,
    ground_truth=ground_truth,
    env_name=env_name,
    ability=ability,
    extra=extra,
  )


def check_data_source(example: Example, known_source: Callable[[str], bool]) -> None:
  """Raises ``BadRecord`` (reason ``unknown_data_source``) unless ``known_source(example.data_source)``: a row no
  reward can score. The predicate comes from the caller (``run_setup.known_data_source`` asks the reward registry,
  which is a later layer than this one)."""
  if not known_source(example.data_source):
    source = example.extra.get("source") or "<record>"
    raise BadRecord(
      f"{source} (index {example.index}): no reward is registered for data_source {example.data_source!r}",
      UNKNOWN_SOURCE,
      example.index,
      source,
    )


def example_to_record(example: Example) -> dict[str, Any]:
  """The inverse of ``decode_example`` (up to image encoding): messages with image items become ``<image>``
  placeholders, ``reward_model``/``extra_info`` come from ``extra`` (ground truth and question from the fields)."""
  prompt = []
  for msg in example.messages:
    content = msg["content"]
    if not isinstance(content, str):
      content = "".join(IMAGE_PLACEHOLDER if item["type"] == "image" else item["text"] for item in content)
    prompt.append({"role": msg["role"], "content": content})
  extra = dict(example.extra)
  reward_model = {"style": "rule", **extra.pop("reward_model", {}), "ground_truth": example.ground_truth}
  extra_info = {"index": example.index, **extra.pop("extra_info", {}), "question": example.question}
  extra_info.setdefault("answer", example.ground_truth)
  extra.pop("source", None)
  extra.pop("row", None)
  return {
    "data_source": example.data_source,
    "prompt": prompt,
    "images": list(example.images),
    "reward_model": reward_model,
    "extra_info": extra_info,
    "ability": example.ability,
    "env_name": example.env_name,
    **extra,
  }


# ----------------------------------------------------------------------------------------------------------------------
# Sources


def expand_paths(paths: str | os.PathLike | Sequence[str | os.PathLike]) -> list[str]:
  """Files named by ``paths``: file paths, glob patterns (``*``, ``?``, ``[...]``, ``**``) or directories (their
  ``*.parquet``/``*.jsonl`` files), in the given order, each pattern's matches sorted, duplicates dropped.
  Raises FileNotFoundError naming a pattern or path that matches nothing."""
  if isinstance(paths, str | os.PathLike):
    paths = [paths]
  out: list[str] = []
  for p in paths:
    p = os.fspath(p)
    if any(c in p for c in "*?["):
      matches = sorted(m for m in glob.glob(p, recursive=True) if os.path.isfile(m))
      if not matches:
        raise FileNotFoundError(f"no DeepEyes data files match the pattern {p!r}")
    elif os.path.isdir(p):
      matches = sorted(os.path.join(p, n) for n in os.listdir(p) if n.endswith(PARQUET_SUFFIXES + JSONL_SUFFIXES))
      if not matches:
        raise FileNotFoundError(f"no *.parquet or *.jsonl files in the directory {p!r}")
    elif os.path.isfile(p):
      matches = [p]
    else:
      raise FileNotFoundError(f"no such DeepEyes data file: {p!r}")
    out.extend(m for m in matches if m not in out)
  return out


def _resolve_image_paths(record: dict, base_dir: str) -> None:
  """Make relative image paths relative to the data file's directory (only where an image has no bytes)."""
  images = record.get("images")
  if not isinstance(images, list):
    return
  for i, item in enumerate(images):
    if isinstance(item, str) and not item.startswith("data:") and not os.path.isabs(item):
      images[i] = os.path.join(base_dir, item)
    elif isinstance(item, dict) and not item.get("bytes"):
      path = item.get("path")
      if isinstance(path, str) and path and not os.path.isabs(path):
        images[i] = {**item, "path": os.path.join(base_dir, path)}


class _ParquetFile:
  """Row-group metadata of one parquet file; the file is (re)opened lazily, once per process."""

  def __init__(self, path: str):
    import pyarrow.parquet as pq

    self.path = path
    try:
      pf = pq.ParquetFile(path)
      try:
        md = pf.metadata
        rows = [md.row_group(i).num_rows for i in range(md.num_row_groups)]
      finally:
        pf.close()
    except Exception as e:  # pyarrow's ArrowInvalid / OSError name no file
      raise DataFileError(f"{path}: not a readable parquet file: {type(e).__name__}: {e}") from e
    self.row_group_starts = np.cumsum([0, *rows], dtype=np.int64)
    self._pf = None
    self._pid = None

  def __len__(self) -> int:
    return int(self.row_group_starts[-1])

  def locate(self, row: int) -> tuple[int, int]:
    rg = int(np.searchsorted(self.row_group_starts, row, side="right")) - 1
    return rg, row - int(self.row_group_starts[rg])

  def read_row_group(self, rg: int, columns: Sequence[str] | None):
    import pyarrow.parquet as pq

    if self._pf is None or self._pid != os.getpid():
      self._pf, self._pid = pq.ParquetFile(self.path), os.getpid()
    return self._pf.read_row_group(rg, columns=list(columns) if columns is not None else None)

  def __getstate__(self):
    return {**self.__dict__, "_pf": None, "_pid": None}


class _JsonlFile:
  """Byte offsets and lengths of the non-blank lines of one JSONL file."""

  def __init__(self, path: str):
    self.path = path
    starts, lengths, pos = [], [], 0
    with open(path, "rb") as f:
      for line in f:
        if line.strip():
          starts.append(pos)
          lengths.append(len(line))
        pos += len(line)
    self.starts = np.asarray(starts, dtype=np.int64)
    self.lengths = np.asarray(lengths, dtype=np.int64)

  def __len__(self) -> int:
    return len(self.starts)

  def read(self, row: int) -> dict:
    with open(self.path, "rb") as f:
      f.seek(int(self.starts[row]))
      line = f.read(int(self.lengths[row]))
    try:
      record = json.loads(line)
    except ValueError as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
      return {ERROR_KEY: f"invalid JSON line: {type(e).__name__}: {e}"}
    if not isinstance(record, dict):
      return {ERROR_KEY: f"a JSONL line must hold a JSON object, got {type(record).__name__}"}
    return record


class DeepEyesSource:
  """Grain ``RandomAccessDataSource`` over DeepEyes parquet and/or JSONL files (see the module docstring).

  ``paths``: a path, glob pattern or directory, or a sequence of them (``expand_paths``); rows are numbered
  file after file in that order. ``cache_row_groups``: how many parquet row groups (over all files) stay decoded in
  memory. ``columns``: read only these parquet columns (default: all). Thread-safe and picklable (the cache and
  open file handles are not pickled).
  """

  def __init__(
    self,
    paths: str | os.PathLike | Sequence[str | os.PathLike],
    *,
    cache_row_groups: int = 4,
    columns: Sequence[str] | None = None,
  ):
    if cache_row_groups < 1:
      raise ValueError(f"cache_row_groups must be >= 1, got {cache_row_groups}")
    self.paths = expand_paths(paths)
    self._files: list[_ParquetFile | _JsonlFile] = []
    for p in self.paths:
      if p.endswith(PARQUET_SUFFIXES):
        self._files.append(_ParquetFile(p))
      elif p.endswith(JSONL_SUFFIXES):
        self._files.append(_JsonlFile(p))
      else:
        raise ValueError(f"{p!r}: unknown data file type (expected {', '.join(PARQUET_SUFFIXES + JSONL_SUFFIXES)})")
    self._starts = np.cumsum([0, *(len(f) for f in self._files)], dtype=np.int64)
    self._cache_size = cache_row_groups
    self._columns = tuple(columns) if columns is not None else None
    self._init_runtime()

  def _init_runtime(self) -> None:
    self._cache: collections.OrderedDict[tuple[int, int], Any] = collections.OrderedDict()
    self._lock = threading.Lock()
    self.row_group_reads = 0  # parquet row groups read so far by this process (cache misses)

  def __getstate__(self):
    state = dict(self.__dict__)
    for k in ("_cache", "_lock", "row_group_reads"):
      state.pop(k)
    return state

  def __setstate__(self, state):
    self.__dict__.update(state)
    self._init_runtime()

  def __len__(self) -> int:
    return int(self._starts[-1])

  def __repr__(self) -> str:
    return f"DeepEyesSource({len(self.paths)} files, {len(self)} records)"

  def locate(self, index: int) -> tuple[str, int]:
    """(file path, row in that file) of a global index."""
    index = self._check_index(index)
    f = int(np.searchsorted(self._starts, index, side="right")) - 1
    return self.paths[f], index - int(self._starts[f])

  def _check_index(self, index: int) -> int:
    index = operator.index(index)
    n = len(self)
    if index < 0:
      index += n
    if not 0 <= index < n:
      raise IndexError(f"index {index} out of range for {self!r}")
    return index

  @property
  def cached_row_groups(self) -> list[tuple[str, int]]:
    """(file, row group) pairs now in the cache, least recently used first."""
    with self._lock:
      return [(self.paths[f], rg) for f, rg in self._cache]

  def _row_group(self, f: int, rg: int):
    with self._lock:  # held while reading: concurrent misses on one row group read it once
      key = (f, rg)
      table = self._cache.get(key)
      if table is not None:
        self._cache.move_to_end(key)
        return table
      table = self._files[f].read_row_group(rg, self._columns)
      self.row_group_reads += 1
      self._cache[key] = table
      while len(self._cache) > self._cache_size:
        self._cache.popitem(last=False)
      return table

  def __getitem__(self, index: int) -> dict[str, Any]:
    index = self._check_index(index)
    f = int(np.searchsorted(self._starts, index, side="right")) - 1
    row = index - int(self._starts[f])
    file = self._files[f]
    try:
      if isinstance(file, _ParquetFile):
        rg, offset = file.locate(row)
        record = self._row_group(f, rg).slice(offset, 1).to_pylist()[0]
      else:
        record = file.read(row)
    except Exception as e:  # a corrupt row group, a file gone or truncated since indexing: the file, not the row
      raise DataFileError(f"{file.path} (row {row}): cannot read the file: {type(e).__name__}: {e}") from e
    _resolve_image_paths(record, os.path.dirname(os.path.abspath(file.path)))
    record[FILE_KEY], record[ROW_KEY], record[INDEX_KEY] = file.path, row, index
    return record


# ----------------------------------------------------------------------------------------------------------------------
# Writers


def _png_bytes(img: Image.Image) -> bytes:
  buf = io.BytesIO()
  img.save(buf, format="PNG")
  return buf.getvalue()


def _image_entry(item: Any) -> dict[str, Any]:
  """-> {"bytes": bytes | None, "path": str | None} with PIL images encoded to PNG."""
  if isinstance(item, Image.Image):
    return {"bytes": _png_bytes(item), "path": None}
  if isinstance(item, bytes | bytearray | memoryview):
    return {"bytes": bytes(item), "path": None}
  if isinstance(item, str | os.PathLike):
    return {"bytes": None, "path": os.fspath(item)}
  if isinstance(item, Mapping):
    data = item.get("bytes")
    if isinstance(data, Image.Image):
      data = _png_bytes(data)
    elif isinstance(data, str):
      data = base64.b64decode(data.partition(",")[2] if data.startswith("data:") else data)
    elif isinstance(data, bytearray | memoryview):
      data = bytes(data)
    path = item.get("path")
    return {"bytes": data, "path": os.fspath(path) if path is not None else None}
  raise TypeError(f"cannot write an image of type {type(item).__name__}")


def _as_record(record: Mapping[str, Any] | Example) -> dict[str, Any]:
  record = example_to_record(record) if isinstance(record, Example) else dict(record)
  for k in [k for k in record if k.startswith("_")]:
    del record[k]
  return record


def write_deepeyes_parquet(
  path: str | os.PathLike,
  records: Iterable[Mapping[str, Any] | Example],
  *,
  row_group_size: int = DEFAULT_ROW_GROUP_SIZE,
) -> str:
  """Write records (dicts in the DeepEyes layout, or ``Example``s) as one parquet file in the DeepEyes column layout.

  Images may be PIL images (stored as PNG bytes), encoded bytes, paths, or ``{"bytes", "path"}`` dicts.
  ``data_source``/``ability``/``env_name`` are strings, ``prompt`` a list of ``{content, role}`` structs and
  ``images`` a list of ``{bytes: binary, path: string}`` structs; other columns (``reward_model``, ``extra_info``,
  anything else) get pyarrow's inferred types. A field a record lacks is stored as null. Keys starting with ``_``
  (``DeepEyesSource``'s bookkeeping) are dropped. Returns the path.
  """
  import pyarrow as pa
  import pyarrow.parquet as pq

  rows = [_as_record(r) for r in records]
  for r in rows:
    if isinstance(r.get("images"), list | tuple):
      r["images"] = [_image_entry(im) for im in r["images"]]
  types = {
    "data_source": pa.string(),
    "prompt": pa.list_(pa.struct([("content", pa.string()), ("role", pa.string())])),
    "images": pa.list_(pa.struct([("bytes", pa.binary()), ("path", pa.string())])),
    "ability": pa.string(),
    "env_name": pa.string(),
  }
  columns = list(_KNOWN_COLUMNS)
  for r in rows:
    columns.extend(k for k in r if k not in columns)
  arrays = {}
  for col in columns:
    values = [r.get(col) for r in rows]
    arrays[col] = pa.array(values, type=types.get(col))
  pq.write_table(pa.table(arrays), os.fspath(path), row_group_size=max(1, row_group_size))
  return os.fspath(path)


def _guess_suffix(data: bytes) -> str:
  if data.startswith(b"\x89PNG"):
    return ".png"
  if data.startswith(b"\xff\xd8"):
    return ".jpg"
  return ".bin"


def _json_default(obj: Any) -> Any:
  if isinstance(obj, np.generic):
    return obj.item()
  if isinstance(obj, np.ndarray):
    return obj.tolist()
  raise TypeError(f"cannot write {type(obj).__name__} to JSON")


def write_deepeyes_jsonl(
  path: str | os.PathLike,
  records: Iterable[Mapping[str, Any] | Example],
  *,
  image_dir: str | os.PathLike | None = None,
) -> str:
  """Write records (dicts in the DeepEyes layout, or ``Example``s) as JSONL, one JSON object per line.

  Image bytes (PIL images are encoded to PNG) are stored as base64 strings in ``images[i]["bytes"]``, or, if
  ``image_dir`` is given (relative to the JSONL file's directory, or absolute), written to files there and stored as
  ``images[i]["path"]`` relative to the JSONL file. Images given as paths are stored as paths, unchanged.
  Returns the path.
  """
  path = os.fspath(path)
  base = os.path.dirname(os.path.abspath(path))
  if image_dir is not None:
    image_dir = os.path.join(base, os.fspath(image_dir))
    os.makedirs(image_dir, exist_ok=True)
  stem = os.path.splitext(os.path.basename(path))[0]
  with open(path, "w", encoding="utf-8") as out:
    for n, record in enumerate(records):
      record = _as_record(record)
      if isinstance(record.get("images"), list | tuple):
        images = []
        for i, item in enumerate(record["images"]):
          entry = _image_entry(item)
          if entry["bytes"] is not None and image_dir is not None:
            file = os.path.join(image_dir, f"{stem}-{n:06d}-{i}{_guess_suffix(entry['bytes'])}")
            with open(file, "wb") as f:
              f.write(entry["bytes"])
            entry = {"bytes": None, "path": os.path.relpath(file, base)}
          elif entry["bytes"] is not None:
            entry["bytes"] = base64.b64encode(entry["bytes"]).decode("ascii")
          images.append(entry)
        record["images"] = images
      out.write(json.dumps(record, ensure_ascii=False, default=_json_default) + "\n")
  return path
