"""Training metrics: clu writers (TensorBoard + logging) plus a `metrics.jsonl` file, rollout statistics, and a
progress line with an ETA.

clu's `metric_writers` imports TensorFlow for its TensorBoard writer, so `tensorflow-cpu` and `tensorboard` are
core dependencies (see docs/training.md for the reasoning). Only process 0 writes.
"""

from __future__ import annotations

import collections
import contextlib
import json
import logging
import os
import time
from typing import Any, Mapping, Sequence

import jax
import numpy as np
from clu import metric_writers
from etils import epath

from deepeyes_jax.agent.trajectory import Trajectory
from deepeyes_jax.eval.loop import zoom_ious
from deepeyes_jax.reward import rewards as rewards_lib

log = logging.getLogger(__name__)

# Peak dense bf16 FLOP/s per device (docs/reference figures in docs/tpu_7b.md). CPU: measured fp32 matmul rate of the
# CI machine kind. Keys are generations; `DEVICE_KINDS` maps a device's `device_kind` to them.
PEAK_FLOPS = {
  "h100": 989e12,
  "h200": 989e12,
  "v5p": 459e12,
  "v5e": 197e12,
  "v6e": 918e12,
  "v4": 275e12,  # Google's published TPU v4 bf16 peak
  "cpu": 3e11,
}
# Peak HBM bandwidth per device, bytes/s (vendor figures): the memory side of a roofline (`python -m deepeyes_jax.aot`).
PEAK_HBM_BANDWIDTH = {
  "h100": 3.35e12,
  "h200": 4.8e12,
  "v5p": 2.76e12,
  "v5e": 0.82e12,
  "v6e": 1.64e12,
  "v4": 1.2e12,
}
# `device_kind` (lower case) -> generation, first match wins: TPUs report "TPU v5" (v5p), "TPU v5 lite" (v5e),
# "TPU v6 lite" (v6e), "TPU v4"; GPUs e.g. "NVIDIA H100 80GB HBM3".
DEVICE_KINDS = (
  ("h100", "h100"),
  ("h200", "h200"),
  ("v5 lite", "v5e"),
  ("v5e", "v5e"),
  ("v5p", "v5p"),
  ("tpu v5", "v5p"),
  ("v6 lite", "v6e"),
  ("v6e", "v6e"),
  ("tpu v4", "v4"),
)


def device_generation(device: jax.Device) -> str | None:
  kind = device.device_kind.lower()
  return next((gen for key, gen in DEVICE_KINDS if key in kind), None)


def device_peak_flops(device: jax.Device | None = None) -> float:
  device = device or jax.devices()[0]
  gen = device_generation(device)
  if gen is not None:
    return PEAK_FLOPS[gen]
  return PEAK_FLOPS["cpu"] if device.platform == "cpu" else float("nan")


class JsonlWriter(metric_writers.MetricWriter):
  """Appends {"step": s, **scalars} per line to a file; other kinds of summaries are ignored.

  `resume_step`: the checkpoint a run resumes from. Rows of later steps were logged by the killed run after its last
  durable checkpoint (an asynchronous save still in flight at a SIGKILL is lost) and are about to be redone: they
  are moved to `<path>.discarded` so that metrics.jsonl has one row per step, and nothing logged is thrown away.
  `path`: local or a URL epath handles (gs://bucket/run/metrics.jsonl).
  """

  def __init__(self, path: str | os.PathLike, resume_step: int | None = None):
    self.path = path
    if resume_step is not None and epath.Path(path).exists():
      _drop_rows_after(path, resume_step)
    # Entered, not just opened: epath's TensorFlow backend (gs:// when TF is installed) returns a context manager.
    self._stack = contextlib.ExitStack()
    self._f = self._stack.enter_context(epath.Path(path).open("a"))

  def write_scalars(self, step: int, scalars: Mapping[str, Any]):
    row = {"step": int(step)}
    row.update({k: float(v) for k, v in scalars.items()})
    self._f.write(json.dumps(row) + "\n")
    self._f.flush()

  def write_summaries(self, step, values, metadata=None):
    pass

  def write_images(self, step, images):
    pass

  def write_videos(self, step, videos):
    pass

  def write_audios(self, step, audios, *, sample_rate):
    pass

  def write_texts(self, step, texts):
    pass

  def write_histograms(self, step, arrays, num_buckets=None):
    pass

  def write_pointcloud(self, step, point_clouds, *, point_colors=None, configs=None):
    pass

  def write_hparams(self, hparams):
    pass

  def flush(self):
    self._f.flush()

  def close(self):
    self._stack.close()


def _drop_rows_after(path: str | os.PathLike, step: int) -> None:
  path = epath.Path(path)
  keep, drop = [], []
  with path.open() as f:
    for line in f:
      try:
        later = int(json.loads(line)["step"]) > step
      except (ValueError, KeyError, TypeError):  # a line cut short by the kill
        later = True
      (drop if later else keep).append(line if line.endswith("\n") else line + "\n")
  if drop:
    with epath.Path(f"{path}.discarded").open("a") as f:
      f.write("".join(drop))  # one write: TF's GFile (epath's gs:// backend) has no writelines
    tmp = epath.Path(f"{path}.tmp")
    tmp.write_text("".join(keep))
    # Local: os.replace, atomic. gs://: the best epath offers, a rename that is a server-side copy then a delete; the
    # copy makes the new object appear whole (object writes are atomic), a kill before the delete leaves the .tmp
    # behind (overwritten by the next rewrite).
    tmp.replace(path)
    log.warning(
      "%s: moved %d rows logged after step %d (not checkpointed) to %s.discarded", path, len(drop), step, path
    )


def make_writer(workdir: str, resume_step: int | None = None) -> metric_writers.MetricWriter:
  """TensorBoard (workdir/tensorboard) + log lines + workdir/metrics.jsonl on process 0; log-only elsewhere.

  `resume_step`: see `JsonlWriter`."""
  if jax.process_index() != 0:
    return metric_writers.LoggingWriter()
  workdir = epath.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  return metric_writers.MultiWriter(
    [
      # A str path: the TensorBoard summary writer does its own I/O (TensorFlow's file systems, gs:// included); it
      # is not covered by the tests on a non-local file system (tests/test_workdir_paths.py).
      metric_writers.create_default_writer(str(workdir / "tensorboard"), asynchronous=False),
      JsonlWriter(workdir / "metrics.jsonl", resume_step),
    ]
  )


def rollout_metrics(trajectories: Sequence[Trajectory], rewards: Sequence[Any]) -> dict[str, float]:
  """Reward and each component, judge and format-error rates, accuracy, tool use, failure reasons, turns, lengths,
  stop reasons."""
  n = max(1, len(trajectories))
  m: dict[str, float] = {}
  rm = rewards_lib.reward_metrics(rewards)  # reward, its components, judged / judge-unavailable / format-error rates
  m["reward/mean"] = rm.get("reward", 0.0)
  m["reward/std"] = float(np.std([r.total for r in rewards])) if rewards else 0.0
  for key in ("acc", "fmt", "tool", "judged", "judge_unavailable", "format_error", "error"):
    m[f"reward/{key}"] = rm.get(key, 0.0)
  m["accuracy"] = m["reward/acc"]
  calls = [t.num_tool_calls for t in trajectories]
  ok = [t.num_successful_tool_calls for t in trajectories]
  m["tool/calls_per_traj"] = float(np.mean(calls)) if calls else 0.0
  m["tool/success_rate"] = float(sum(ok) / max(1, sum(calls)))
  m["tool/traj_with_call"] = float(np.mean([c > 0 for c in calls])) if calls else 0.0
  crops = [_area_fraction(c.bbox, t.images[0].size) for t in trajectories for c in t.tool_calls if c.bbox and t.images]
  if crops:  # the crop's share of the original image's area
    m["tool/crop_area_frac"] = float(np.mean(crops))
  # Answer accuracy of trajectories that used the tool (a successful call) vs of those that did not: whether
  # looking closer pays, the signal the tool bonus relies on.
  used = [t.num_successful_tool_calls > 0 for t in trajectories]
  for key, want in (("tool/acc_with_tool", True), ("tool/acc_without_tool", False)):
    accs = [r.acc for r, u in zip(rewards, used) if u == want]
    if accs:
      m[key] = float(np.mean(accs))
  status = collections.Counter(tc.status for t in trajectories for tc in t.tool_calls)
  for s, c in status.items():
    if s != "ok":
      m[f"tool/fail_{s}"] = c / max(1, sum(calls))
  stops = collections.Counter(t.stop_reason for t in trajectories)
  for s, c in stops.items():
    m[f"stop/{s}"] = c / n
  # Contained failures, as counts: rows the engine ended with an error or could not fit, rewards that raised.
  m["errors/rows"] = float(stops.get("error", 0))
  m["errors/prompt_too_long"] = float(stops.get("prompt_too_long", 0))
  m["errors/scoring"] = float(sum(bool(getattr(r, "details", {}).get("error")) for r in rewards))
  ious = [x for t in trajectories for x in zoom_ious(t)]
  if ious:  # tasks that record a target box (the synthetic task)
    m["tool/iou"] = float(np.mean(ious))
  m["turns/mean"] = float(np.mean([len(t.turns) for t in trajectories])) if trajectories else 0.0
  m["length/response"] = float(np.mean([t.response_length for t in trajectories])) if trajectories else 0.0
  m["length/generated"] = float(np.mean([int(t.action_mask.sum()) for t in trajectories])) if trajectories else 0.0
  m["length/total"] = float(np.mean([len(t.token_ids) for t in trajectories])) if trajectories else 0.0
  return m


def _area_fraction(box, size) -> float:
  x1, y1, x2, y2 = box
  w, h = size
  return max(0, x2 - x1) * max(0, y2 - y1) / max(1, w * h)


class ToolHealth:
  """Watches tool calls per trajectory for the collapse DeepEyes users report (calls falling to zero mid-run).

  Per step: an exponential moving average of `tool/calls_per_traj` (`smoothing`) and its running peak; the step is
  flagged (`tool/collapse` = 1, a warning in the log and the progress line) when the average falls below `fraction`
  of the peak, once the peak reached `min_peak` calls per trajectory. `fraction` 0 = off. `state()` goes into the
  checkpoint so that a resumed run flags the same steps.
  """

  def __init__(self, fraction: float, *, smoothing: float = 0.8, min_peak: float = 0.1, state: dict | None = None):
    self.fraction, self.smoothing, self.min_peak = fraction, smoothing, min_peak
    state = state or {}
    self.ema: float | None = state.get("ema")
    self.peak: float = state.get("peak", 0.0)

  def state(self) -> dict:
    return {"ema": self.ema, "peak": self.peak}

  def update(self, calls_per_traj: float) -> dict[str, float]:
    s = self.smoothing
    self.ema = calls_per_traj if self.ema is None else s * self.ema + (1 - s) * calls_per_traj
    self.peak = max(self.peak, self.ema)
    collapsed = bool(self.fraction > 0 and self.peak >= self.min_peak and self.ema < self.fraction * self.peak)
    if collapsed:
      log.warning(
        "tool calls collapsing: %.3f per trajectory (moving average) < %.0f%% of the run's peak %.3f",
        self.ema,
        100 * self.fraction,
        self.peak,
      )
    return {"tool/calls_ema": self.ema, "tool/calls_peak": self.peak, "tool/collapse": float(collapsed)}


class Progress:
  """'step 12/80 | reward 1.02 | acc 0.55 | tools 1.3 | 41.2 s/step | ETA 46m40s' lines.

  With a warm start (`warm_steps`), the two phases are timed separately: the ETA adds the remaining steps of each
  phase at that phase's own pace (GRPO steps, with their rollouts, are several times slower than behaviour-cloning
  steps); before the first GRPO step is timed its pace is unknown and the ETA covers the warm start only ("+ GRPO").
  """

  def __init__(self, total_steps: int, start_step: int = 0, warm_steps: int = 0):
    self.total, self.start, self.warm = total_steps, start_step, warm_steps
    self.t_last = time.time()
    self.times: dict[str, list[float]] = {"warm": [], "rl": []}

  def pause_ended(self) -> None:
    """Work between steps (a held-out evaluation) is not a step: restart the step clock."""
    self.t_last = time.time()

  def line(self, step: int, m: Mapping[str, float]) -> str:
    now = time.time()
    warm = "train/nll" in m  # a warm-start (behaviour cloning) step
    self.times["warm" if warm else "rl"].append(now - self.t_last)
    self.t_last = now
    per = self.times["warm" if warm else "rl"]
    pace = sum(per[-20:]) / len(per[-20:])
    left_warm = max(0, self.warm - step)
    left_rl = self.total - max(step, self.warm)
    rl_pace = sum(self.times["rl"][-20:]) / len(self.times["rl"][-20:]) if self.times["rl"] else None
    eta = left_warm * (pace if warm else 0.0)
    if rl_pace is not None:
      eta += left_rl * rl_pace
      eta_text = _fmt(eta)
    else:
      eta_text = _fmt(eta) + (" + GRPO" if left_rl else "")
    if warm:
      skills = "".join(f" {k.removeprefix('skills/')} {v:.2f}" for k, v in sorted(m.items()) if k.startswith("skills/"))
      return (
        f"step {step}/{self.total} | warm start | nll {m['train/nll']:.4f} | tokens/traj "
        f"{m.get('length/total', 0):.0f} | {pace:.1f} s/step | ETA {eta_text}"
        + (f" | skills:{skills}" if skills else "")
      )
    return (
      f"step {step}/{self.total} | reward {m.get('reward/mean', 0):.3f} | acc {m.get('accuracy', 0):.3f} | "
      f"tools/traj {m.get('tool/calls_per_traj', 0):.2f} (ok {m.get('tool/success_rate', 0):.2f}) | "
      f"loss {m.get('loss', 0):+.4f} | {pace:.1f} s/step | ETA {eta_text}"
      + (" | WARNING: tool calls collapsing (< log.tool_collapse_fraction of peak)" if m.get("tool/collapse") else "")
    )


def _fmt(s: float) -> str:
  s = int(max(0, s))
  h, rem = divmod(s, 3600)
  mnt, sec = divmod(rem, 60)
  return f"{h}h{mnt:02d}m" if h else f"{mnt}m{sec:02d}s"
