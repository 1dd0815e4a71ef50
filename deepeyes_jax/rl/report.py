"""The run report: `report.png` (curves over training steps) and `report.html` (curves, held-out evaluation table,
rendered trajectories), written to the workdir at the end of training (`config.log.report`). Paths go through
`etils.epath`: the workdir may be local or gs://.

Curves come from `metrics.jsonl` (one line per step, what the TensorBoard logs hold too): the warm-start loss (and
its `skills/*` probes), then
per RL step the rollout reward, accuracy, tool calls per trajectory, tool success rate, IoU of the zoom boxes
with the target, the sampler / learner mismatch (`mismatch/*`) and the tool-use health (moving average of tool
calls against its peak, collapse warnings); held-out evaluations (`eval/*` keys) are drawn as markers.
"""

from __future__ import annotations

import base64
import html
import json
import os
from collections.abc import Sequence

import matplotlib
from etils import epath

matplotlib.use("Agg")  # no display: files only
import matplotlib.pyplot as plt  # noqa: E402

from deepeyes_jax.agent import render  # noqa: E402
from deepeyes_jax.agent.trajectory import Trajectory  # noqa: E402

PANELS = (
  ("warm-start loss (nll)", "train/nll", None),
  ("reward", "reward/mean", None),
  ("accuracy", "accuracy", "eval/accuracy"),
  ("tool calls / trajectory", "tool/calls_per_traj", "eval/tool_calls_per_traj"),
  ("tool success rate", "tool/success_rate", "eval/tool_success_rate"),
  ("IoU of zoom boxes with the target", "tool/iou", "eval/mean_iou"),
  ("sampler / learner mismatch: mean |log ratio|", "mismatch/abs_log_ratio_mean", None),
  ("sampler / learner mismatch: k3 KL(sampler || learner)", "mismatch/kl_k3", None),
  ("tool calls / trajectory: moving average and peak", "tool/calls_ema", None),
)


def read_metrics(path: str | os.PathLike) -> list[dict]:
  rows = []
  with epath.Path(path).open() as f:
    for line in f:
      line = line.strip()
      if line:
        rows.append(json.loads(line))
  return rows


def plot(rows: Sequence[dict], out_png: str | os.PathLike, *, warmstart_steps: int = 0) -> None:
  fig, axes = plt.subplots(3, 3, figsize=(15, 12))
  for ax, (title, key, eval_key) in zip(axes.flat, PANELS):
    pts = [(r["step"], r[key]) for r in rows if key in r]
    if pts:
      ax.plot(*zip(*pts), lw=1.2, label="training rollouts" if key != "train/nll" else "train")
    if key == "tool/calls_ema":  # the running peak the collapse warning compares against (rl/metrics.ToolHealth)
      peak = [(r["step"], r["tool/calls_peak"]) for r in rows if "tool/calls_peak" in r]
      if peak:
        ax.plot(*zip(*peak), "--", lw=1, color="gray", label="peak")
      flagged = [(r["step"], r[key]) for r in rows if r.get("tool/collapse")]
      if flagged:
        ax.plot(*zip(*flagged), "x", color="red", label="collapse warning")
    if eval_key:
      ev = [(r["step"], r[eval_key]) for r in rows if eval_key in r]
      if ev:
        ax.plot(*zip(*ev), "o--", color="black", label="held-out (greedy)")
    skills = sorted({k for r in rows for k in r if k.startswith("skills/")}) if key == "train/nll" else []
    if skills:  # the warm-start skill probes (rl/warmstart.skill_accuracy), on a 0-1 axis of their own
      ax2 = ax.twinx()
      for k in skills:
        sp = [(r["step"], r[k]) for r in rows if k in r]
        ax2.plot(*zip(*sp), "s--", ms=3, lw=1, label=k)
      ax2.set_ylim(0, 1)
      ax2.set_ylabel("skill probe (content tokens right)")
      ax2.legend(fontsize=8, loc="center right")
    if warmstart_steps:
      ax.axvline(warmstart_steps, color="gray", ls=":", lw=1)
    ax.set_title(title)
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
    if ax.lines:
      ax.legend(fontsize=8)
  fig.suptitle("warm start (left of the dotted line), then GRPO")
  fig.tight_layout()
  with epath.Path(out_png).open("wb") as f:  # a file object: matplotlib writes local paths only
    fig.savefig(f, format="png", dpi=90)
  plt.close(fig)


def _table(final_eval: dict) -> str:
  keys = ("accuracy", "tool_calls_per_traj", "tool_success_rate", "mean_iou", "answered")
  head = "".join(f"<th>{html.escape(k)}</th>" for k in keys)
  body = []
  for ckpt, modes in final_eval.get("checkpoints", {}).items():
    for mode, m in modes.items():
      cells = "".join(f"<td>{m.get(k, float('nan')):.3f}</td>" for k in keys)
      body.append(
        f"<tr><td>{html.escape(ckpt)} (step {m.get('step', '?')})</td><td>{html.escape(mode)}</td>{cells}</tr>"
      )
  return f"<table border=1 cellpadding=4><tr><th>checkpoint</th><th>mode</th>{head}</tr>{''.join(body)}</table>"


def write_report(
  workdir: str | os.PathLike,
  final_eval: dict,
  trajectories: Sequence[Trajectory] = (),
  *,
  warmstart_steps: int = 0,
  title: str = "deepeyes_jax run",
) -> str:
  """Writes report.png, report.html and trajectories/*.png in `workdir`; returns the HTML path."""
  workdir = epath.Path(workdir)
  rows = read_metrics(workdir / "metrics.jsonl")
  plot(rows, workdir / "report.png", warmstart_steps=warmstart_steps)
  tdir = workdir / "report_trajectories"
  tdir.mkdir(parents=True, exist_ok=True)
  parts = [
    "<!doctype html><html><head><meta charset='utf-8'><title>" + html.escape(title) + "</title>",
    "<style>body{font-family:sans-serif;max-width:1200px;margin:auto}td,th{font-size:13px}"
    "pre{white-space:pre-wrap;background:#f6f6f6;padding:6px}</style></head><body>",
    f"<h1>{html.escape(title)}</h1>",
    "<h2>Training curves</h2><img src='report.png' style='max-width:100%'>",
    "<h2>Held-out evaluation (greedy)</h2>",
    _table(final_eval),
    "<h2>Trajectories (final checkpoint, held-out, with the tool)</h2>",
  ]
  for k, t in enumerate([t for t in trajectories if t.images]):  # a row whose prompt failed has no image to draw
    box = t.metadata.get("target_box")
    box = json.loads(box) if isinstance(box, str) else box
    fig = render.zoom_figure(t, height=360, target_box=box)
    png = render.png_bytes(fig)  # the bytes fig.save(path) writes
    (tdir / f"trajectory_{k:02d}.png").write_bytes(png)
    (tdir / f"trajectory_{k:02d}.html").write_text(render.trajectory_html(t, fig))
    verdict = "correct" if t.metadata.get("correct") else "wrong"
    q = t.metadata.get("question", "")
    img64 = base64.b64encode(png).decode()
    parts.append(
      f"<h3>{html.escape(q)} &mdash; answer {html.escape(str(t.answer))} "
      f"(truth {html.escape(str(t.metadata.get('ground_truth')))}, {verdict})</h3>"
      f"<img src='data:image/png;base64,{img64}' style='max-width:100%'>"
      + "".join(f"<pre>{html.escape(turn.text)}</pre>" for turn in t.turns)
    )
  parts.append("</body></html>")
  out = workdir / "report.html"
  out.write_text("\n".join(parts))
  return str(out)
