"""Pictures and pages of a trajectory: the original image with numbered zoom boxes next to the crops, and an HTML
page of every turn. Used by `infer`, the training report and the evaluation outputs."""

from __future__ import annotations

import base64
import html
import io

from PIL import Image, ImageDraw

from deepeyes_jax.agent.trajectory import Trajectory

COLORS = ["#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#42d4f4", "#f032e6", "#9a6324"]


def _fit(img: Image.Image, height: int) -> Image.Image:
  w, h = img.size
  scale = height / h
  return img.resize((max(1, round(w * scale)), height), Image.Resampling.BICUBIC)


def zoom_figure(traj: Trajectory, height: int = 480, target_box: list[float] | None = None) -> Image.Image:
  """Original image (numbered boxes of the successful zooms; `target_box` dashed-white if given) + the crops."""
  original = traj.images[0]
  main = _fit(original, height)
  s = height / original.size[1]
  draw = ImageDraw.Draw(main)
  if target_box is not None:
    x1, y1, x2, y2 = (v * s for v in target_box)
    draw.rectangle([x1, y1, x2, y2], outline="white", width=1)
  ok = [t for t in traj.tool_calls if t.status == "ok" and t.bbox is not None]
  for k, t in enumerate(ok):
    color = COLORS[k % len(COLORS)]
    x1, y1, x2, y2 = (v * s for v in t.bbox)
    draw.rectangle([x1, y1, x2, y2], outline=color, width=3)
    draw.rectangle([x1, y1, x1 + 16, y1 + 14], fill=color)
    draw.text((x1 + 4, y1 + 1), str(k + 1), fill="white")
  crops = [_fit(img, height // 2) for img in traj.images[1:]]
  width = main.size[0] + sum(c.size[0] + 8 for c in crops) + 8
  canvas = Image.new("RGB", (width, height + 8), "white")
  canvas.paste(main, (0, 0))
  x = main.size[0] + 8
  cdraw = ImageDraw.Draw(canvas)
  for k, c in enumerate(crops):
    canvas.paste(c, (x, 0))
    cdraw.rectangle([x, 0, x + c.size[0] - 1, c.size[1] - 1], outline=COLORS[k % len(COLORS)], width=3)
    cdraw.text((x + 4, c.size[1] + 2), f"crop {k + 1}", fill="black")
    x += c.size[0] + 8
  return canvas


def png_bytes(img: Image.Image) -> bytes:
  buf = io.BytesIO()
  img.save(buf, format="PNG")
  return buf.getvalue()


def trajectory_html(traj: Trajectory, figure: Image.Image | None = None, title: str | None = None) -> str:
  """A self-contained HTML page (images inlined) showing the question, every turn and tool call, the answer."""
  figure = figure if figure is not None else zoom_figure(traj)
  fig64 = base64.b64encode(png_bytes(figure)).decode()
  esc = html.escape
  parts = [
    "<!doctype html><html><head><meta charset='utf-8'>",
    f"<title>{esc(title or traj.uid)}</title>",
    "<style>body{font-family:sans-serif;max-width:1100px;margin:auto}pre{white-space:pre-wrap;background:#f6f6f6;"
    "padding:8px;border-radius:4px}.obs{background:#eef5ff}.meta{color:#555}.tool{font-family:monospace}</style>",
    "</head><body>",
    f"<h2>{esc(title or traj.uid)}</h2>",
    f"<img src='data:image/png;base64,{fig64}' style='max-width:100%'>",
    f"<p class='meta'>stop reason: <b>{esc(traj.stop_reason)}</b> &middot; turns: {len(traj.turns)} &middot; "
    f"tool calls: {traj.num_tool_calls} ({traj.num_successful_tool_calls} ok) &middot; "
    f"tokens: {len(traj.token_ids)} (prompt {traj.prompt_length})</p>",
  ]
  if traj.metadata:
    parts.append(
      "<p class='meta'>" + " &middot; ".join(f"{esc(str(k))}: {esc(str(v))}" for k, v in traj.metadata.items()) + "</p>"
    )
  calls = {t.turn: t for t in traj.tool_calls}
  for i, turn in enumerate(traj.turns, start=1):
    parts.append(
      f"<h3>Turn {i} <span class='meta'>({turn.num_tokens} tokens, {esc(turn.kind)}, {esc(turn.stop)})</span></h3>"
    )
    parts.append(f"<pre>{esc(turn.text)}</pre>")
    if i in calls:
      c = calls[i]
      box = f" box {c.bbox}" if c.bbox else ""
      err = f" &mdash; {esc(c.error)}" if c.error else ""
      parts.append(f"<p class='tool'>tool call: {esc(str(c.name))} {esc(c.status)}{box}{err}</p>")
    if turn.observation:
      parts.append(f"<pre class='obs'>{esc(turn.observation)}</pre>")
  parts.append(f"<h3>Answer</h3><pre>{esc(str(traj.answer))}</pre></body></html>")
  return "\n".join(parts)
