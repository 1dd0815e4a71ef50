"""tensorflow-datasets builders for the benchmarks and DeepEyes-47k, written as ArrayRecord for grain.

Needs the ``[tfds]`` extra (``pip install -e '.[tfds]'``: tensorflow-datasets; TensorFlow itself is already a core
dependency through clu's TensorBoard writer). Nothing is downloaded: each builder reads the files a person
downloaded into ``manual_dir`` with the loaders of ``deepeyes_jax.data.benchmarks`` (same validation, same skip
report), and writes one split as ArrayRecord::

    from deepeyes_jax.data import tfds_builders as tb
    tb.build("vstar_bench", data_dir="/data/tfds", manual_dir="/downloads/vstar_bench")   # once
    source = tfds.data_source("vstar_bench", data_dir="/data/tfds")["test"]               # random access
    items = grain.MapDataset.source(source).map(tb.item_from_tfds)                         # -> BenchmarkItem

``manual_dir`` layouts: ``vstar_bench``: the V* release directory (``direct_attributes/``, ``relative_position/``);
``hr_bench/4k`` and ``hr_bench/8k``: the directory holding ``hr_bench_4k.tsv`` / ``hr_bench_8k.tsv`` (any ``*4k*.tsv``
/ ``*8k*.tsv``); ``pope``: the question files (``*.json`` / ``*.jsonl``) plus the images in ``images/`` (or
``val2014/``); ``deepeyes47k``: the ``*.parquet`` files of DeepEyes-Datasets-47k (split ``train``).

Images are stored as the ENCODED file bytes (a scalar string feature), not ``tfds.features.Image``: decoding
stays lazy and lossless, and goes through the same ``load_image`` size guard as every other path (an 8K image
decoded by the reader would be ~100 MB per record).
"""

from __future__ import annotations

import glob
import io
import json
import os

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from deepeyes_jax.data import benchmarks as bm

_CITE = "Loaded from files in manual_dir; see deepeyes_jax/data/tfds_builders.py for the layout."


def _bytes_feature():
  return tfds.features.Tensor(shape=(), dtype=np.object_)


def _benchmark_features() -> tfds.features.FeaturesDict:
  return tfds.features.FeaturesDict(
    {
      "item_id": tfds.features.Text(),
      "category": tfds.features.Text(),
      "question": tfds.features.Text(),
      "answer": tfds.features.Text(),
      "answer_index": np.int32,  # -1: open question (no options)
      "options": tfds.features.Sequence(tfds.features.Text()),
      "image": _bytes_feature(),  # the encoded image file
      "bboxes": tfds.features.Tensor(shape=(None, 4), dtype=np.float32),  # [x, y, w, h], original pixels
      "target_objects": tfds.features.Sequence(tfds.features.Text()),
      "metadata": tfds.features.Text(),  # JSON
    }
  )


def _encoded(image) -> bytes:
  if isinstance(image, bytes | bytearray):
    return bytes(image)
  if isinstance(image, Image.Image):
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()
  with open(image, "rb") as f:
    return f.read()


def _benchmark_examples(items: list[bm.BenchmarkItem], report: bm.LoadReport):
  print(report.summary(), flush=True)
  for item in items:
    yield (
      item.item_id,
      {
        "item_id": item.item_id,
        "category": item.category,
        "question": item.question,
        "answer": item.answer,
        "answer_index": -1 if item.answer_index is None else item.answer_index,
        "options": item.options,
        "image": _encoded(item.image),
        "bboxes": np.asarray(item.bboxes, np.float32).reshape(-1, 4),
        "target_objects": item.target_objects,
        "metadata": json.dumps(item.metadata, default=str),
      },
    )


def _text(x) -> str:
  return x.decode("utf-8") if isinstance(x, bytes) else str(x)


def item_from_tfds(record: dict, benchmark: str = "") -> bm.BenchmarkItem:
  """A record read back through ``tfds.data_source`` (bytes strings, numpy arrays) -> a ``BenchmarkItem``."""
  k = int(record["answer_index"])
  return bm.BenchmarkItem(
    item_id=_text(record["item_id"]),
    benchmark=benchmark,
    category=_text(record["category"]),
    question=_text(record["question"]),
    answer=_text(record["answer"]),
    answer_index=None if k < 0 else k,
    options=[_text(o) for o in record["options"]],
    image=bytes(record["image"]),
    bboxes=np.asarray(record["bboxes"], np.float32).reshape(-1, 4).tolist(),
    target_objects=[_text(t) for t in record["target_objects"]],
    metadata=json.loads(_text(record["metadata"])),
  )


class _BenchmarkBuilder(tfds.core.GeneratorBasedBuilder):
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "First version."}

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(builder=self, features=_benchmark_features(), citation=_CITE)

  def _split_generators(self, dl_manager):
    return {"test": _benchmark_examples(*self._load(os.fspath(dl_manager.manual_dir)))}

  def _generate_examples(self):  # the split generators above are complete; tfds requires the method
    raise NotImplementedError


class VstarBench(_BenchmarkBuilder):
  """V* Bench (191 questions): manual_dir is the release directory."""

  MANUAL_DOWNLOAD_INSTRUCTIONS = "Put the V* Bench release (direct_attributes/, relative_position/) in manual_dir."

  def _load(self, manual_dir):
    return bm.load_vstar(manual_dir)


class HrBench(_BenchmarkBuilder):
  """HR-Bench 4K / 8K: manual_dir holds the released TSV files."""

  BUILDER_CONFIGS = [tfds.core.BuilderConfig(name="4k"), tfds.core.BuilderConfig(name="8k")]
  MANUAL_DOWNLOAD_INSTRUCTIONS = "Put hr_bench_4k.tsv and/or hr_bench_8k.tsv in manual_dir."

  def _load(self, manual_dir):
    name = self.builder_config.name
    files = sorted(glob.glob(os.path.join(manual_dir, f"*{name}*.tsv")))
    if not files:
      raise bm.BenchmarkFormatError(f"HR-Bench {name}: no *{name}*.tsv in {manual_dir!r}")
    return bm.load_hrbench(files[0], benchmark=f"hrbench_{name}")


class Pope(_BenchmarkBuilder):
  """POPE: manual_dir holds the question files and images/ (or val2014/)."""

  MANUAL_DOWNLOAD_INSTRUCTIONS = "Put the POPE question files (*.json) and the COCO images (images/) in manual_dir."

  def _load(self, manual_dir):
    image_dir = next(
      (os.path.join(manual_dir, d) for d in ("images", "val2014") if os.path.isdir(os.path.join(manual_dir, d))),
      os.path.join(manual_dir, "images"),
    )
    return bm.load_pope(manual_dir, image_dir)


class Deepeyes47k(tfds.core.GeneratorBasedBuilder):
  """DeepEyes-Datasets-47k (split ``train``): manual_dir holds the released parquet files."""

  name = "deepeyes47k"
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "First version."}
  MANUAL_DOWNLOAD_INSTRUCTIONS = "Put the DeepEyes-Datasets-47k *.parquet files in manual_dir."

  def _info(self) -> tfds.core.DatasetInfo:
    features = tfds.features.FeaturesDict(
      {
        "data_source": tfds.features.Text(),
        "prompt": tfds.features.Text(),  # JSON list of {role, content}, "<image>" placeholders kept
        "images": tfds.features.Sequence(_bytes_feature()),  # encoded image files
        "ground_truth": tfds.features.Text(),
        "reward_style": tfds.features.Text(),
        "extra_info": tfds.features.Text(),  # JSON
        "ability": tfds.features.Text(),
        "env_name": tfds.features.Text(),
      }
    )
    return tfds.core.DatasetInfo(builder=self, features=features, citation=_CITE)

  def _split_generators(self, dl_manager):
    return {"train": self._records(os.fspath(dl_manager.manual_dir))}

  def _generate_examples(self):
    raise NotImplementedError

  def _records(self, manual_dir):
    from deepeyes_jax.data.deepeyes import BadRecord, DeepEyesSource, decode_example

    source = DeepEyesSource(manual_dir)
    report = bm.LoadReport("deepeyes47k", manual_dir)
    for i in range(len(source)):
      record = source[i]
      try:
        ex = decode_example(record, i, source_name=record.get("_file", "?"))  # validation only: skip bad rows
      except BadRecord as e:
        report.skip(f"{e.source} (index {e.index})", e.reason, str(e))
        continue
      report.items += 1
      images = [_encoded(im.get("bytes") or im.get("path")) for im in record["images"]]
      yield (
        ex.uid,
        {
          "data_source": ex.data_source,
          "prompt": json.dumps([{"role": m["role"], "content": m["content"]} for m in record["prompt"]]),
          "images": images,
          "ground_truth": ex.ground_truth,
          "reward_style": str(ex.extra["reward_model"].get("style") or ""),
          "extra_info": json.dumps(ex.extra["extra_info"], default=str),
          "ability": ex.ability,
          "env_name": ex.env_name,
        },
      )
    print(report.summary(), flush=True)


def record_from_tfds(record: dict) -> dict:
  """A ``deepeyes47k`` record read back through ``tfds.data_source`` -> a DeepEyes record for ``decode_example``."""
  return {
    "data_source": _text(record["data_source"]),
    "prompt": json.loads(_text(record["prompt"])),
    "images": [{"bytes": bytes(b), "path": None} for b in record["images"]],
    "reward_model": {"ground_truth": _text(record["ground_truth"]), "style": _text(record["reward_style"])},
    "extra_info": json.loads(_text(record["extra_info"])),
    "ability": _text(record["ability"]),
    "env_name": _text(record["env_name"]),
  }


BUILDERS = {"vstar_bench": VstarBench, "hr_bench": HrBench, "pope": Pope, "deepeyes47k": Deepeyes47k}


def build(name: str, *, data_dir: str, manual_dir: str) -> tfds.core.DatasetBuilder:
  """Prepares ``name`` (``vstar_bench``, ``hr_bench/4k``, ``hr_bench/8k``, ``pope``, ``deepeyes47k``) from
  ``manual_dir`` into ``data_dir`` as ArrayRecord; returns the builder (a no-op when already prepared)."""
  base, _, config = name.partition("/")
  if base not in BUILDERS:
    raise ValueError(
      f"unknown dataset {name!r}; expected one of vstar_bench, hr_bench/4k, hr_bench/8k, pope, deepeyes47k"
    )
  kwargs = {"config": config} if config else {}
  builder = BUILDERS[base](data_dir=data_dir, file_format="array_record", **kwargs)
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
  return builder
