"""A synthetic fine-grained VQA task that needs zooming: the embedded default of `configs/synthetic.py`.

Each scene is a seeded, procedurally drawn square image (1344-1536 px) on a cluttered background: gray shapes,
lines, speckle noise and small decoy plates, over a position-coded background. A `grid x grid` layout (3 x 3 by
default) holds 3-5 coloured objects (circle, square, triangle or diamond), each under a plate that carries the
answer-bearing detail (`SceneConfig.detail`). The default, "checks": a checkerboard of 3-px tiles in one of six
colours and its complement; "What colour are the checks in the top left cell?" -> "lime".

Why it needs zooming. With `GLOBAL_MAX_PIXELS` the model sees the whole image at 168 x 168 px (6 x 6 vision tokens,
2 x 2 per cell), an 8-9x downscale: every checkerboard averages to the same flat mid gray there (a regular pattern
has no energy at the low frequencies a downscale keeps; within a gray level, whatever the colour -- tested). The
demonstrator's zoom box, the central third of the target's cell, comes back as a crop at the original resolution
(~160 px shown at 140-168 px): the two colours at full contrast. Other details: "strokes" (which way short strokes
run; nearly isotropic noise when shrunk, but slow for the tiny model to learn to read), "dot", "badge" and "digit"
(a coloured dot, the dot ringed by its complement, a seven-segment digit; the earlier defaults, see
docs/synthetic.md).

How the target is named (`target_by`). "cell" (default): by its cell ("the top left cell"); the model turns words
into a box. "name": by colour and shape ("the red circle"); the model has to find it in the global view first --
which a 1M-parameter model made by code does not learn in a CPU budget (docs/synthetic.md). Qwen2.5-VL's vision
tower has no absolute position embedding, so for that variant objects sit inside the cells of a grid aligned with
the vision tokens and the background says where a token is (`background="cells"`: one muted red level per column
and blue level per row; "gradient": faint ramps).

Records are in the DeepEyes-47k format (`deepeyes.decode_example` reads them; the pipeline and the rewards apply as
for the real data). The data source is ``synthetic_zoom``, scored like V* (``0.8 acc + 0.2 fmt + 1.2 tool``).
`extra_info` keeps the target's box (original pixels), its cell and the scene layout for analysis.

Everything is a pure function of ``(seed, split, index)``: the same scene on every machine (PIL drawing with integer
coordinates and no fonts). ``split="test"`` draws from a separate stream, so held-out scenes are not training scenes.

`demonstration` is the scripted teacher of the warm start (`deepeyes_jax/rl/warmstart.py`): it writes the assistant
turns for a scene (zoom into the target's cell, then answer), or a direct answer from the global view.
"""

from __future__ import annotations

import dataclasses
import json
import math
import zlib
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from deepeyes_jax.agent import prompts, protocol
from deepeyes_jax.data import deepeyes
from deepeyes_jax.processing import image as improc

DATA_SOURCE = "synthetic_zoom"  # scored as the fine-grained V* source (reward/rewards.py: visual_reward)

# The global view (and crop) budget: smart_resize of any square image -> 168 x 168 px = 6 x 6 vision tokens.
# (170^2, not 168^2: smart_resize floors sqrt(max_pixels)/28, and 168.0 can come out as 167.99...)
GLOBAL_MAX_PIXELS = 170 * 170

# A short system prompt for the tiny model (the DeepEyes one is ~300 tokens of JSON schema that a model trained
# from scratch never needs to read; `SceneConfig.system_prompt="deepeyes"` uses the byte-exact one instead).
SHORT_SYSTEM_PROMPT = (
  "You are a helpful assistant.\n\n# Tools\nimage_zoom_in_tool: zoom in on a region of the image. "
  'Call it as <tool_call>\n{"name": "image_zoom_in_tool", "arguments": {"bbox_2d": [x1, y1, x2, y2]}}\n</tool_call>'
)
NO_TOOL_SYSTEM_PROMPT, NO_TOOL_SUFFIX = prompts.NO_TOOL_SYSTEM_PROMPT, prompts.NO_TOOL_SUFFIX

COLORS: dict[str, tuple[int, int, int]] = {
  "red": (225, 25, 25),
  "green": (20, 165, 40),
  "blue": (35, 60, 235),
  "yellow": (240, 215, 15),
  "magenta": (215, 35, 205),
  "cyan": (15, 205, 215),
  "orange": (250, 125, 10),
  "black": (15, 15, 15),
}
SHAPES = ("circle", "square", "triangle", "diamond")

# Seven-segment digits: segments a (top), b (top right), c (bottom right), d (bottom), e (bottom left),
# f (top left), g (middle).
_SEGMENTS = {
  "0": "abcdef",
  "1": "bc",
  "2": "abdeg",
  "3": "abcdg",
  "4": "bcfg",
  "5": "acdfg",
  "6": "acdefg",
  "7": "abc",
  "8": "abcdefg",
  "9": "abcdfg",
}


# Badge colours, in complementary pairs (each pair sums to white): a badge is a dot of one colour in a ring of its
# complement, of equal area, so that the average over the badge is the same gray for every answer. Shrunk to a few
# pixels (the global view) the badge is a gray blob; in a crop its dot is a plain patch of colour.
BADGE_COLORS: dict[str, tuple[int, int, int]] = {
  "red": (225, 30, 30),
  "cyan": (30, 225, 225),
  "green": (40, 190, 40),
  "magenta": (215, 65, 215),
  "blue": (40, 60, 225),
  "yellow": (215, 195, 30),
}


# Check colours (detail="checks", the default): a checkerboard of the answer colour A and its complement 255 - A, in
# square tiles of a few original pixels. The 8-9x downscale to the global view averages every checkerboard to the
# same mid gray (a regular pattern has no energy at the low frequencies a downscale keeps: the global view's plate
# varies by < 1 gray level, whatever the colour); in a crop, shown at the original resolution, the two colours are
# plain. The answers are the six hues from red to teal (0..150 degrees), their complements the six opposite hues
# (cyan..rose): no complement is an answer, so the pair of colours in the crop names the answer.
CHECK_COLORS: dict[str, tuple[int, int, int]] = {
  "red": (255, 0, 0),
  "orange": (255, 128, 0),
  "yellow": (255, 255, 0),
  "lime": (128, 255, 0),
  "green": (0, 255, 0),
  "teal": (0, 255, 128),
}


def _complement(rgb: tuple[int, int, int]) -> tuple[int, int, int]:
  return tuple(255 - v for v in rgb)


DETAILS = ("checks", "strokes", "dot", "badge", "digit")
# detail="strokes": a plate covered with short black strokes at random places, all running one way (or square
# specks of the same ink: "dotted"). Shrunk below a pixel, every plate is the same light gray with the same isotropic
# noise -- unlike colours, which survive the downscale as a colour cast of the noise; in a crop the strokes are a
# few pixels long and their direction is the texture of the whole crop.
STROKES = ("horizontal", "vertical", "rising", "falling", "dotted")


@dataclasses.dataclass(frozen=True)
class SceneConfig:
  """How scenes are drawn. The defaults are the embedded default task."""

  min_size: int = 1344  # image side in pixels (square images): the global view is an 8-9x downscale
  max_size: int = 1536
  grid: int = 3  # cells per side; 3 = one cell per 2 x 2 vision tokens of the 168 px global view
  min_objects: int = 3  # coloured objects (target + distractors), each in its own cell
  max_objects: int = 5
  object_scale: tuple[float, float] = (0.45, 0.6)  # object size / cell
  object_margin: float = 0.02  # least gap between an object and its cell's border / cell
  object_jitter: float = 0.3  # random offset of an object in its cell, as a fraction of the free room (0: centred)
  # The answer-bearing detail: "checks" (a plate checkered in a colour and its complement: the colour; see
  # CHECK_COLORS), "strokes" (a plate of short strokes: which way they run; see STROKES), "dot" (a coloured dot's
  # colour), "badge" (the same dot in a ring of the complementary colour: gray when shrunk), "digit" (a
  # seven-segment digit).
  detail: str = "checks"
  detail_scale: float = 0.07  # detail height / cell: ~3.9 px in the global view, ~11.8 px in a crop of the cell
  plate_scale: float = 0.5  # detail="checks" / "strokes": the textured plate's side / cell
  # detail="checks": a tile's side (rounded to whole original pixels); "strokes": a stroke's length; in pixels of the
  # 168 px global view (0.35: 3 original pixels of a 1344-1536 px scene).
  texture_unit: float = 0.35
  # How the question names the target: "name" (its colour and shape: "the red circle") or "cell" (where it is:
  # "the top left cell"; the model then only has to turn words into a box, not find the object).
  target_by: str = "cell"
  digit_stroke: float = 0.2  # stroke width / digit height (detail="digit")
  clutter: int = 40  # gray background shapes and lines
  clutter_scale: float = 0.25  # largest clutter shape / cell
  # The demonstrator's box: the target's cell shrunk by this fraction of a cell per side (1/3: its central third, a
  # crop of ~170 px shown at ~168 px, i.e. the original resolution, 8-9x the global view's).
  zoom_inset: float = 1 / 3
  decoys: int = 12  # small decoy details (gray digits / coloured badges) in the background
  background: str = "cells"  # position code: "cells" (one R level per column, B per row) | "gradient" (R ~ x, B ~ y)
  system_prompt: str = "short"  # "short" (SHORT_SYSTEM_PROMPT) | "deepeyes" (prompts.SYSTEM_PROMPT, byte-exact)

  def __post_init__(self):
    if not 64 <= self.min_size <= self.max_size:
      raise ValueError(f"need 64 <= min_size <= max_size, got {self.min_size}, {self.max_size}")
    if self.grid < 2 or not 1 <= self.min_objects <= self.max_objects <= min(len(COLORS), self.grid**2):
      raise ValueError(f"need grid >= 2 and 1 <= min_objects <= max_objects <= {len(COLORS)}")
    if self.detail not in DETAILS:
      raise ValueError(f"detail must be one of {DETAILS}, got {self.detail!r}")
    if self.target_by not in ("name", "cell"):
      raise ValueError(f"target_by must be 'name' or 'cell', got {self.target_by!r}")
    if not 0 < self.plate_scale < 1 or self.texture_unit <= 0:
      raise ValueError(f"need 0 < plate_scale < 1 and texture_unit > 0, got {self.plate_scale}, {self.texture_unit}")
    if self.background not in ("cells", "gradient"):
      raise ValueError(f"background must be 'cells' or 'gradient', got {self.background!r}")
    if not 0 <= self.object_jitter <= 1 or not 0 < self.object_scale[0] <= self.object_scale[1] < 1:
      raise ValueError(
        f"need 0 <= object_jitter <= 1 and 0 < object_scale <= 1, got {self.object_jitter}, {self.object_scale}"
      )
    if not 0 <= self.zoom_inset < 0.5:
      raise ValueError(f"zoom_inset must be in [0, 0.5), got {self.zoom_inset}")
    if self.system_prompt not in ("short", "deepeyes"):
      raise ValueError(f"system_prompt must be 'short' or 'deepeyes', got {self.system_prompt!r}")

  @property
  def questions(self) -> tuple[str, ...]:
    by_detail = {"digit": QUESTIONS, "checks": CHECK_QUESTIONS, "strokes": STROKE_QUESTIONS}
    return by_detail.get(self.detail, BADGE_QUESTIONS)

  @property
  def labels(self) -> tuple[str, ...]:
    """Every possible answer."""
    if self.detail == "digit":
      return tuple(str(d) for d in range(10))
    if self.detail == "strokes":
      return STROKES
    return tuple(CHECK_COLORS if self.detail == "checks" else BADGE_COLORS)

  @property
  def system_text(self) -> str:
    return SHORT_SYSTEM_PROMPT if self.system_prompt == "short" else prompts.SYSTEM_PROMPT


@dataclasses.dataclass
class SceneObject:
  color: str
  shape: str
  label: str  # the answer: the digit, or the badge's colour
  cell: tuple[int, int]  # (column, row)
  box: tuple[int, int, int, int]  # the object's box in original pixels


@dataclasses.dataclass
class Scene:
  image: Image.Image
  question: str
  answer: str
  target: int  # index into objects
  objects: list[SceneObject]
  split: str
  index: int
  seed: int
  grid: int = 3

  @property
  def target_box(self) -> tuple[int, int, int, int]:
    return self.objects[self.target].box

  def cell_box(self, cell: tuple[int, int] | None = None) -> tuple[float, float, float, float]:
    """A cell's box in original pixels (the target's by default)."""
    c, r = cell if cell is not None else self.objects[self.target].cell
    size = self.image.size[0] / self.grid
    return (c * size, r * size, (c + 1) * size, (r + 1) * size)


def _rng(seed: int, split: str, index: int) -> np.random.Generator:
  return np.random.default_rng([seed, zlib.crc32(split.encode()), index])


def _seven_segment(draw: ImageDraw.ImageDraw, x: float, y: float, h: float, digit: str, fill, stroke=0.16) -> None:
  """A digit `h` pixels tall with its top-left corner at (x, y); width 0.6 h, stroke `stroke` h."""
  w, t = 0.6 * h, max(1.0, stroke * h)
  half = h / 2
  seg = {
    "a": (x, y, x + w, y + t),
    "d": (x, y + h - t, x + w, y + h),
    "g": (x, y + half - t / 2, x + w, y + half + t / 2),
    "f": (x, y, x + t, y + half),
    "b": (x + w - t, y, x + w, y + half),
    "e": (x, y + half, x + t, y + h),
    "c": (x + w - t, y + half, x + w, y + h),
  }
  for s in _SEGMENTS[digit]:
    x0, y0, x1, y1 = seg[s]
    draw.rectangle((round(x0), round(y0), round(x1) - 1, round(y1) - 1), fill=fill)


def _badge(draw: ImageDraw.ImageDraw, cx: float, cy: float, h: float, color: str, ring: bool = True) -> None:
  """A badge `h` pixels across centred at (cx, cy): a dot of `color`, inside a ring of its complement of equal area
  (`ring`) or alone."""
  ro = h / 2
  ri = ro / math.sqrt(2) if ring else ro
  if ring:
    draw.ellipse((cx - ro, cy - ro, cx + ro, cy + ro), fill=_complement(BADGE_COLORS[color]))
  draw.ellipse((cx - ri, cy - ri, cx + ri, cy + ri), fill=BADGE_COLORS[color])


def _checks(rng: np.random.Generator, img: Image.Image, cx: float, cy: float, side: float, unit: float, color: str):
  """A square plate `side` pixels wide centred at (cx, cy), checkered in CHECK_COLORS[color] and its complement, in
  tiles of round(`unit`) pixels (whole pixels: uneven tiles would beat into coarse bands that survive a downscale),
  at a random phase."""
  px, tile = max(4, round(side)), max(1, round(unit))
  y, x = np.ogrid[0:px, 0:px]
  oy, ox = rng.integers(0, 2 * tile, 2)
  odd = ((y + oy) // tile + (x + ox) // tile) % 2 == 1
  a = np.asarray(CHECK_COLORS[color], np.uint8)
  img.paste(Image.fromarray(np.where(odd[..., None], a, 255 - a)), (round(cx - px / 2), round(cy - px / 2)))


def _stroke_offsets(kind: str, length: float) -> np.ndarray:
  """(K, 2) integer (dy, dx) pixel offsets of one stroke: 2 px wide and `length` px long, centred on the origin; a
  diagonal one is a 2-px staircase of `length` along its diagonal; "dotted": a square speck of the same area."""
  n = max(2, round(length))
  if kind == "dotted":
    side = max(2, round(math.sqrt(2 * n)))
    pts = [(y, x) for y in range(side) for x in range(side)]
  elif kind in ("horizontal", "vertical"):
    pts = [(w, k) for k in range(n) for w in range(2)]
    if kind == "vertical":
      pts = [(x, y) for y, x in pts]
  else:  # image y grows downwards: a rising stroke goes up to the right
    steps = max(2, round(n / math.sqrt(2)))
    sign = -1 if kind == "rising" else 1
    pts = [(sign * k + w, k) for k in range(steps) for w in range(2)]
  pts = np.array(pts, np.int64)
  return pts - (pts.max(0) + pts.min(0)) // 2


def _strokes(rng: np.random.Generator, img: Image.Image, cx: float, cy: float, side: float, unit: float, kind: str):
  """A light square plate `side` pixels wide centred at (cx, cy), covered with black strokes `unit` pixels long
  (`_stroke_offsets`), all of `kind` (STROKES), at random places: as many as make ~30% ink whatever the kind."""
  px = max(4, round(side))
  offsets = _stroke_offsets(kind, unit)
  n = round(0.35 * px * px / len(offsets))
  centres = rng.integers(0, px, (n, 2))
  m = int(np.abs(offsets).max())
  ink = np.zeros((px + 2 * m, px + 2 * m), bool)
  for dy, dx in offsets:  # stamp every stroke at once, one offset at a time
    ink[centres[:, 0] + (m + dy), centres[:, 1] + (m + dx)] = True
  plate = np.where(ink[m : m + px, m : m + px, None], np.uint8(20), np.uint8(235)).repeat(3, -1)
  img.paste(Image.fromarray(plate), (round(cx - px / 2), round(cy - px / 2)))


def _shape(draw: ImageDraw.ImageDraw, shape: str, box: tuple[float, float, float, float], fill) -> None:
  x0, y0, x1, y1 = (round(v) for v in box)
  cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
  if shape == "circle":
    draw.ellipse((x0, y0, x1, y1), fill=fill)
  elif shape == "square":
    draw.rectangle((x0, y0, x1, y1), fill=fill)
  elif shape == "triangle":
    draw.polygon([(cx, y0), (x1, y1), (x0, y1)], fill=fill)
  elif shape == "diamond":
    draw.polygon([(cx, y0), (x1, cy), (cx, y1), (x0, cy)], fill=fill)
  else:
    raise ValueError(f"unknown shape {shape!r}")


def _background(rng: np.random.Generator, size: int, kind: str = "cells", grid: int = 3) -> np.ndarray:
  """(size, size, 3) uint8: a position code (R level says the column, B level the row) plus speckle noise.

  kind="cells": one level per grid column (R) and row (B), 100..180; kind="gradient": faint linear ramps 95..185.
  Muted (G = 140) so that no cell looks like one of the saturated object colours."""
  if kind == "cells":
    ramp = (100 + (80 // max(1, grid - 1)) * (np.arange(size) * grid // size)).astype(np.int16)
  else:
    ramp = (95 + 90 * np.arange(size) / size).astype(np.int16)
  img = np.empty((size, size, 3), np.uint8)
  img[..., 0] = ramp[None, :]
  img[..., 1] = 140 if kind == "cells" else 130
  img[..., 2] = ramp[:, None]
  # Uniform integer speckle in [-20, 20] (std ~12), in uint8 arithmetic (every level is in [95, 185]: no wrap-around):
  # several times cheaper than Gaussian noise in wider types, and scene drawing is on the training path.
  img += rng.integers(0, 41, (size, size), dtype=np.uint8)[..., None]
  img -= 20
  return img


def make_scene(index: int, *, seed: int = 0, split: str = "train", config: SceneConfig = SceneConfig()) -> Scene:
  """The scene `index` of `split` (any string; "train" and "test" by convention). Deterministic."""
  rng = _rng(seed, split, index)
  size = int(rng.integers(config.min_size, config.max_size + 1))
  cell = size / config.grid
  img = Image.fromarray(_background(rng, size, config.background, config.grid))
  draw = ImageDraw.Draw(img)
  for _ in range(config.clutter):  # gray clutter: shapes and lines of random size and shade
    g = int(rng.integers(70, 200))
    x, y = rng.uniform(0, size, 2)
    s = rng.uniform(0.05, config.clutter_scale) * cell
    if rng.random() < 0.3:
      x2, y2 = x + rng.uniform(-2, 2) * cell, y + rng.uniform(-2, 2) * cell
      draw.line((round(x), round(y), round(x2), round(y2)), fill=(g, g, g), width=max(1, round(0.02 * cell)))
    else:
      _shape(draw, SHAPES[int(rng.integers(len(SHAPES)))], (x, y, x + s, y + s), (g, g, g))
  h = config.detail_scale * cell
  unit = config.texture_unit * size / 168  # in original pixels
  for _ in range(config.decoys):  # decoy details in the background: reading "a digit / badge" is not enough
    x, y = rng.uniform(0, size - cell * 0.3, 2)
    if config.detail == "checks":
      _checks(rng, img, x + h / 2, y + h / 2, h, unit, list(CHECK_COLORS)[int(rng.integers(len(CHECK_COLORS)))])
    elif config.detail == "strokes":
      _strokes(rng, img, x + h / 2, y + h / 2, h, unit, STROKES[int(rng.integers(len(STROKES)))])
    elif config.detail != "digit":
      color = list(BADGE_COLORS)[int(rng.integers(len(BADGE_COLORS)))]
      _badge(draw, x + h / 2, y + h / 2, h, color, ring=config.detail == "badge")
    else:
      g = int(rng.integers(40, 120))
      _seven_segment(draw, x, y, h, str(int(rng.integers(10))), (g, g, g))

  n = int(rng.integers(config.min_objects, config.max_objects + 1))
  cells = rng.choice(config.grid**2, size=n, replace=False)
  colors = rng.choice(len(COLORS), size=n, replace=False)
  objects = []
  for k in range(n):
    c, r = divmod(int(cells[k]), config.grid)
    s = rng.uniform(*config.object_scale) * cell
    m = config.object_margin * cell
    room = max(0.0, cell - s - 2 * m)
    x0 = c * cell + m + room / 2 + config.object_jitter * rng.uniform(-room / 2, room / 2)
    y0 = r * cell + m + room / 2 + config.object_jitter * rng.uniform(-room / 2, room / 2)
    color, shape = list(COLORS)[int(colors[k])], SHAPES[int(rng.integers(len(SHAPES)))]
    _shape(draw, shape, (x0, y0, x0 + s, y0 + s), COLORS[color])
    # The detail at the centre of the object's box (inside every shape, triangles included).
    cx, cy = x0 + s / 2, y0 + s / 2
    label = config.labels[int(rng.integers(len(config.labels)))]
    if config.detail == "checks":  # the plate is the detail
      _checks(rng, img, cx, cy, config.plate_scale * cell, unit, label)
    elif config.detail == "strokes":
      _strokes(rng, img, cx, cy, config.plate_scale * cell, unit, label)
    else:  # a white plate carrying the detail
      pw, ph = (1.4 * h, 1.4 * h) if config.detail != "digit" else (1.1 * h, 1.5 * h)
      draw.rectangle((round(cx - pw / 2), round(cy - ph / 2), round(cx + pw / 2), round(cy + ph / 2)), fill=(245,) * 3)
      if config.detail != "digit":
        _badge(draw, cx, cy, h, label, ring=config.detail == "badge")
      else:
        _seven_segment(draw, cx - 0.3 * h, cy - h / 2, h, label, (10, 10, 10), config.digit_stroke)
    box = (math.floor(x0), math.floor(y0), math.ceil(x0 + s), math.ceil(y0 + s))
    objects.append(SceneObject(color=color, shape=shape, label=label, cell=(c, r), box=box))
  target = int(rng.integers(n))
  obj = objects[target]
  questions = config.questions
  template = questions[int(rng.integers(len(questions)))]
  scene = Scene(
    image=img,
    question=template.format(where=_where(obj, config)[1]),
    answer=obj.label,
    target=target,
    objects=objects,
    split=split,
    index=index,
    seed=seed,
    grid=config.grid,
  )
  return scene


# Every template ends with {where}: "on the red circle" (target_by="name") or "in the top left cell" ("cell").
QUESTIONS = (  # detail="digit"
  "What digit is {where}?",
  "Which digit is written {where}?",
  "Read the digit {where}.",
)
BADGE_QUESTIONS = (  # detail="dot" / "badge"
  "What colour is the dot {where}?",
  "Which colour is the dot {where}?",
  "Name the colour of the dot {where}.",
)
STROKE_QUESTIONS = (  # detail="strokes"
  "Which way do the strokes run {where}?",
  "What pattern are the strokes {where}?",
  "Name the direction of the strokes {where}.",
)
CHECK_QUESTIONS = (  # detail="checks"
  "What colour are the checks {where}?",
  "Which colour are the checks {where}?",
  "Name the colour of the checks {where}.",
)


def cell_name(cell: tuple[int, int], grid: int) -> str:
  """ "top left cell" for (0, 0) of a 3 x 3 grid; "row 2, column 4 cell" for other grids."""
  c, r = cell
  if grid == 3:
    return f"{('top', 'middle', 'bottom')[r]} {('left', 'centre', 'right')[c]} cell"
  return f"row {r + 1}, column {c + 1} cell"


def _where(obj: SceneObject, config: SceneConfig) -> tuple[str, str]:
  """(target, where): ("red circle", "on the red circle") or ("top left cell", "in the top left cell")."""
  if config.target_by == "cell":
    target = cell_name(obj.cell, config.grid)
    return target, f"in the {target}"
  return f"{obj.color} {obj.shape}", f"on the {obj.color} {obj.shape}"


# ----------------------------------------------------------------------------------------------------------------
# DeepEyes-format records
# ----------------------------------------------------------------------------------------------------------------
def scene_record(scene: Scene, config: SceneConfig = SceneConfig(), *, tool: bool = True) -> dict[str, Any]:
  """The scene as a DeepEyes-47k record (the image as a PIL object; `write_deepeyes_parquet` encodes it).

  `tool=False`: the no-tool variant (no tool offered; answer from the global view).
  """
  if tool:
    system, user = config.system_text, "<image>\n" + scene.question + prompts.USER_SUFFIX
  else:
    system, user = NO_TOOL_SYSTEM_PROMPT, "<image>\n" + scene.question + NO_TOOL_SUFFIX
  return {
    "data_source": DATA_SOURCE,
    "prompt": [{"role": "system", "content": system}, {"role": "user", "content": user}],
    "images": [scene.image],
    "reward_model": {"ground_truth": scene.answer, "style": "rule"},
    "extra_info": {
      "question": scene.question,
      "answer": scene.answer,
      "index": f"{scene.split}-{scene.seed}-{scene.index}" + ("" if tool else "-notool"),
      "split": scene.split,
      "target_box": json.dumps(list(scene.target_box)),
      "target_cell": json.dumps(list(scene.objects[scene.target].cell)),
      "grid": scene.grid,
      "detail": config.detail,
      "target": _where(scene.objects[scene.target], config)[0],
      "zoom_inset": config.zoom_inset,
      "objects": json.dumps([dataclasses.asdict(o) for o in scene.objects]),
    },
    "ability": "fine-grained perception",
    "env_name": "visual_toolbox_v2" if tool else "",
  }


class SyntheticSource:
  """A grain random-access source of DeepEyes-format records, drawn on the fly (no files).

  `num_records` scenes of `split`; record i is `make_scene(i)`. Records hold PIL images, which
  `deepeyes.decode_example` accepts as they are (no encode/decode round trip).
  """

  def __init__(self, num_records: int, *, seed: int = 0, split: str = "train", config: SceneConfig = SceneConfig()):
    if num_records < 1:
      raise ValueError(f"num_records must be >= 1, got {num_records}")
    self.num_records, self.seed, self.split, self.config = num_records, seed, split, config

  def __len__(self) -> int:
    return self.num_records

  def __getitem__(self, index: int) -> dict[str, Any]:
    index = int(index)
    if not 0 <= index < self.num_records:
      raise IndexError(f"record {index} of {self.num_records}")
    record = scene_record(make_scene(index, seed=self.seed, split=self.split, config=self.config), self.config)
    record[deepeyes.INDEX_KEY], record[deepeyes.FILE_KEY] = index, repr(self)  # where, in error messages
    return record

  def __repr__(self) -> str:
    return f"SyntheticSource({self.num_records} {self.split!r} scenes, seed {self.seed})"


def seen_size(image_size: tuple[int, int], *, min_pixels: int, max_pixels: int) -> tuple[int, int]:
  """(width, height) of the image as the model sees it (smart_resize)."""
  w, h = image_size
  rh, rw = improc.smart_resize(h, w, min_pixels=min_pixels, max_pixels=max_pixels)
  return rw, rh


def cell_box_seen(extra_info: dict, seen: tuple[int, int]) -> list[int]:
  """The target's cell as a box in the frame the model saw (what the demonstrator writes in bbox_2d), shrunk by
  `zoom_inset` of a cell on every side (0: the whole cell; 0.25: its central half, twice the magnification)."""
  c, r = json.loads(extra_info["target_cell"])
  g, inset = int(extra_info["grid"]), float(extra_info.get("zoom_inset", 0.0))
  sw, sh = seen
  return [
    round((c + inset) * sw / g),
    round((r + inset) * sh / g),
    round((c + 1 - inset) * sw / g),
    round((r + 1 - inset) * sh / g),
  ]


# ----------------------------------------------------------------------------------------------------------------
# The scripted teacher of the warm start
# ----------------------------------------------------------------------------------------------------------------
def demonstration(extra_info: dict, seen: tuple[int, int], *, zoom: bool) -> list[str]:
  """The assistant turns (each ending in <|im_end|>) the teacher writes for a scene.

  zoom=True: think, call the zoom tool on the target's cell (in the seen frame, `coordinate_frame="resized"`),
  then answer after the crop. zoom=False: think and answer from the global view (the detail is unreadable there:
  these demonstrations teach the model to guess, as a base model that does not use the tool would).
  """
  answer = extra_info["answer"]
  target = target_name(extra_info)
  if zoom:
    box = cell_box_seen(extra_info, seen)
    call = json.dumps({"name": prompts.TOOL_NAME, "arguments": {"bbox_2d": box}})
    return [
      f"<think>Zoom in on the {target}.</think>\n<tool_call>\n{call}\n</tool_call><|im_end|>",
      f"<think>Now I can read it.</think>\n<answer>{answer}</answer><|im_end|>",
    ]
  return [f"<think>Answer from the full image.</think>\n<answer>{answer}</answer><|im_end|>"]


# Perception exercises (warm-start modes "ground" and "read"): what a pretrained VLM such as Qwen2.5-VL already
# knows -- point at a named object, read a close-up -- and a 1M-parameter model made by code does not. Short
# single-turn examples with no tool and no think/answer format (the format is what the zoom demonstrations teach).
GROUND_QUESTION = "Where is the {target}?"
READ_QUESTIONS = {
  "digit": "What digit is on the plate?",
  "dot": "What colour is the dot on the plate?",
  "badge": "What colour is the dot on the plate?",
  "checks": "What colour are the checks?",
  "strokes": "Which way do the strokes run?",
}


def target_name(extra_info: dict) -> str:
  """How the question names the target: "red circle", "top left cell" (`extra_info["target"]`; for records made
  before that key, parsed from the question: every template ends with "on the {target}")."""
  if "target" in extra_info:
    return extra_info["target"]
  return extra_info["question"].split(" on the ")[-1].rstrip("?.")


def grounding(extra_info: dict, seen: tuple[int, int]) -> tuple[str, list[str]]:
  """(question, [answer turn]): the target's cell as a box in the seen frame, written as the tool's argument."""
  box = cell_box_seen(extra_info, seen)
  return GROUND_QUESTION.format(target=target_name(extra_info)), [json.dumps({"bbox_2d": box}) + "<|im_end|>"]


def reading(image: Image.Image, extra_info: dict, seen: tuple[int, int]) -> tuple[Image.Image, str, list[str]]:
  """(crop, question, [answer turn]): the crop the zoom tool returns for the demonstrator's box (through the real
  protocol, so it is the same pixels), and the answer."""
  call = json.dumps({"name": prompts.TOOL_NAME, "arguments": {"bbox_2d": cell_box_seen(extra_info, seen)}})
  out = protocol.execute_turn(f"<tool_call>\n{call}\n</tool_call>", image, frame="resized", seen_size=seen)
  if out.crop is None:
    raise ValueError(f"the demonstrator's box was rejected by the zoom tool: {out.observation!r}")
  crop = out.crop
  question = READ_QUESTIONS[extra_info.get("detail", "digit")]
  return crop, question, [f"{extra_info['answer']}<|im_end|>"]


def plain_messages(image: Image.Image, question: str) -> list[dict]:
  """A plain VQA prompt (no tool, no answer format) for the perception exercises."""
  return [
    {"role": "system", "content": NO_TOOL_SYSTEM_PROMPT},
    {"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "\n" + question}]},
  ]


def corpus(n: int = 200, seed: int = 0, config: SceneConfig = SceneConfig()) -> list[str]:
  """Texts of the task (prompts, demonstrations, observations) for training the tokenizer: the synthetic model's
  tokenizer merges what this task writes (deterministic)."""
  texts = [config.system_text, NO_TOOL_SYSTEM_PROMPT, NO_TOOL_SUFFIX, prompts.USER_SUFFIX, prompts.SUCCESS_OBSERVATION]
  rng = np.random.default_rng(seed)
  labels = config.labels
  for i in range(n):
    color = list(COLORS)[i % len(COLORS)]
    shape = SHAPES[(i // len(COLORS)) % len(SHAPES)]
    c, r = (int(v) for v in rng.integers(0, config.grid, 2))
    obj = SceneObject(color=color, shape=shape, label=labels[i % len(labels)], cell=(c, r), box=(0, 0, 1, 1))
    target, where = _where(obj, config)
    q = config.questions[i % len(config.questions)].format(where=where)
    info = {"question": q, "answer": obj.label, "target": target, "target_cell": json.dumps([c, r])}
    info["grid"] = config.grid
    texts.append(q + prompts.USER_SUFFIX)
    texts.extend(demonstration(info, (168, 168), zoom=i % 2 == 0))
    texts.extend([GROUND_QUESTION.format(target=target), *grounding(info, (168, 168))[1]])
  texts.append(READ_QUESTIONS[config.detail])
  return texts
