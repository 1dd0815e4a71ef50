"""Evaluation benchmarks read from the files their authors release (nothing is downloaded).

Every loader returns ``(items, report)``: a list of :class:`BenchmarkItem` and a :class:`LoadReport` that counts
what was read and names every file or row that was skipped, with the reason, and counts the skipped items by
category when their category can still be read (the summaries' per-category ``skipped``). A missing or corrupt file
skips that item, never the benchmark; a file that is not the benchmark at all (a TSV without the expected columns, a
path that does not exist) raises ``BenchmarkFormatError`` naming it.

Layouts (as released):

* **V* Bench** (``load_vstar(root)``): one directory per category (``direct_attributes/``, ``relative_position/``)
  holding ``NAME.jpg`` and ``NAME.json``; the JSON has ``question``, ``options`` (the FIRST option is the correct
  one), ``bbox`` (a list of ``[x, y, w, h]`` target boxes in image pixels) and ``target_object`` (names).
* **HR-Bench 4K / 8K** (``load_hrbench(tsv)``): a TSV with the columns ``index, question, answer, A, B, C, D,
  category, cycle_category, image``; ``answer`` is the correct letter, ``image`` the base64 of the encoded image.
  The release already rotates each question's options cyclically (``cycle_category``), so its letters are balanced.
* **POPE** (``load_pope(path, image_dir)``): JSON lines (one file, or a directory of ``*.json``/``*.jsonl``) with
  ``question_id``, ``image`` (a file name in ``image_dir``), ``text`` (the yes/no question), ``label`` (``yes`` /
  ``no``) and ``category`` (when absent: the file name's ``adversarial`` / ``popular`` / ``random``).
* **DeepEyes-format** parquet / JSONL (``load_deepeyes(paths)``): through ``DeepEyesSource`` and ``decode_example``;
  the record's messages are kept byte for byte.

Images stay encoded (bytes or a path) until :meth:`BenchmarkItem.load_image`, so an 8K benchmark does not hold
hundreds of decoded images; at load time each image's header is checked (``processing.image.probe_image``: PIL's
``verify``, and the size limits of the processor), so an item whose image is not an image (``bad_image``) or has a
size the processor refuses (``image_size``: a header claiming more than ``MAX_DECODED_PIXELS`` pixels, a
decompression bomb, or an aspect ratio above 200) is skipped and counted here, not discovered mid-rollout. A file
that still fails to decode later is reported by the evaluation as a skipped item.
"""

from __future__ import annotations

import base64
import binascii
import collections
import csv
import dataclasses
import glob
import json
import logging
import os
import sys
from collections.abc import Sequence
from typing import Any

from PIL import Image

from deepeyes_jax.processing.image import ImageError, ImageSizeError, load_image, probe_image

log = logging.getLogger(__name__)

VSTAR_CATEGORIES = ("direct_attributes", "relative_position")
HRBENCH_COLUMNS = ("index", "question", "answer", "A", "B", "C", "D", "category", "cycle_category", "image")
POPE_CATEGORIES = ("adversarial", "popular", "random")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"

# Why an item was skipped (the keys of LoadReport.by_reason).
MISSING_FILE = "missing_file"
BAD_JSON = "bad_json"
BAD_FIELD = "bad_field"
BAD_IMAGE = "bad_image"
IMAGE_SIZE = "image_size"


class BenchmarkFormatError(ValueError):
  """The path is not a benchmark in the expected layout at all (as opposed to one bad item, which is skipped)."""


@dataclasses.dataclass
class BenchmarkItem:
  """One evaluation question.

  ``options`` are in release order and ``answer_index`` points at the correct one (None for open questions such as
  POPE's yes/no, whose ``answer`` is the expected text). ``image`` is encoded bytes, a file path or a PIL image.
  ``bboxes``: target boxes ``[x, y, w, h]`` in original-image pixels (V* only). ``messages``: a DeepEyes record's
  chat messages (with PIL images in place), used verbatim instead of the evaluation prompt.
  """

  item_id: str
  benchmark: str
  category: str
  question: str
  answer: str
  image: Any
  options: list[str] = dataclasses.field(default_factory=list)
  answer_index: int | None = None
  data_source: str = "vstar"  # the reward registry entry used to score a DeepEyes-format item
  bboxes: list[list[float]] = dataclasses.field(default_factory=list)
  target_objects: list[str] = dataclasses.field(default_factory=list)
  messages: list[dict] | None = None
  metadata: dict[str, Any] = dataclasses.field(default_factory=dict)

  def load_image(self) -> Image.Image:
    """The decoded RGB image (raises ``processing.image.ImageError`` for a corrupt one)."""
    return load_image(self.image)


@dataclasses.dataclass
class LoadReport:
  """What a loader read: ``items`` kept, ``skipped`` with ``by_reason`` counts and ``problems`` (path, message).

  ``by_category``: the skipped items per category, the one the item would have had (V*: its sub-directory; HR-Bench:
  its row's ``category`` column; POPE: its record's ``category``, else its file's name; DeepEyes: its
  ``data_source``). An item whose category cannot be read (a POPE line that is not JSON in a file whose name names no
  category, an HR-Bench row with the wrong number of fields) counts in ``skipped`` only."""

  benchmark: str
  source: str
  items: int = 0
  skipped: int = 0
  by_reason: collections.Counter = dataclasses.field(default_factory=collections.Counter)
  by_category: collections.Counter = dataclasses.field(default_factory=collections.Counter)
  problems: list[tuple[str, str]] = dataclasses.field(default_factory=list)

  def skip(self, path: str, reason: str, message: str, category: str | None = None) -> None:
    """Counts one skipped item (``category``: None when it cannot be read) and logs why."""
    self.skipped += 1
    self.by_reason[reason] += 1
    if category is not None:
      self.by_category[category] += 1
    self.problems.append((path, message))
    log.warning("%s: skipping %s: %s", self.benchmark, path, message)

  def summary(self) -> str:
    """'vstar (/data/vstar): 189 items, 2 skipped (missing_file 1, bad_image 1)'."""
    reasons = ", ".join(f"{k} {v}" for k, v in sorted(self.by_reason.items()))
    return f"{self.benchmark} ({self.source}): {self.items} items, {self.skipped} skipped" + (
      f" ({reasons})" if reasons else ""
    )


def _image_problem(src: bytes | str) -> tuple[str, str] | None:
  """None for an image the processor accepts (encoded bytes or a path; its header only), else (reason, message):
  ``missing_file``, ``bad_image`` (not an image) or ``image_size`` (``probe_image``: a decompression bomb, an empty
  image or an aspect ratio above 200)."""
  if isinstance(src, str) and not os.path.isfile(src):
    return MISSING_FILE, "image file not found"
  try:
    probe_image(src)
  except ImageSizeError as e:
    return IMAGE_SIZE, f"image size outside the processor's limits ({e})"
  except (ImageError, OSError) as e:
    return BAD_IMAGE, f"not a readable image ({e})"
  return None


def _str_list(value: Any) -> list[str] | None:
  if isinstance(value, list) and all(isinstance(v, str) for v in value):
    return value
  return None


# ----------------------------------------------------------------------------------------------------------------
# V* Bench


def load_vstar(root: str, categories: Sequence[str] | None = None) -> tuple[list[BenchmarkItem], LoadReport]:
  """V* Bench from its release directory (see the module docstring). ``categories``: default all subdirectories
  that hold images (the release has ``direct_attributes`` and ``relative_position``). Item ids are
  ``"{category}/{stem}"``."""
  if not os.path.isdir(root):
    raise BenchmarkFormatError(f"V* Bench: {root!r} is not a directory")
  if categories is None:
    categories = sorted(
      d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)) and _list_images(os.path.join(root, d))
    )
  if not categories:
    raise BenchmarkFormatError(f"V* Bench: no category directories with images under {root!r}")
  report = LoadReport("vstar", root)
  items = []
  for cat in categories:
    cdir = os.path.join(root, cat)
    if not os.path.isdir(cdir):
      raise BenchmarkFormatError(f"V* Bench: no category directory {cdir!r}")
    for image_path in _list_images(cdir):
      item = _vstar_item(cat, image_path, report)
      if item is not None:
        items.append(item)
  report.items = len(items)
  return items, report


def _list_images(d: str) -> list[str]:
  return sorted(os.path.join(d, n) for n in os.listdir(d) if n.lower().endswith(IMAGE_SUFFIXES))


def _vstar_item(category: str, image_path: str, report: LoadReport) -> BenchmarkItem | None:
  stem = os.path.splitext(image_path)[0]
  json_path = stem + ".json"
  if not os.path.exists(json_path):
    report.skip(json_path, MISSING_FILE, "no annotation file beside the image", category=category)
    return None
  try:
    with open(json_path, encoding="utf-8") as f:
      ann = json.load(f)
  except (ValueError, OSError) as e:
    report.skip(json_path, BAD_JSON, f"not valid JSON ({e})", category=category)
    return None
  if not isinstance(ann, dict):
    report.skip(json_path, BAD_JSON, f"expected a JSON object, got {type(ann).__name__}", category=category)
    return None
  question, options = ann.get("question"), _str_list(ann.get("options"))
  if not isinstance(question, str) or not question.strip():
    report.skip(json_path, BAD_FIELD, "'question' must be a non-empty string", category=category)
    return None
  if options is None or len(options) < 2:
    report.skip(json_path, BAD_FIELD, "'options' must be a list of at least 2 strings", category=category)
    return None
  boxes = ann.get("bbox") or []
  try:
    boxes = [[float(v) for v in b] for b in boxes]
    if any(len(b) != 4 for b in boxes):
      raise ValueError("a box needs 4 numbers [x, y, w, h]")
  except (TypeError, ValueError) as e:
    report.skip(json_path, BAD_FIELD, f"'bbox' must be a list of [x, y, w, h] boxes ({e})", category=category)
    return None
  targets = ann.get("target_object") or []
  targets = [targets] if isinstance(targets, str) else [str(t) for t in targets]
  try:
    with open(image_path, "rb") as f:
      data = f.read()
  except OSError as e:
    report.skip(image_path, BAD_IMAGE, f"not a readable file ({type(e).__name__}: {e})", category=category)
    return None
  problem = _image_problem(data)
  if problem is not None:
    report.skip(image_path, *problem, category=category)
    return None
  name = os.path.basename(stem)
  return BenchmarkItem(
    item_id=f"{category}/{name}",
    benchmark="vstar",
    category=category,
    question=question.strip(),
    answer=options[0],
    answer_index=0,  # the release lists the correct option first
    options=list(options),
    image=data,
    bboxes=boxes,
    target_objects=targets,
    metadata={"image_path": image_path},
  )


# ----------------------------------------------------------------------------------------------------------------
# HR-Bench


def load_hrbench(path: str, benchmark: str | None = None) -> tuple[list[BenchmarkItem], LoadReport]:
  """HR-Bench 4K or 8K from its TSV (see the module docstring). ``benchmark`` names it in the results (default:
  ``hrbench_8k`` when the file name contains ``8k``, else ``hrbench_4k``). Item ids are the ``index`` column;
  categories are the ``category`` column (``single`` / ``cross`` in the release)."""
  if not os.path.isfile(path):
    raise BenchmarkFormatError(f"HR-Bench: no such TSV file {path!r}")
  benchmark = benchmark or ("hrbench_8k" if "8k" in os.path.basename(path).lower() else "hrbench_4k")
  report = LoadReport(benchmark, path)
  items = []
  csv.field_size_limit(sys.maxsize)  # the image column holds whole base64-encoded 4K/8K images
  with open(path, encoding="utf-8", newline="") as f:
    reader = csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
    missing = [c for c in HRBENCH_COLUMNS if c not in (reader.fieldnames or [])]
    if missing:
      raise BenchmarkFormatError(
        f"HR-Bench: {path!r} lacks the column(s) {', '.join(missing)} (has {reader.fieldnames}); expected "
        f"{', '.join(HRBENCH_COLUMNS)}"
      )
    for line, row in enumerate(reader, start=2):
      where = f"{path}:{line}"
      if None in row or any(row.get(c) is None for c in HRBENCH_COLUMNS):  # a short or overlong row
        # its fields are out of place: its category column cannot be trusted, it counts in the overall skips only
        report.skip(where, BAD_FIELD, f"row has {len(row) - (None in row)} fields, expected {len(HRBENCH_COLUMNS)}")
        continue
      category = row["category"] or "all"
      options = [row[c] for c in "ABCD"]
      answer = row["answer"].strip()
      if answer not in "ABCD" or len(answer) != 1:
        report.skip(where, BAD_FIELD, f"answer {answer!r} is not one of A, B, C, D", category=category)
        continue
      try:
        data = base64.b64decode(row["image"], validate=True)
      except (binascii.Error, ValueError) as e:
        report.skip(where, BAD_IMAGE, f"image column is not base64 ({type(e).__name__}: {e})", category=category)
        continue
      problem = _image_problem(data)
      if problem is not None:
        report.skip(where, *problem, category=category)
        continue
      k = "ABCD".index(answer)
      items.append(
        BenchmarkItem(
          item_id=row["index"],
          benchmark=benchmark,
          category=category,
          question=row["question"].strip(),
          answer=options[k],
          answer_index=k,
          options=options,
          image=data,
          metadata={"cycle_category": row["cycle_category"], "line": line},
        )
      )
  report.items = len(items)
  return items, report


# ----------------------------------------------------------------------------------------------------------------
# POPE


def load_pope(path: str, image_dir: str) -> tuple[list[BenchmarkItem], LoadReport]:
  """POPE question files (one file or a directory of them) with their images in ``image_dir``. Item ids are
  ``"{category}/{question_id}"`` (the same question id appears once per category in the release)."""
  if os.path.isdir(path):
    files = sorted(glob.glob(os.path.join(path, "*.json")) + glob.glob(os.path.join(path, "*.jsonl")))
  elif os.path.isfile(path):
    files = [path]
  else:
    raise BenchmarkFormatError(f"POPE: no such file or directory {path!r}")
  if not files:
    raise BenchmarkFormatError(f"POPE: no *.json / *.jsonl question files in {path!r}")
  if not os.path.isdir(image_dir):
    raise BenchmarkFormatError(f"POPE: image directory {image_dir!r} does not exist")
  report = LoadReport("pope", path)
  items, checked = [], {}
  for file in files:
    named = next((c for c in POPE_CATEGORIES if c in os.path.basename(file).lower()), None)
    default_cat = named or "all"
    with open(file, encoding="utf-8") as f:
      for line_no, line in enumerate(f, start=1):
        if not line.strip():
          continue
        where = f"{file}:{line_no}"
        try:
          rec = json.loads(line)
          if not isinstance(rec, dict):
            raise ValueError(f"expected a JSON object, got {type(rec).__name__}")
        except ValueError as e:  # its own category is unreadable: the file's, when its name gives one
          report.skip(where, BAD_JSON, f"not a JSON object ({e})", category=named)
          continue
        cat = str(rec.get("category") or default_cat)
        label = str(rec.get("label", "")).strip().lower()
        if label not in ("yes", "no") or not isinstance(rec.get("text"), str) or not rec.get("image"):
          message = "needs 'text' (str), 'image' (file name) and 'label' ('yes' or 'no')"
          report.skip(where, BAD_FIELD, message, category=cat)
          continue
        image_path = os.path.join(image_dir, str(rec["image"]))
        if image_path not in checked:
          checked[image_path] = _image_problem(image_path)
        problem = checked[image_path]
        if problem is not None:
          report.skip(image_path, problem[0], f"{where}: {problem[1]}", category=cat)
          continue
        items.append(
          BenchmarkItem(
            item_id=f"{cat}/{rec.get('question_id', line_no)}",
            benchmark="pope",
            category=cat,
            question=rec["text"].strip(),
            answer=label,
            image=image_path,
            metadata={"image_path": image_path, "file": file},
          )
        )
  report.items = len(items)
  return items, report


# ----------------------------------------------------------------------------------------------------------------
# DeepEyes-format data


def load_deepeyes(paths: str | Sequence[str], benchmark: str = "deepeyes") -> tuple[list[BenchmarkItem], LoadReport]:
  """DeepEyes-format parquet / JSONL (comma-separated paths, globs or directories): each record's messages are
  kept byte for byte, its ``data_source`` picks the reward used for scoring, the category is the data source.
  Bad records (``decode_example``'s ``BadRecord``) are skipped and reported."""
  from deepeyes_jax.data.deepeyes import BadRecord, DeepEyesSource, decode_example

  if isinstance(paths, str):
    paths = [p for p in paths.split(",") if p]
  try:
    source = DeepEyesSource(paths)
  except FileNotFoundError as e:
    raise BenchmarkFormatError(f"DeepEyes data: {e}") from None
  report = LoadReport(benchmark, ",".join(map(str, paths)))
  items = []
  for i in range(len(source)):
    record = source[i]
    try:
      ex = decode_example(record, i, source_name=record.get("_file", "?"))
    except BadRecord as e:
      source_name = record.get("data_source") if isinstance(record, dict) else None  # the item's category
      category = source_name if isinstance(source_name, str) and source_name else None
      report.skip(f"{e.source} (index {e.index})", e.reason, str(e), category=category)
      continue
    extra_info = ex.extra.get("extra_info", {})
    boxes = extra_info.get("bbox") or extra_info.get("gt_bbox") or []
    items.append(
      BenchmarkItem(
        item_id=ex.uid,
        benchmark=benchmark,
        category=ex.data_source,
        question=ex.question,
        answer=ex.ground_truth,
        image=ex.images[0] if ex.images else None,
        data_source=ex.data_source,
        bboxes=[[float(v) for v in b] for b in boxes] if boxes and isinstance(boxes[0], list | tuple) else [],
        messages=ex.messages,
        metadata={"index": ex.index, "env_name": ex.env_name},
      )
    )
  report.items = len(items)
  return items, report


# ----------------------------------------------------------------------------------------------------------------
# One entry point


BENCHMARKS = ("vstar", "hrbench_4k", "hrbench_8k", "pope", "deepeyes")


def load_benchmark(name: str, path: str, *, image_dir: str = "") -> tuple[list[BenchmarkItem], LoadReport]:
  """``name`` in :data:`BENCHMARKS`; ``path`` the release directory / TSV / question file(s) / DeepEyes files;
  ``image_dir`` POPE's image directory."""
  if name == "vstar":
    return load_vstar(path)
  if name in ("hrbench_4k", "hrbench_8k"):
    return load_hrbench(path, benchmark=name)
  if name == "pope":
    return load_pope(path, image_dir)
  if name == "deepeyes":
    return load_deepeyes(path)
  raise ValueError(f"unknown benchmark {name!r}; expected one of {', '.join(BENCHMARKS)}")
