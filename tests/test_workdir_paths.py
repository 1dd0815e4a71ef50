"""Workdir outputs on a non-local file system: every workdir path goes through `etils.epath`, so a gs:// workdir (what
launch/tpu.sh requires on a pod) holds metrics.jsonl, rollouts, evaluations and the report.

No network here, so gs:// is faked, in memory, behind each of epath's two real gs:// backends:
- "fsspec": epath's fsspec backend (used for gs:// when TensorFlow is absent), served by fsspec's in-memory
  filesystem (`MemoryFileSystem`, a dict of buffers) in place of gcsfs;
- "tf": epath's TensorFlow backend, the one a pod uses (tensorflow is a core dependency and epath prefers tf.io.gfile
  for gs:// when it is installed), with gs:// paths mapped onto TensorFlow's in-memory `ram://` file system.
Both are non-local: `open()` / `os.makedirs` on a "gs://..." string would instead create a local `gs:` directory in the
current directory, which each test runs in (empty) and checks is still empty at the end.

Not covered here: the TensorBoard writer of `make_writer` (TensorFlow's summary writer does its own I/O; pointed at a
fake gs:// it would try to reach Google Cloud Storage), and orbax checkpoints (only the directory normalisation of the
Checkpointer is tested).
"""

import json
import os
import uuid

import ml_collections
import numpy as np
import pytest
from etils import epath
from etils.epath import backend as epath_backend
from etils.epath import gpath as epath_gpath
from fsspec.implementations.memory import MemoryFileSystem
from fsspec.utils import stringify_path
from PIL import Image

from deepeyes_jax.agent.trajectory import ToolRecord, Trajectory, Turn, load_trajectories, save_trajectories
from deepeyes_jax.data.benchmarks import BenchmarkItem
from deepeyes_jax.eval import held_out, runner
from deepeyes_jax.rl import metrics as metrics_lib
from deepeyes_jax.rl.checkpoint import normalize_directory
from deepeyes_jax.rl.report import write_report

# --- the fake gs:// -----------------------------------------------------------------------------------------------


class _MemoryGCS(MemoryFileSystem):
  """fsspec's in-memory filesystem answering for gs:// paths (what gcsfs does for real)."""

  protocol = ("gs", "gcs")

  @classmethod
  def _strip_protocol(cls, path):
    path = stringify_path(path)
    for prefix in ("gs://", "gcs://"):
      path = path.removeprefix(prefix)
    return super()._strip_protocol(path)


def _to_ram(x):
  return "ram://" + x[len("gs://") :] if isinstance(x, str) and x.startswith("gs://") else x


def _from_ram(x):
  if isinstance(x, str) and x.startswith("ram://"):
    return "gs://" + x[len("ram://") :]
  if isinstance(x, list):
    return [_from_ram(v) for v in x]
  return x


class _RamGfile:
  """tf.io.gfile with gs:// paths sent to TensorFlow's in-memory ram:// file system."""

  def __init__(self, gfile):
    self._gfile = gfile

  def __getattr__(self, name):
    fn = getattr(self._gfile, name)

    def call(*args, **kwargs):
      if name == "GFile" and "w" in (args[1] if len(args) > 1 else kwargs.get("mode", "r")):
        # ram:// appends to an existing file opened with "w"; GCS (and every other file system) replaces it.
        if self._gfile.exists(_to_ram(args[0])):
          self._gfile.remove(_to_ram(args[0]))
      return _from_ram(fn(*map(_to_ram, args), **{k: _to_ram(v) for k, v in kwargs.items()}))

    return call


class _RamTfBackend(epath_backend._TfBackend):  # epath's own TensorFlow backend, gs:// paths remapped
  @property
  def gfile(self):
    return _RamGfile(self.tf.io.gfile)


@pytest.fixture(params=["fsspec", "tf"])
def gcs(request, monkeypatch, tmp_path):
  """A fresh, empty gs:// bucket on a fake (in-memory) file system; yields the root URL of a workdir in it."""
  if request.param == "fsspec":
    fs = _MemoryGCS(global_store=False, skip_instance_cache=True)
    monkeypatch.setattr(epath_gpath, "_is_tf_installed", lambda: False)  # epath: gs:// -> its fsspec backend
    monkeypatch.setattr(epath_backend.fsspec_backend, "fs", lambda path: fs)
  else:
    monkeypatch.setattr(epath_gpath, "_is_tf_installed", lambda: True)  # epath: gs:// -> its TensorFlow backend
    monkeypatch.setattr(epath_gpath, "_is_zonal_gcs_bucket", lambda bucket: False)  # no Cloud API call
    monkeypatch.setattr(epath_backend, "tf_backend", _RamTfBackend())
  cwd = tmp_path / "cwd"
  cwd.mkdir()
  monkeypatch.chdir(cwd)
  root = f"gs://bucket-{uuid.uuid4().hex[:8]}/run"  # ram:// is process-wide: a bucket of its own per test
  assert not epath.Path(root).exists()
  yield root
  assert os.listdir(cwd) == [], "a workdir path bypassed epath and was written locally"


def _read(url) -> str:
  return epath.Path(url).read_text()


def _rows(url) -> list[dict]:
  return [json.loads(x) for x in _read(url).splitlines()]


def test_the_fake_is_not_the_local_disk(gcs):
  epath.Path(gcs).mkdir(parents=True, exist_ok=True)
  (epath.Path(gcs) / "x.txt").write_text("hello")
  assert _read(f"{gcs}/x.txt") == "hello"
  assert not os.path.exists(f"{gcs}/x.txt")
  with pytest.raises(FileNotFoundError):
    open(f"{gcs}/x.txt")


# --- checkpoint directory -------------------------------------------------------------------------------------


def test_checkpoint_directory_keeps_urls_and_makes_local_paths_absolute(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  assert normalize_directory("gs://b/x") == "gs://b/x"
  assert normalize_directory("gs://b/x/checkpoints") == "gs://b/x/checkpoints"
  assert normalize_directory(epath.Path("gs://b/x") / "checkpoints") == "gs://b/x/checkpoints"
  assert normalize_directory("s3://b/x") == "s3://b/x"
  assert normalize_directory("run/checkpoints") == str(tmp_path / "run" / "checkpoints")
  assert normalize_directory("/abs/dir") == "/abs/dir"
  assert not os.path.exists(tmp_path / "gs:")


# --- metrics.jsonl --------------------------------------------------------------------------------------------


def test_jsonl_writer_appends_and_resume_moves_later_rows_aside(gcs):
  epath.Path(gcs).mkdir(parents=True, exist_ok=True)
  path = f"{gcs}/metrics.jsonl"
  w = metrics_lib.JsonlWriter(path)
  for step in range(1, 6):
    w.write_scalars(step, {"loss": step / 10})
  w.close()
  assert _rows(path) == [{"step": s, "loss": s / 10} for s in range(1, 6)]
  # A run killed after step 5 resumes from the checkpoint of step 3: rows 4 and 5 are redone.
  w = metrics_lib.JsonlWriter(path, resume_step=3)
  w.write_scalars(4, {"loss": 4.5})
  w.close()
  assert _rows(path) == [{"step": s, "loss": s / 10} for s in (1, 2, 3)] + [{"step": 4, "loss": 4.5}]
  assert _rows(f"{path}.discarded") == [{"step": 4, "loss": 0.4}, {"step": 5, "loss": 0.5}]
  assert not epath.Path(f"{path}.tmp").exists()
  # Nothing after the resume step (and a torn last line): nothing moved, the torn line goes.
  epath.Path(path).write_text(_read(path) + '{"step": 5, "lo')
  metrics_lib.JsonlWriter(path, resume_step=4).close()
  assert [r["step"] for r in _rows(path)] == [1, 2, 3, 4]
  assert _read(f"{path}.discarded").splitlines()[-1] == '{"step": 5, "lo'


def test_make_writer_puts_metrics_jsonl_in_the_gs_workdir(gcs, monkeypatch):
  tensorboard_dirs = []

  class _NoTensorBoard(metrics_lib.metric_writers.LoggingWriter):  # see the module docstring
    def __init__(self, logdir, asynchronous):
      super().__init__()
      tensorboard_dirs.append(logdir)

  monkeypatch.setattr(metrics_lib.metric_writers, "create_default_writer", _NoTensorBoard)
  workdir = f"{gcs}/new/workdir"
  writer = metrics_lib.make_writer(workdir)
  writer.write_scalars(7, {"reward/mean": 0.25})
  writer.close()
  assert tensorboard_dirs == [f"{workdir}/tensorboard"] and isinstance(tensorboard_dirs[0], str)
  assert _rows(f"{workdir}/metrics.jsonl") == [{"step": 7, "reward/mean": 0.25}]


# --- trajectories ---------------------------------------------------------------------------------------------


def _image(seed, size=(40, 30)) -> Image.Image:
  rng = np.random.default_rng(seed)
  return Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))


def _trajectory(uid: str, task_id: str, images, answer: str, metadata=None) -> Trajectory:
  n = 6
  return Trajectory(
    uid=uid, task_id=task_id, sample_index=0, token_ids=np.arange(n, dtype=np.int32),
    action_mask=np.r_[np.zeros(2), np.ones(n - 2)].astype(np.int8), logprobs=np.linspace(-1, 0, n, dtype=np.float32),
    position_ids=np.tile(np.arange(n, dtype=np.int32), (3, 1)), images=list(images),
    grids=np.ones((len(images), 3), np.int64), prompt_length=2,
    turns=[Turn(text=f"<answer>{answer}</answer>", num_tokens=4, stop="stop_token", kind="answer")],
    tool_calls=[ToolRecord(turn=0, content="{}", name="zoom", bbox_given=[1, 2, 20, 20], bbox=[1, 2, 20, 20],
                           status="ok", error=None)] if len(images) > 1 else [],
    answer=answer, stop_reason="answer", image_min_pixels=4 * 28 * 28, image_max_pixels=48 * 28 * 28,
    metadata=dict(metadata or {}),
  )  # fmt: skip


def test_save_and_load_trajectories(gcs):
  out = f"{gcs}/rollouts"
  a = _trajectory("a/0", "a", [_image(0), _image(1, (16, 16))], "red", {"question": "q?"})
  b = _trajectory("b/0", "b", [_image(2)], "B")
  path = save_trajectories([a], out, filename="step_000001.jsonl")
  save_trajectories([b], out, filename="step_000001.jsonl")  # appends
  assert path == f"{out}/step_000001.jsonl"
  recs = _rows(path)
  assert [r["uid"] for r in recs] == ["a/0", "b/0"]
  assert recs[0]["images"] == ["images/a_0_0.png", "images/a_0_1.png"]
  with (epath.Path(out) / "images" / "a_0_1.png").open("rb") as f, Image.open(f) as im:
    assert im.format == "PNG" and np.array_equal(np.asarray(im), np.asarray(a.images[1]))
  back = load_trajectories(out, filename="step_000001.jsonl")
  assert [t.uid for t in back] == ["a/0", "b/0"] and back[0].metadata == {"question": "q?"}
  for t, orig in zip(back, [a, b]):
    assert len(t.images) == len(orig.images)
    assert all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(t.images, orig.images))
    np.testing.assert_array_equal(t.token_ids, orig.token_ids)
    np.testing.assert_array_equal(t.position_ids, orig.position_ids)
    assert t.turns == orig.turns and t.tool_calls == orig.tool_calls and t.answer == orig.answer


# --- evaluation outputs ---------------------------------------------------------------------------------------

_ITEMS = [  # (category, stem, question, options (correct first)); the fake policy gets sa_2 wrong
  ("direct_attributes", "sa_1", "What is the color of the cup?", ["red", "blue", "green", "white"]),
  ("direct_attributes", "sa_2", "What is the material of the bench?", ["wood", "metal", "stone", "plastic"]),
  ("relative_position", "sa_3", "Is the dog on the left or right side of the cat?", ["left", "right"]),
]


def _items() -> list[BenchmarkItem]:
  return [
    BenchmarkItem(item_id=f"{cat}/{stem}", benchmark="vstar", category=cat, question=q, answer=opts[0],
                  image=_image(k, (64, 48)), options=list(opts), answer_index=0)
    for k, (cat, stem, q, opts) in enumerate(_ITEMS)
  ]  # fmt: skip


def test_eval_runner_writes_and_resumes_on_gs(gcs):
  out = f"{gcs}/eval/vstar"
  calls = []

  def rollout_fn(tasks, k, seed):  # a fake policy: no model
    calls.append([t.task_id for t in tasks])
    trajs = []
    for t in tasks:
      truth = t.metadata["ground_truth"]  # the letter the prompt shows for the correct option
      answer = truth if not t.task_id.endswith("sa_2") else next(x for x in "ABCD" if x != truth)
      trajs.append(_trajectory(f"{t.task_id}/0", t.task_id, [t.image], answer))
    return trajs

  settings = runner.EvalSettings(benchmark="vstar", seed=0, batch_size=2, checkpoint="fake")
  summary = runner.evaluate_benchmark(_items(), rollout_fn, out, settings)
  assert calls == [["direct_attributes/sa_1", "direct_attributes/sa_2"], ["relative_position/sa_3"]]
  recs = _rows(f"{out}/results.jsonl")
  assert [(r["item_id"], r["greedy_correct"]) for r in recs] == [
    ("direct_attributes/sa_1", True), ("direct_attributes/sa_2", False), ("relative_position/sa_3", True)
  ]  # fmt: skip
  assert json.loads(_read(f"{out}/run_config.json")) == settings.pinned()
  assert json.loads(_read(f"{out}/summary.json")) == json.loads(json.dumps(summary))
  assert summary["overall"]["greedy"] == pytest.approx(2 / 3)  # fractions in summary.json, percent in summary.md
  md = _read(f"{out}/summary.md")
  assert "| direct_attributes | 2 | 50.0 |" in md and "| relative_position | 1 | 100.0 |" in md
  trajs = load_trajectories(out, filename=runner.TRAJECTORIES)
  assert sorted(t.task_id for t in trajs) == [r["item_id"] for r in recs]
  by_id = {it.item_id: it for it in _items()}
  assert all(np.array_equal(np.asarray(t.images[0]), np.asarray(by_id[t.task_id].image)) for t in trajs)
  # Resumed: everything is done (read back from gs://), nothing is rolled out again.
  calls.clear()
  again = runner.evaluate_benchmark(_items(), rollout_fn, out, settings)
  assert calls == [] and again["overall"] == summary["overall"]
  with pytest.raises(ValueError, match="other settings"):  # run_config.json read back from gs://
    other = runner.EvalSettings(benchmark="vstar", seed=1, checkpoint="fake")
    runner.evaluate_benchmark(_items(), rollout_fn, out, other)


def test_eval_resume_rewrites_a_torn_results_file_on_gs(gcs):
  out = epath.Path(gcs) / "eval"
  out.mkdir(parents=True, exist_ok=True)
  good = json.dumps({"item_id": "a", "category": "c", "error": None}) + "\n"
  (out / runner.RESULTS).write_text(good + '{"item_id": "b", "categ')  # killed mid-write
  (out / runner.TRAJECTORIES).write_text(json.dumps({"task_id": "a"}) + "\n" + json.dumps({"task_id": "b"}) + "\n")
  done = runner.read_done(f"{gcs}/eval")
  assert list(done) == ["a"]
  assert _read(out / runner.RESULTS) == good
  assert [r["task_id"] for r in _rows(out / runner.TRAJECTORIES)] == ["a"]
  assert not epath.Path(f"{out / runner.RESULTS}.tmp").exists()
  assert not epath.Path(f"{out / runner.TRAJECTORIES}.tmp").exists()


# --- the trainer's held-out results and the report ------------------------------------------------------------


def _eval_result(step: int, acc: float) -> dict:
  m = {"accuracy": acc, "tool_calls_per_traj": 1.0, "tool_success_rate": 1.0, "mean_iou": 0.5, "answered": 1.0}
  return {"tool": {"step": step, **m}, "no_tool": {"step": step, **m, "accuracy": acc / 2}}


def test_held_out_results_final_eval_and_report_on_gs(gcs):
  workdir = f"{gcs}/train"
  epath.Path(workdir).mkdir(parents=True)
  w = metrics_lib.JsonlWriter(epath.Path(workdir) / "metrics.jsonl")
  for step in range(1, 5):
    w.write_scalars(step, {"train/nll": 2.0 / step} if step <= 2 else {"reward/mean": 0.1 * step, "accuracy": 0.5})
  w.close()
  config = ml_collections.ConfigDict(
    {"seed": 0, "eval": {"num_questions": 2, "data": "synthetic"}, "log": {"report": True, "report_trajectories": 1}}
  )
  held = held_out.HeldOut(config, workdir, None, None, None, writer=None, make_tasks=list)
  assert str(held.dir) == f"{workdir}/eval"
  (held.dir).mkdir(parents=True, exist_ok=True)
  (held.dir / "warmstart.json").write_text(json.dumps(_eval_result(2, 0.25)))
  (held.dir / "final.json").write_text(json.dumps(_eval_result(4, 0.75)))
  assert held.run("final", 4) == _eval_result(4, 0.75)  # a result already in the workdir is not recomputed
  held.trajectories = [
    _trajectory("t/0", "t", [_image(5, (64, 48)), _image(6, (20, 20))], "red",
                {"question": "What colour?", "ground_truth": "red", "correct": True, "target_box": [1, 2, 20, 20]})
  ]  # fmt: skip
  returned = held.write_final()
  final = json.loads(_read(f"{workdir}/final_eval.json"))
  assert returned == final
  write_report(workdir, final, held.trajectories, warmstart_steps=2, title="deepeyes_jax: " + workdir)
  assert final["rl_gain_points"] == 50.0 and set(final["checkpoints"]) == {"warmstart", "final"}
  html = _read(f"{workdir}/report.html")
  assert "<title>deepeyes_jax: " + workdir + "</title>" in html and "What colour?" in html
  assert "final (step 4)" in html and "<td>0.750</td>" in html
  for png in (f"{workdir}/report.png", f"{workdir}/report_trajectories/trajectory_00.png"):
    with epath.Path(png).open("rb") as f, Image.open(f) as im:
      assert im.format == "PNG" and im.size[0] > 100
  assert "<!doctype html>" in _read(f"{workdir}/report_trajectories/trajectory_00.html").lower()
