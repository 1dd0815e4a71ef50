"""DeepEyes data: record decoding, lazy parquet/JSONL sources, and the grain pipeline (sharding, skipping, resume)."""

import base64
import json
import logging
import os
import pickle

import numpy as np
import pytest
from hostile_images import bomb_png, png_bytes, thin_image
from PIL import Image

from deepeyes_jax.data import deepeyes as de
from deepeyes_jax.data import pipeline as pl

SUFFIX = (
  "\nThink first, call **image_zoom_in_tool** if needed, then answer. Format strictly as:  <think>...</think>  "
  "<tool_call>...</tool_call> (if tools needed)  <answer>...</answer> "
)


def _image(rng, h=None, w=None) -> Image.Image:
  h = h or int(rng.integers(6, 30))
  w = w or int(rng.integers(6, 30))
  return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def _record(i, rng, *, source="vstar", env="visual_toolbox_v2", n_images=1):
  return {
    "data_source": source,
    "prompt": [
      {"role": "system", "content": "You are a helpful assistant."},
      {"role": "user", "content": "<image>" * n_images + f"\nQuestion {i}?" + SUFFIX},
    ],
    "images": [_image(rng) for _ in range(n_images)],
    "reward_model": {"ground_truth": f"answer {i}", "style": "model"},
    "extra_info": {"question": f"Question {i}?", "answer": f"answer {i}", "index": i},
    "ability": "vqa",
    "env_name": env,
  }


def _pixels(img):
  return np.asarray(img.convert("RGB"))


@pytest.fixture
def data(tmp_path):
  """A parquet file (30 rows, row groups of 4) and a JSONL file (8 lines), with known bad rows.

  Returns (paths, good uids in source order, {global index: reason} of the bad rows)."""
  rng = np.random.default_rng(0)
  recs = [_record(i, rng, source="vstar" if i % 2 else "chart") for i in range(30)]
  recs[5]["images"] = [b"\x89PNG\r\n\x1a\n this is not a png"]  # corrupt image bytes
  del recs[11]["reward_model"]  # missing field
  recs[17]["prompt"][1]["content"] = "<image><image>\nTwo?"  # two placeholders, one image
  pq_path = de.write_deepeyes_parquet(tmp_path / "part-0.parquet", recs, row_group_size=4)

  jrecs = [_record(100 + i, rng, source="thinklite_eureka", env="") for i in range(8)]
  jrecs[3]["images"] = ["data:image/png;base64,!!notbase64!!"]
  jl_path = de.write_deepeyes_jsonl(tmp_path / "part-1.jsonl", jrecs)
  with open(jl_path, "a") as f:
    f.write("\n")  # a blank line is not a record
    f.write('{"data_source": "chart", "prompt": [\n')  # a truncated line: the 9th JSONL record (global 38)

  bad = {5: de.BAD_IMAGE, 11: de.MISSING_FIELD, 17: de.IMAGE_COUNT, 33: de.BAD_IMAGE, 38: de.UNREADABLE}
  good = [f"{'vstar' if i % 2 else 'chart'}-{i}" for i in range(30) if i not in bad]
  good += [f"thinklite_eureka-{100 + i}" for i in range(8) if 30 + i not in bad]
  return [str(pq_path), str(jl_path)], good, bad


def _texts(messages):
  """Each message's content with image items as None (for comparing messages without comparing PIL objects)."""
  return [m["content"] if isinstance(m["content"], str) else [i.get("text") for i in m["content"]] for m in messages]


def _uids(batches):
  return [[ex.uid for ex in b] for b in batches]


def _take(it, n):
  return _uids(next(it) for _ in range(n))


# ----------------------------------------------------------------------------------------------------------------------
# decode_example


def test_decode_example_splits_messages_at_placeholders_byte_exact(tmp_path):
  rng = np.random.default_rng(1)
  imgs = [_image(rng), _image(rng), Image.fromarray(rng.integers(0, 256, (9, 7, 4), dtype=np.uint8), "RGBA")]
  content = "Look:<image>\nthen <image><image>\r\n\n  Ünïcode?\t" + SUFFIX
  rec = {
    "data_source": "vstar",
    "prompt": [{"role": "system", "content": "sys <b>\n"}, {"role": "user", "content": content}],
    "images": imgs,
    "reward_model": {"ground_truth": "B", "style": "model"},
    "extra_info": {"question": "Q?", "answer": "B", "index": 42, "split": "train"},
    "ability": "vqa",
    "env_name": "visual_toolbox_v2",
  }
  # Through a parquet file and the source, so the text survives writing/reading byte for byte.
  path = de.write_deepeyes_parquet(tmp_path / "one.parquet", [rec])
  src = de.DeepEyesSource(path)
  raw = src[0]
  assert isinstance(raw["images"][0]["bytes"], bytes) and raw[de.INDEX_KEY] == 0 and raw[de.FILE_KEY] == path
  ex = de.decode_example(raw, 0, source_name=path)

  assert ex.index == 0 and ex.uid == "vstar-42" and ex.data_source == "vstar"
  assert (ex.question, ex.ground_truth, ex.ability, ex.env_name) == ("Q?", "B", "vqa", "visual_toolbox_v2")
  assert ex.multi_turn
  assert ex.extra["reward_model"]["style"] == "model" and ex.extra["extra_info"]["split"] == "train"
  assert ex.messages[0] == {"role": "system", "content": "sys <b>\n"}
  user = ex.messages[1]
  assert user["role"] == "user"
  kinds = [item["type"] for item in user["content"]]
  assert kinds == ["text", "image", "text", "image", "image", "text"]
  texts = [item["text"] for item in user["content"] if item["type"] == "text"]
  assert texts == ["Look:", "\nthen ", "\r\n\n  Ünïcode?\t" + SUFFIX]
  assert "".join(item.get("text", "<image>") for item in user["content"]) == content
  in_messages = [item["image"] for item in user["content"] if item["type"] == "image"]
  assert len(in_messages) == len(ex.images) and all(a is b for a, b in zip(in_messages, ex.images))
  assert len(ex.images) == 3 and all(im.mode == "RGB" for im in ex.images)
  for got, want in zip(ex.images[:2], imgs[:2]):
    np.testing.assert_array_equal(_pixels(got), _pixels(want))
  # RGBA is composited onto white (load_image), same size.
  assert ex.images[2].size == (7, 9)

  # Example -> record -> parquet -> Example is the identity on the messages' text and pixels.
  path2 = de.write_deepeyes_parquet(tmp_path / "two.parquet", [ex])
  ex2 = de.decode_example(de.DeepEyesSource(path2)[0], 0, source_name=path2)
  assert ex2.uid == ex.uid and ex2.question == ex.question and ex2.ground_truth == ex.ground_truth
  assert _texts(ex2.messages) == _texts(ex.messages)
  for a, b in zip(ex2.images, ex.images):
    np.testing.assert_array_equal(_pixels(a), _pixels(b))


def test_decode_example_single_turn_and_uid_fallback():
  rng = np.random.default_rng(2)
  rec = _record(7, rng, source="thinklite_eureka", env="")
  rec["extra_info"] = {"answer": "x"}  # no index, no question
  rec["reward_model"]["ground_truth"] = 3  # numbers are accepted as text
  ex = de.decode_example(rec, 1234, source_name="mem")
  assert not ex.multi_turn and ex.env_name == ""
  assert ex.uid == "thinklite_eureka-1234"
  assert ex.ground_truth == "3"
  assert ex.question == "Question 7?" + SUFFIX.rstrip()  # the user text without placeholders, stripped
  assert ex.messages[1]["content"][0]["type"] == "image" and ex.messages[1]["content"][1]["text"].startswith("\n")


def _bad_corrupt(r):
  r["images"] = [b"not an image"]


def _bad_b64(r):
  r["images"] = [{"bytes": "%%%not-base64%%%"}]


def _bad_count(r):
  r["images"] = r["images"] * 2


def _bad_role(r):
  r["prompt"][0]["role"] = "tool"


def _bad_content(r):
  r["prompt"][1]["content"] = ["<image>"]


def _bad_images_type(r):
  r["images"] = "img.png"


def _missing_rm(r):
  del r["reward_model"]


def _missing_gt(r):
  r["reward_model"] = {"style": "model"}


def _missing_prompt(r):
  del r["prompt"]


def _missing_image_data(r):
  r["images"] = [{"bytes": None, "path": None}]


def _unreadable(r):
  r[de.ERROR_KEY] = "invalid JSON line"


def _no_image(r):
  r["images"] = []
  r["prompt"][1]["content"] = r["prompt"][1]["content"].replace("<image>", "")


def _thin_image(r):
  r["images"] = [thin_image()]  # aspect ratio 201: smart_resize would raise mid-rollout


def _bomb_image(r):
  r["images"] = [bomb_png()]  # a header claiming 16384 x 16384 pixels


@pytest.mark.parametrize(
  "mutate,reason",
  [
    (_bad_corrupt, de.BAD_IMAGE),
    (_bad_b64, de.BAD_IMAGE),
    (_bad_count, de.IMAGE_COUNT),
    (_bad_role, de.WRONG_TYPE),
    (_bad_content, de.WRONG_TYPE),
    (_bad_images_type, de.WRONG_TYPE),
    (_missing_rm, de.MISSING_FIELD),
    (_missing_gt, de.MISSING_FIELD),
    (_missing_prompt, de.MISSING_FIELD),
    (_missing_image_data, de.MISSING_FIELD),
    (_unreadable, de.UNREADABLE),
    (_no_image, de.NO_IMAGE),
    (_thin_image, de.IMAGE_SIZE),
    (_bomb_image, de.IMAGE_SIZE),
  ],
)
def test_decode_example_bad_records_raise_named(mutate, reason):
  rec = _record(3, np.random.default_rng(3))
  de.decode_example(dict(rec), 77, source_name="shard-9.parquet")  # the unmodified record is fine
  mutate(rec)
  with pytest.raises(de.BadRecord) as info:
    de.decode_example(rec, 77, source_name="shard-9.parquet")
  assert info.value.reason == reason and info.value.index == 77
  assert "shard-9.parquet" in str(info.value) and "77" in str(info.value)
  assert isinstance(info.value, ValueError)
  assert pickle.loads(pickle.dumps(info.value)).reason == reason


def test_decode_example_respects_max_decoded_pixels():
  rec = _record(0, np.random.default_rng(4))
  rec["images"] = [Image.new("RGB", (50, 40))]
  assert de.decode_example(rec, 0, source_name="m", max_decoded_pixels=2000).images[0].size == (50, 40)
  with pytest.raises(de.BadRecord, match="max_decoded_pixels") as info:
    de.decode_example(rec, 0, source_name="m", max_decoded_pixels=1999)
  assert info.value.reason == de.IMAGE_SIZE  # the processor's size limits, not a corrupt file


# ----------------------------------------------------------------------------------------------------------------------
# Sources


def test_parquet_source_reads_row_groups_lazily_with_lru_cache(tmp_path, monkeypatch):
  import pyarrow.parquet as pq

  rng = np.random.default_rng(5)
  path = de.write_deepeyes_parquet(tmp_path / "big.parquet", [_record(i, rng) for i in range(40)], row_group_size=4)
  assert pq.ParquetFile(path).metadata.num_row_groups == 10

  reads = []
  original = pq.ParquetFile.read_row_group

  def counting(self, i, *args, **kwargs):
    reads.append(i)
    return original(self, i, *args, **kwargs)

  monkeypatch.setattr(pq.ParquetFile, "read_row_group", counting)
  monkeypatch.setattr(pq, "read_table", lambda *a, **k: pytest.fail("read the whole table"))

  src = de.DeepEyesSource(path, cache_row_groups=2)
  assert len(src) == 40 and reads == [] and src.row_group_reads == 0
  assert src[13]["extra_info"]["index"] == 13 and src[13][de.ROW_KEY] == 13
  assert reads == [3] and src.cached_row_groups == [(path, 3)]
  assert src[14]["extra_info"]["index"] == 14 and src[15]["extra_info"]["index"] == 15
  assert reads == [3]  # same row group: served from the cache
  assert src[0]["extra_info"]["index"] == 0 and src[-1]["extra_info"]["index"] == 39
  assert reads == [3, 0, 9] and src.cached_row_groups == [(path, 0), (path, 9)]  # 3 evicted (LRU of 2)
  src[1]
  assert src.cached_row_groups == [(path, 9), (path, 0)]
  src[12]
  assert reads == [3, 0, 9, 3] and src.row_group_reads == 4
  with pytest.raises(IndexError):
    src[40]

  clone = pickle.loads(pickle.dumps(src))  # grain workers get a pickled source: no cache, no open handles
  assert clone.cached_row_groups == [] and clone.row_group_reads == 0
  assert clone[21]["extra_info"]["index"] == 21 and reads[-1] == 5


def test_source_concatenates_files_and_globs(data, tmp_path):
  paths, _, _ = data
  src = de.DeepEyesSource([str(tmp_path / "part-*")])
  assert src.paths == paths and len(src) == 39
  assert src.locate(29) == (paths[0], 29) and src.locate(30) == (paths[1], 0) and src.locate(38) == (paths[1], 8)
  rec = src[31]
  assert rec[de.FILE_KEY] == paths[1] and rec[de.ROW_KEY] == 1 and rec[de.INDEX_KEY] == 31
  assert rec["extra_info"]["index"] == 101 and isinstance(rec["images"][0]["bytes"], str)  # base64 until decoded
  assert de.ERROR_KEY in src[38]
  assert de.DeepEyesSource(str(tmp_path)).paths == paths  # a directory: its parquet/JSONL files


def test_glob_matching_nothing_raises_naming_the_pattern(data, tmp_path):
  paths, _, _ = data
  pattern = str(tmp_path / "nothing-*.parquet")
  with pytest.raises(FileNotFoundError, match="nothing-\\*.parquet"):
    de.DeepEyesSource(pattern)
  with pytest.raises(FileNotFoundError, match="nothing-\\*.parquet"):
    de.DeepEyesSource([paths[0], pattern])
  with pytest.raises(FileNotFoundError, match="missing.parquet"):
    pl.make_train_iterator(str(tmp_path / "missing.parquet"), seed=0, batch_size=2)


def test_jsonl_with_relative_image_paths_and_base64(tmp_path, monkeypatch):
  rng = np.random.default_rng(6)
  recs = [_record(i, rng, n_images=1 + i % 2) for i in range(4)]
  sub = tmp_path / "sub"
  sub.mkdir()
  on_disk = de.write_deepeyes_jsonl(sub / "files.jsonl", recs[:2], image_dir="imgs")
  inline = de.write_deepeyes_jsonl(sub / "inline.jsonl", recs[2:])

  first = json.loads(open(on_disk).readline())
  assert first["images"][0]["bytes"] is None
  rel = first["images"][0]["path"]
  assert not os.path.isabs(rel) and rel.startswith("imgs") and os.path.isfile(sub / rel)
  line = json.loads(open(inline).readline())
  b64 = line["images"][0]["bytes"]
  assert isinstance(b64, str) and base64.b64decode(b64).startswith(b"\x89PNG")

  elsewhere = tmp_path / "elsewhere"
  elsewhere.mkdir()
  monkeypatch.chdir(elsewhere)  # relative paths resolve against the JSONL file, not the working directory
  src = de.DeepEyesSource([os.path.relpath(on_disk), os.path.relpath(inline)])
  assert len(src) == 4
  for i, want in enumerate(recs):
    ex = de.decode_example(src[i], i, source_name="x")
    assert ex.uid == f"vstar-{i}" and len(ex.images) == len(want["images"])
    for got, exp in zip(ex.images, want["images"]):
      np.testing.assert_array_equal(_pixels(got), _pixels(exp))


# ----------------------------------------------------------------------------------------------------------------------
# Pipeline


def test_pipeline_skips_bad_records_counts_and_logs(data, caplog):
  paths, good, bad = data
  caplog.set_level(logging.WARNING, logger="deepeyes_jax.data.pipeline")
  # One pass in file order with the last partial batch kept (what an evaluation over a file asks for).
  it, stats = pl.make_train_iterator(paths, seed=0, batch_size=4, shuffle=False, num_epochs=1, drop_remainder=False)
  batches = list(it)
  assert _uids(batches)[-1] == good[-(len(good) % 4 or 4) :]  # the last partial batch is kept
  assert [u for b in _uids(batches) for u in b] == good  # file order, bad rows dropped
  assert all(isinstance(ex, de.Example) for b in batches for ex in b)
  assert stats.examples == len(good) and stats.skipped == len(bad) == 5
  assert stats.by_reason == {de.BAD_IMAGE: 2, de.MISSING_FIELD: 1, de.IMAGE_COUNT: 1, de.UNREADABLE: 1}
  messages = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "bad DeepEyes" in r.message]
  assert len(messages) == 5
  for index, reason in bad.items():
    file = paths[0] if index < 30 else paths[1]
    assert any(f"index {index}," in m and file in m and reason in m for m in messages), (index, messages)


def test_train_order_is_deterministic_per_seed(data):
  paths, good, _ = data

  def epochs(seed, n=2):
    it, _ = pl.make_train_iterator(paths, seed=seed, batch_size=1, num_epochs=n, read_threads=3)
    return [u for b in _uids(it) for u in b]

  a, b, c = epochs(0), epochs(0), epochs(1)
  assert a == b
  assert a != c
  n = len(good)
  assert len(a) == 2 * n
  assert sorted(a[:n]) == sorted(good) and sorted(a[n:]) == sorted(good)  # each epoch is a permutation
  assert a[:n] != a[n:]  # reshuffled per epoch
  assert a[:n] != good  # actually shuffled
  no_shuffle, _ = pl.make_train_iterator(paths, seed=0, batch_size=3, shuffle=False, num_epochs=1, drop_remainder=False)
  assert [u for b in _uids(no_shuffle) for u in b] == good


@pytest.mark.parametrize("count", [2, 3])
def test_process_shards_are_disjoint_and_cover_the_epoch(data, count):
  paths, good, _ = data
  shards = []
  for p in range(count):
    it, stats = pl.make_train_iterator(
      paths, seed=5, batch_size=2, num_epochs=1, process_index=p, process_count=count, drop_remainder=False
    )
    shards.append([u for b in _uids(it) for u in b])
    assert stats.examples == len(shards[-1])
  for p in range(count):
    assert len(set(shards[p])) == len(shards[p])
    for q in range(p):
      assert not set(shards[p]) & set(shards[q])
  assert sorted(u for s in shards for u in s) == sorted(good)
  assert all(abs(len(s) - len(good) / count) <= 3 for s in shards)  # balanced up to the bad rows


def test_full_batches_and_drop_remainder(data):
  paths, good, _ = data
  it, _ = pl.make_train_iterator(paths, seed=3, batch_size=4, num_epochs=1)
  sizes = [len(b) for b in it]
  assert sizes == [4] * (len(good) // 4)  # filtered rows do not shrink batches; the remainder is dropped


def test_checkpoint_resume_yields_the_same_batches(data):
  paths, _, _ = data
  it, stats = pl.make_train_iterator(paths, seed=11, batch_size=3, read_threads=4)
  _take(it, 10)
  skipped_before = stats.skipped
  state = it.get_state()
  saved = json.loads(json.dumps(state))  # JSON-serializable
  after = _take(it, 8)  # crosses the epoch boundary (33 good rows = 11 batches per epoch)
  assert stats.skipped >= 5

  fresh, fresh_stats = pl.make_train_iterator(paths, seed=11, batch_size=3, read_threads=2)
  fresh.set_state(saved)
  assert _take(fresh, 8) == after
  # Counters are per iterator and not part of the state: the fresh one counts only what it read after the restore.
  assert fresh_stats.skipped == stats.skipped - skipped_before

  other, _ = pl.make_train_iterator(paths, seed=12, batch_size=3)
  other.set_state(saved)
  assert _take(other, 8) != after


def test_checkpoint_with_orbax_grain_handler(data, tmp_path):
  ocp = pytest.importorskip("orbax.checkpoint")
  import grain

  paths, _, _ = data
  it, _ = pl.make_train_iterator(paths, seed=2, batch_size=2)
  _take(it, 5)
  mngr = ocp.CheckpointManager(tmp_path / "ckpt", options=ocp.CheckpointManagerOptions(create=True))
  mngr.save(5, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
  mngr.wait_until_finished()
  after = _take(it, 4)
  fresh, _ = pl.make_train_iterator(paths, seed=2, batch_size=2)
  mngr.restore(5, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(fresh)))
  assert _take(fresh, 4) == after
  assert (tmp_path / "ckpt" / "5" / "data" / "process_0-of-1.json").exists()
  mngr.close()


def test_worker_processes_match_in_process_pipeline(data):
  paths, good, bad = data
  ref, _ = pl.make_train_iterator(paths, seed=4, batch_size=3, num_epochs=1)
  ref_uids = _uids(ref)
  it, stats = pl.make_train_iterator(paths, seed=4, batch_size=3, num_epochs=1, worker_count=2)
  try:
    assert _uids(it) == ref_uids
    assert stats.skipped == len(bad) and stats.examples == len(good)  # counted in this process
  finally:
    it.close()


def test_bad_arguments_raise(data):
  paths, _, _ = data
  with pytest.raises(ValueError, match="process_index"):
    pl.make_train_iterator(paths, seed=0, batch_size=2, process_index=2, process_count=2)
  with pytest.raises(ValueError, match="batch_size"):
    pl.make_train_iterator(paths, seed=0, batch_size=0)
  with pytest.raises(ValueError, match="no records"):
    pl.make_train_iterator(paths, seed=0, batch_size=2, process_index=50, process_count=51)


def test_decode_example_without_an_image_when_allowed():
  rec = _record(1, np.random.default_rng(1))
  _no_image(rec)
  assert de.decode_example(rec, 0, source_name="m", require_image=False).images == []


@pytest.fixture
def hostile(tmp_path):
  """A parquet file whose rows 1-4 are each bad in one of the ways a loader must catch (the rest are good)."""
  rng = np.random.default_rng(9)
  recs = [_record(i, rng, source="vstar") for i in range(8)]
  _no_image(recs[1])
  _thin_image(recs[2])
  _bomb_image(recs[3])
  recs[4]["data_source"] = "no_such_benchmark"  # decodes fine; no reward can score it
  path = de.write_deepeyes_parquet(tmp_path / "hostile.parquet", recs, row_group_size=3)
  return str(path)


@pytest.mark.parametrize("known", [{"vstar", "chart"}, lambda s: s.startswith("vs")], ids=["set", "predicate"])
def test_pipeline_skips_hostile_rows_and_counts_them_by_reason(hostile, known):
  it, stats = pl.make_train_iterator(
    hostile, seed=0, batch_size=2, shuffle=False, num_epochs=1, drop_remainder=False, known_sources=known
  )
  assert [ex.uid for b in it for ex in b] == [f"vstar-{i}" for i in (0, 5, 6, 7)]
  assert stats.by_reason == {de.NO_IMAGE: 1, de.IMAGE_SIZE: 2, de.UNKNOWN_SOURCE: 1}
  assert stats.by_source == {hostile: 4}
  m = stats.metrics()
  assert m["data/skipped_records"] == 4 and stats.examples == 4
  assert m["data/skipped_image_size"] == 2 and m["data/skipped_no_image"] == 1
  assert m["data/skipped_unknown_data_source"] == 1 and m["data/skipped_bad_image"] == 0  # every reason, from 0
  assert {f"data/skipped_{r}" for r in (*de.REASONS, pl.UNEXPECTED_ERROR)} <= set(m)


def test_pipeline_without_known_sources_keeps_any_data_source(hostile):
  it, stats = pl.make_train_iterator(hostile, seed=0, batch_size=8, shuffle=False, num_epochs=1, drop_remainder=False)
  assert "no_such_benchmark" in {ex.data_source for b in it for ex in b}
  assert stats.by_reason == {de.NO_IMAGE: 1, de.IMAGE_SIZE: 2}


def test_a_file_that_is_not_parquet_stops_naming_it(tmp_path):
  bad = tmp_path / "broken.parquet"
  bad.write_bytes(b"PAR1 this is no parquet file")
  with pytest.raises(de.DataFileError, match="broken.parquet"):
    de.DeepEyesSource(str(bad))
  with pytest.raises(de.DataFileError, match="broken.parquet"):
    pl.make_train_iterator(str(bad), seed=0, batch_size=1)


def test_a_file_unreadable_after_indexing_stops_the_pipeline_naming_it(tmp_path):
  rng = np.random.default_rng(3)
  path = de.write_deepeyes_parquet(tmp_path / "gone.parquet", [_record(i, rng) for i in range(4)], row_group_size=2)
  it, _ = pl.make_train_iterator(str(path), seed=0, batch_size=1, shuffle=False, num_epochs=1, read_threads=1)
  with open(path, "r+b") as f:  # the row groups' bytes are overwritten (a file replaced or corrupted mid-run)
    f.seek(4)
    f.write(b"\0" * (os.path.getsize(path) - 12))
  with pytest.raises(de.DataFileError, match="gone.parquet"):
    list(it)


def test_a_file_of_bad_lines_stops_naming_it(tmp_path):
  path = tmp_path / "garbage.jsonl"
  path.write_text("".join(f"not json {i}\n" for i in range(pl.MAX_LEADING_BAD_RECORDS + 5)))
  it, _ = pl.make_train_iterator(str(path), seed=0, batch_size=1, shuffle=False, num_epochs=1)
  with pytest.raises(ValueError, match=f"all bad .*garbage.jsonl \\({pl.MAX_LEADING_BAD_RECORDS}\\)"):
    next(it)


def test_images_of_hostile_bytes_in_jsonl_are_skipped(tmp_path):
  rng = np.random.default_rng(4)
  recs = [_record(i, rng) for i in range(3)]
  recs[1]["images"] = [png_bytes(thin_image(2, 600))]  # tall: 300:1
  path = de.write_deepeyes_jsonl(tmp_path / "t.jsonl", recs)
  it, stats = pl.make_train_iterator(str(path), seed=0, batch_size=3, shuffle=False, num_epochs=1, drop_remainder=False)
  assert [ex.uid for b in it for ex in b] == ["vstar-0", "vstar-2"] and stats.by_reason == {de.IMAGE_SIZE: 1}
