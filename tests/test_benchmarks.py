"""Benchmark loaders on generated files in the exact public layouts; corrupt files are reported and skipped; the
tensorflow-datasets builders write ArrayRecord that tfds.data_source / grain read back."""

import base64
import json
import os

import numpy as np
import pytest
from benchmark_fixtures import VSTAR_ITEMS, hrbench_rows, image, write_pope, write_tsv, write_vstar
from hostile_images import bomb_png, png_bytes, thin_image

from deepeyes_jax.agent import prompts
from deepeyes_jax.data import benchmarks as bm
from deepeyes_jax.data.deepeyes import write_deepeyes_parquet


def test_vstar_reads_release_layout(tmp_path):
  write_vstar(str(tmp_path))
  items, report = bm.load_vstar(str(tmp_path))
  assert report.items == 3 and report.skipped == 0
  assert [it.item_id for it in items] == ["direct_attributes/sa_1", "direct_attributes/sa_2", "relative_position/sa_3"]
  first = items[0]
  assert first.question == "What is the color of the cup?" and first.category == "direct_attributes"
  assert first.options == ["red", "blue", "green", "white"] and first.answer_index == 0 and first.answer == "red"
  assert first.bboxes == [[20.0, 30.0, 60.0, 50.0]] and first.target_objects == ["cup"]
  assert items[2].bboxes == [[10, 10, 40, 40], [150, 90, 50, 50]] and items[2].target_objects == ["dog", "cat"]
  assert first.load_image().size == (224, 168)


def test_vstar_skips_corrupt_and_missing_files_by_path(tmp_path):
  root = write_vstar(str(tmp_path))
  da = os.path.join(root, "direct_attributes")
  os.remove(os.path.join(da, "sa_1.json"))  # image without annotation
  with open(os.path.join(da, "sa_2.jpg"), "wb") as f:  # not an image
    f.write(b"this is not a jpeg")
  with open(os.path.join(root, "relative_position", "sa_3.json"), "w") as f:
    f.write('{"question": "cut sh')
  items, report = bm.load_vstar(root)
  assert items == [] and report.skipped == 3
  assert dict(report.by_reason) == {bm.MISSING_FILE: 1, bm.BAD_IMAGE: 1, bm.BAD_JSON: 1}
  paths = sorted(p for p, _ in report.problems)
  assert paths == sorted([os.path.join(da, "sa_1.json"), os.path.join(da, "sa_2.jpg"),
                          os.path.join(root, "relative_position", "sa_3.json")])  # fmt: skip
  assert "3 skipped" in report.summary() and "bad_image 1" in report.summary()
  with pytest.raises(bm.BenchmarkFormatError, match="not a directory"):
    bm.load_vstar(os.path.join(root, "nope"))


def test_vstar_rejects_bad_fields(tmp_path):
  bad = [("direct_attributes", "x", "Q?", ["only one"], [], []), ("direct_attributes", "y", "Q?", ["a", "b"],
         [[1, 2, 3]], [])]  # fmt: skip
  write_vstar(str(tmp_path), bad + VSTAR_ITEMS[:1])
  items, report = bm.load_vstar(str(tmp_path))
  assert [it.item_id for it in items] == ["direct_attributes/sa_1"]
  assert report.by_reason[bm.BAD_FIELD] == 2


def test_hrbench_reads_tsv(tmp_path):
  path = write_tsv(str(tmp_path / "hr_bench_8k.tsv"), hrbench_rows(4))
  items, report = bm.load_hrbench(path)
  assert report.benchmark == "hrbench_8k" and report.items == 4
  assert [it.answer_index for it in items] == [0, 1, 2, 3]
  assert [it.answer for it in items] == ["stop", "slow", "exit", "yield"]
  assert [it.category for it in items] == ["single", "cross", "single", "cross"]
  assert items[1].options == ["stop", "slow", "exit", "yield"] and items[1].item_id == "1"
  assert items[3].load_image().size == (256, 192)


def test_hrbench_skips_bad_rows_and_rejects_wrong_columns(tmp_path):
  rows = hrbench_rows(3)
  rows[0][-1] = "!!!not base64!!!"
  rows[1][-1] = base64.b64encode(b"plain text, not an image").decode()
  rows[2][2] = "E"
  rows.append(rows[0][:5])  # a short row
  good = hrbench_rows(1)[0]
  items, report = bm.load_hrbench(write_tsv(str(tmp_path / "hr_bench_4k.tsv"), rows + [good]))
  assert len(items) == 1 and report.benchmark == "hrbench_4k"
  assert report.by_reason == {bm.BAD_IMAGE: 2, bm.BAD_FIELD: 2}
  assert any(p.endswith("hr_bench_4k.tsv:2") for p, _ in report.problems)  # file:line of the first data row
  broken = write_tsv(str(tmp_path / "other.tsv"), [], header=["index", "question", "image"])
  with pytest.raises(bm.BenchmarkFormatError, match="lacks the column"):
    bm.load_hrbench(broken)


def test_pope_reads_and_reports_missing_images(tmp_path):
  path, img_dir = write_pope(str(tmp_path), n=4)
  os.remove(os.path.join(img_dir, "COCO_val2014_000000000003.jpg"))
  with open(path, "a") as f:
    f.write('{"question_id": 9, "image": "x.jpg", "text": "Is there a cat?", "label": "maybe"}\n')
    f.write("not json\n")
  items, report = bm.load_pope(path, img_dir)
  assert [it.item_id for it in items] == ["adversarial/1", "adversarial/2", "adversarial/3"]
  assert [it.answer for it in items] == ["yes", "no", "yes"] and items[0].options == []
  assert items[0].category == "adversarial" and items[0].question == "Is there a dog0 in the image?"
  assert report.by_reason == {bm.MISSING_FILE: 1, bm.BAD_FIELD: 1, bm.BAD_JSON: 1}
  assert (os.path.join(img_dir, "COCO_val2014_000000000003.jpg")) in [p for p, _ in report.problems]


def _deepeyes_records(n=3):
  out = []
  for i in range(n):
    q = f"What is the color of object {i}?"
    out.append({
      "data_source": "vstar",
      "prompt": [{"role": "system", "content": prompts.SYSTEM_PROMPT},
                 {"role": "user", "content": "<image>\n" + q + prompts.USER_SUFFIX}],
      "images": [image(300 + i)],
      "reward_model": {"ground_truth": "red", "style": "model"},
      "extra_info": {"question": q, "answer": "red", "index": i},
      "ability": "perception",
      "env_name": "visual_toolbox_v2",
    })  # fmt: skip
  return out


def test_deepeyes_format_reuses_decode_example_and_skips_bad_records(tmp_path):
  recs = _deepeyes_records(3)
  recs[1]["images"] = [b"corrupt bytes"]
  path = write_deepeyes_parquet(tmp_path / "d.parquet", recs)
  items, report = bm.load_benchmark("deepeyes", str(path))
  assert [it.item_id for it in items] == ["vstar-0", "vstar-2"]
  assert report.by_reason == {"bad_image": 1}
  assert items[0].messages[1]["content"][0]["type"] == "image" and items[0].answer == "red"
  assert items[0].messages[1]["content"][1]["text"] == "\nWhat is the color of object 0?" + prompts.USER_SUFFIX


# ----------------------------------------------------------------------------------------------------------------
# tensorflow-datasets builders


def test_tfds_builders_write_array_record_read_by_grain(tmp_path):
  tfds = pytest.importorskip("tensorflow_datasets")
  import grain

  from deepeyes_jax.data import tfds_builders as tb

  vstar = write_vstar(str(tmp_path / "manual_vstar"))
  os.remove(os.path.join(vstar, "direct_attributes", "sa_2.json"))  # one bad item: skipped, not fatal
  data_dir = str(tmp_path / "tfds")
  tb.build("vstar_bench", data_dir=data_dir, manual_dir=vstar)
  assert any(f.endswith(".array_record-00000-of-00001") for f in os.listdir(os.path.join(data_dir, "vstar_bench",
                                                                                       "1.0.0")))  # fmt: skip
  source = tfds.data_source("vstar_bench", data_dir=data_dir)["test"]
  assert len(source) == 2
  items = sorted(grain.MapDataset.source(source).map(tb.item_from_tfds), key=lambda it: it.item_id)
  direct, _ = bm.load_vstar(vstar)
  assert [it.item_id for it in items] == ["direct_attributes/sa_1", "relative_position/sa_3"]
  assert items[0].image == direct[0].image  # the encoded file, byte for byte
  assert items[1].bboxes == [[10, 10, 40, 40], [150, 90, 50, 50]] and items[1].options == VSTAR_ITEMS[2][3]

  hr_manual = tmp_path / "manual_hr"
  hr_manual.mkdir()
  write_tsv(str(hr_manual / "hr_bench_4k.tsv"), hrbench_rows(2))
  tb.build("hr_bench/4k", data_dir=data_dir, manual_dir=str(hr_manual))
  hr = [tb.item_from_tfds(r) for r in tfds.data_source("hr_bench/4k", data_dir=data_dir)["test"]]
  assert sorted((it.item_id, it.answer_index, it.category) for it in hr) == [("0", 0, "single"), ("1", 1, "cross")]

  pope_manual = tmp_path / "manual_pope"
  write_pope(str(pope_manual), n=2)
  tb.build("pope", data_dir=data_dir, manual_dir=str(pope_manual))
  pope = [tb.item_from_tfds(r) for r in tfds.data_source("pope", data_dir=data_dir)["test"]]
  assert sorted((it.item_id, it.answer, it.answer_index) for it in pope) == [
    ("adversarial/1", "yes", None),
    ("adversarial/2", "no", None),
  ]

  from deepeyes_jax.data.deepeyes import decode_example

  de_manual = tmp_path / "manual_47k"
  de_manual.mkdir()
  write_deepeyes_parquet(de_manual / "part0.parquet", _deepeyes_records(2))
  tb.build("deepeyes47k", data_dir=data_dir, manual_dir=str(de_manual))
  rows = list(tfds.data_source("deepeyes47k", data_dir=data_dir)["train"])
  examples = sorted((decode_example(tb.record_from_tfds(r), i, source_name="tfds") for i, r in enumerate(rows)),
                    key=lambda e: e.uid)  # fmt: skip
  assert [e.uid for e in examples] == ["vstar-0", "vstar-1"]
  assert examples[0].messages[0]["content"] == prompts.SYSTEM_PROMPT and examples[0].env_name == "visual_toolbox_v2"
  np.testing.assert_array_equal(np.asarray(examples[1].images[0]), np.asarray(image(301)))  # PNG: lossless
  assert json.loads(json.dumps(examples[0].extra["extra_info"]))["answer"] == "red"


# Hostile images: a header claiming ~268M pixels (PIL's DecompressionBombError) and a real image of aspect ratio 201
# (smart_resize raises mid-rollout) are skipped items counted as image_size, never a stopped load.


def test_vstar_skips_decompression_bombs_and_thin_images(tmp_path):
  root = write_vstar(str(tmp_path))
  da = os.path.join(root, "direct_attributes")
  with open(os.path.join(da, "sa_1.jpg"), "wb") as f:  # the loader reads NAME.jpg whatever its content
    f.write(bomb_png())
  with open(os.path.join(root, "relative_position", "sa_3.jpg"), "wb") as f:
    f.write(png_bytes(thin_image()))
  items, report = bm.load_vstar(root)
  assert [it.item_id for it in items] == ["direct_attributes/sa_2"]
  assert report.by_reason == {bm.IMAGE_SIZE: 2} and "image_size 2" in report.summary()
  assert sorted(p for p, _ in report.problems) == [os.path.join(da, "sa_1.jpg"),
                                                   os.path.join(root, "relative_position", "sa_3.jpg")]  # fmt: skip
  assert any("aspect ratio 201.0 exceeds 200" in m for _, m in report.problems)


def test_hrbench_skips_decompression_bombs_and_thin_images(tmp_path):
  rows = hrbench_rows(3)
  rows[0][-1] = base64.b64encode(bomb_png()).decode()
  rows[2][-1] = base64.b64encode(png_bytes(thin_image(2, 500))).decode()
  items, report = bm.load_hrbench(write_tsv(str(tmp_path / "hr_bench_4k.tsv"), rows))
  assert [it.item_id for it in items] == ["1"]
  assert report.by_reason == {bm.IMAGE_SIZE: 2}
  assert [p.rsplit(":", 1)[1] for p, _ in report.problems] == ["2", "4"]  # file:line of each bad row


def test_pope_skips_decompression_bombs_and_thin_images(tmp_path):
  path, img_dir = write_pope(str(tmp_path), n=4)
  with open(os.path.join(img_dir, "COCO_val2014_000000000000.jpg"), "wb") as f:
    f.write(bomb_png())
  with open(os.path.join(img_dir, "COCO_val2014_000000000002.jpg"), "wb") as f:
    f.write(png_bytes(thin_image()))
  items, report = bm.load_pope(path, img_dir)
  assert [it.item_id for it in items] == ["adversarial/2", "adversarial/4"]
  assert report.by_reason == {bm.IMAGE_SIZE: 2}


def test_deepeyes_format_skips_hostile_images(tmp_path):
  recs = _deepeyes_records(3)
  recs[0]["images"] = [bomb_png()]
  recs[2]["images"] = [thin_image()]
  items, report = bm.load_benchmark("deepeyes", str(write_deepeyes_parquet(tmp_path / "d.parquet", recs)))
  assert [it.item_id for it in items] == ["vstar-1"] and report.by_reason == {"image_size": 2}
