"""Qwen2.5-VL image preprocessing in NumPy + PIL (no torch), as used by DeepEyes.

A port of ``transformers.Qwen2VLImageProcessorPil`` (transformers 5.x) that reproduces its
output bit for bit:

1. RGB: images with alpha (an ``"A"`` band, or a palette/``transparency`` entry) are composited
   onto white; everything else goes through PIL's ``convert("RGB")``. That means 16-bit images
   saturate at 255 rather than being scaled, exactly as in transformers.
2. ``smart_resize`` to multiples of ``factor = patch_size * merge_size`` (28) with at most
   ``max_pixels`` and at least ``min_pixels`` pixels, resampled with PIL bicubic.
3. ``x / 255`` computed in float64 and then cast to float32, then ``(x - mean) / std`` in float32
   with the OpenAI-CLIP mean/std.
4. ``patchify`` into rows of ``C * T * P * P = 3 * 2 * 14 * 14 = 1176`` floats.

Patch order ("block-major"). The vision tower merges each ``merge x merge`` (2x2) group of
neighbouring patches into one LLM token, so the rows are *not* in raster order over the
``(grid_h, grid_w)`` patch grid. They are in raster order over the ``(grid_h/2, grid_w/2)``
merge blocks, and inside a block in raster order over its 2x2 patches::

    row = ((block_row * (grid_w // 2) + block_col) * 2 + in_row) * 2 + in_col

so every 4 consecutive rows form one merged token. Each row is ``(C, T, P, P)`` flattened:
channel-major, then the temporal slot (a still image is copied into both ``T = 2`` slots because
the Conv3d patch embedding expects two frames), then the 14x14 pixels in row-major order.
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import warnings
from collections.abc import Sequence

import numpy as np
from PIL import Image

PATCH_SIZE = 14
MERGE_SIZE = 2
TEMPORAL_PATCH_SIZE = 2
# qwen_vl_utils / DeepEyes defaults (the HF processor's own defaults are 56*56 and 28*28*1280).
MIN_PIXELS = 4 * 28 * 28
MAX_PIXELS = 16384 * 28 * 28
MAX_RATIO = 200
# Refuse to decode images larger than this (~268M px, ~800 MB as RGB): a guard against
# decompression bombs that does not touch the process-wide PIL.Image.MAX_IMAGE_PIXELS.
MAX_DECODED_PIXELS = 2**28
IMAGE_MEAN = (0.48145466, 0.4578275, 0.40821073)  # OPENAI_CLIP_MEAN
IMAGE_STD = (0.26862954, 0.26130258, 0.27577711)  # OPENAI_CLIP_STD

ImageSource = str | os.PathLike | bytes | bytearray | memoryview | Image.Image


class ImageError(ValueError):
  """A bad image: undecodable, empty, too large, or with an aspect ratio above 200."""


class ImageSizeError(ImageError):
  """An image whose size the processor refuses: empty, more pixels than ``max_decoded_pixels`` (a decompression
  bomb), or an aspect ratio above ``MAX_RATIO`` (``check_resizable``)."""


def check_resizable(height: int, width: int) -> None:
  """Raises ImageSizeError unless ``smart_resize`` accepts an image of ``height x width``: both sides > 0 and an
  aspect ratio of at most ``MAX_RATIO`` (200). The one check ``smart_resize`` and the data loaders share, so a
  loader skips exactly the images the processor would refuse mid-rollout."""
  if height <= 0 or width <= 0:
    raise ImageSizeError(f"image size {width}x{height} (WxH) is empty")
  if max(height, width) / min(height, width) > MAX_RATIO:
    raise ImageSizeError(
      f"image size {width}x{height} (WxH): aspect ratio "
      f"{max(height, width) / min(height, width):.1f} exceeds {MAX_RATIO}"
    )


def smart_resize(
  height: int,
  width: int,
  factor: int = PATCH_SIZE * MERGE_SIZE,
  min_pixels: int = MIN_PIXELS,
  max_pixels: int = MAX_PIXELS,
) -> tuple[int, int]:
  """Target ``(height, width)``: multiples of ``factor``, pixel count in about
  ``[min_pixels, max_pixels]``, aspect ratio kept as well as possible.

  Same arithmetic as ``transformers...qwen2_vl.smart_resize``. Note that, unlike
  ``qwen_vl_utils``, a side that rounds to 0 is not bumped to ``factor`` first: the zero area
  sends it through the upscaling branch instead (e.g. 10x1990 -> 28x812, not 28x1988).
  Raises ImageSizeError (an ImageError, a ValueError) for an empty size or an aspect ratio above 200
  (``check_resizable``).
  """
  check_resizable(height, width)
  h_bar = round(height / factor) * factor
  w_bar = round(width / factor) * factor
  if h_bar * w_bar > max_pixels:
    beta = math.sqrt((height * width) / max_pixels)
    h_bar = max(factor, math.floor(height / beta / factor) * factor)
    w_bar = max(factor, math.floor(width / beta / factor) * factor)
  elif h_bar * w_bar < min_pixels:
    beta = math.sqrt(min_pixels / (height * width))
    h_bar = math.ceil(height * beta / factor) * factor
    w_bar = math.ceil(width * beta / factor) * factor
  return h_bar, w_bar


def _source_name(src: object) -> str:
  if isinstance(src, (str, os.PathLike)):
    return repr(os.fspath(src))
  if isinstance(src, (bytes, bytearray, memoryview)):
    return "<bytes>"
  return repr(getattr(src, "filename", "") or "<PIL image>")


def _check_size(img: Image.Image, name: str, max_decoded_pixels: int) -> None:
  w, h = img.size
  if w <= 0 or h <= 0:
    raise ImageSizeError(f"{name}: image size {w}x{h} (WxH) is empty")
  if w * h > max_decoded_pixels:
    raise ImageSizeError(
      f"{name}: image size {w}x{h} (WxH) = {w * h} px exceeds max_decoded_pixels={max_decoded_pixels}"
    )


def to_rgb(img: Image.Image) -> Image.Image:
  """Convert to mode "RGB" the way transformers' ``convert_to_rgb`` does: composite any
  transparency onto white, otherwise plain ``convert("RGB")``."""
  if "A" in img.getbands() or img.info.get("transparency") is not None:
    rgba = img.convert("RGBA")
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(white, rgba).convert("RGB")
  return img.convert("RGB")


def _open(src: ImageSource, name: str) -> Image.Image:
  """``Image.open`` of a path or encoded bytes (the header only: nothing is decoded yet), errors as ImageError naming
  the source; PIL's DecompressionBombError (beyond ``2 * Image.MAX_IMAGE_PIXELS``) as ImageSizeError."""
  if isinstance(src, (bytes, bytearray, memoryview)):
    fp = io.BytesIO(bytes(src))
  elif isinstance(src, (str, os.PathLike)):
    fp = os.fspath(src)
  else:
    raise TypeError(f"expected a path, bytes or PIL image, got {type(src).__name__}")
  try:
    with warnings.catch_warnings():
      warnings.simplefilter("ignore", Image.DecompressionBombWarning)
      return Image.open(fp)
  except Image.DecompressionBombError as e:
    raise ImageSizeError(f"{name}: refusing to decode, {e}") from e
  except FileNotFoundError as e:
    raise ImageError(f"{name}: no such file") from e
  except Exception as e:  # PIL plugins raise OSError, SyntaxError, ValueError, struct.error...
    raise ImageError(f"{name}: cannot decode image: {type(e).__name__}: {e}") from e


def load_image(src: ImageSource, *, max_decoded_pixels: int = MAX_DECODED_PIXELS) -> Image.Image:
  """Decode a path, encoded bytes or a PIL image into an RGB PIL image.

  Raises ImageError, naming the source, for unreadable/undecodable data, and ImageSizeError (an ImageError) for
  empty images and images above ``max_decoded_pixels`` (checked from the header, before decoding). PIL's own
  DecompressionBombError (beyond ``2 * Image.MAX_IMAGE_PIXELS``) is also turned into ImageSizeError; its
  DecompressionBombWarning is silenced here since our limit supersedes it. The aspect ratio is not checked here
  (``check_resizable``). EXIF orientation is not applied (neither transformers' processor nor qwen_vl_utils does).
  """
  name = _source_name(src)
  if isinstance(src, Image.Image):
    _check_size(src, name, max_decoded_pixels)
    return to_rgb(src)
  with _open(src, name) as img:
    _check_size(img, name, max_decoded_pixels)
    try:
      img.load()  # decode now so truncated/corrupt data fails here, with the source named
      return to_rgb(img)
    except Exception as e:
      raise ImageError(f"{name}: cannot decode image: {type(e).__name__}: {e}") from e


def probe_image(src: ImageSource, *, max_decoded_pixels: int = MAX_DECODED_PIXELS) -> tuple[int, int]:
  """``(width, height)`` of an image the processor accepts, read from its header without decoding the pixels.

  Raises ImageError naming the source for data that is not an image (PIL's ``verify``: a bad header or chunk
  checksum), and ImageSizeError for a size the processor refuses: empty, above ``max_decoded_pixels`` (a
  decompression bomb) or an aspect ratio above ``MAX_RATIO`` (``check_resizable``). What the benchmark loaders run
  on every image at load time, so such an item is skipped and counted instead of failing mid-rollout."""
  name = _source_name(src)
  pil = isinstance(src, Image.Image)
  with contextlib.nullcontext(src) if pil else _open(src, name) as img:
    _check_size(img, name, max_decoded_pixels)
    w, h = img.size
    try:
      check_resizable(h, w)
    except ImageSizeError as e:
      raise ImageSizeError(f"{name}: {e}") from None
    if not pil:
      try:
        img.verify()
      except Exception as e:
        raise ImageError(f"{name}: not a readable image: {type(e).__name__}: {e}") from e
  return w, h


def normalize(rgb: np.ndarray, mean: Sequence[float] = IMAGE_MEAN, std: Sequence[float] = IMAGE_STD) -> np.ndarray:
  """uint8 (H, W, C) -> float32 (C, H, W) holding ``(x / 255 - mean) / std``."""
  chw = np.moveaxis(np.asarray(rgb), -1, 0)
  # transformers multiplies by 1/255 in float64 and only then casts; all-float32 differs by 1 ulp.
  x = (chw.astype(np.float64) * (1 / 255)).astype(np.float32)
  mean32 = np.asarray(mean, dtype=np.float32)[:, None, None]
  std32 = np.asarray(std, dtype=np.float32)[:, None, None]
  return (x - mean32) / std32


def patchify(
  image: np.ndarray,
  patch_size: int = PATCH_SIZE,
  temporal_patch_size: int = TEMPORAL_PATCH_SIZE,
  merge_size: int = MERGE_SIZE,
) -> tuple[np.ndarray, np.ndarray]:
  """float32 (C, H, W) -> (pixel_values float32 (N, C*T*P*P), grid_thw int64 (3,)) with
  N = (H/P) * (W/P) rows in block-major order (see the module docstring).

  H and W must be multiples of ``patch_size * merge_size``.
  """
  c, h, w = image.shape
  factor = patch_size * merge_size
  if h % factor or w % factor:
    raise ValueError(f"image size {w}x{h} (WxH) is not a multiple of {factor}")
  gh, gw, m, p, t = h // patch_size, w // patch_size, merge_size, patch_size, temporal_patch_size
  x = np.asarray(image, dtype=np.float32).reshape(c, gh // m, m, p, gw // m, m, p)
  x = x.transpose(1, 4, 2, 5, 0, 3, 6)  # (gh/m, gw/m, m, m, C, P, P)
  # A still image fills every temporal slot with the same frame.
  x = np.broadcast_to(x[:, :, :, :, :, None], (*x.shape[:5], t, p, p))
  pixel_values = x.reshape(gh * gw, c * t * p * p)  # copies: broadcast view is not contiguous
  return pixel_values, np.array([1, gh, gw], dtype=np.int64)


def preprocess(
  pil_image: Image.Image,
  min_pixels: int = MIN_PIXELS,
  max_pixels: int = MAX_PIXELS,
  patch_size: int = PATCH_SIZE,
  temporal_patch_size: int = TEMPORAL_PATCH_SIZE,
  merge_size: int = MERGE_SIZE,
  *,
  source: str | None = None,
) -> tuple[np.ndarray, np.ndarray]:
  """PIL image -> (pixel_values float32 (N, 1176), grid_thw int64 (3,) = [1, H/14, W/14]).

  N = grid_h * grid_w; the LLM sees ``num_image_tokens(grid_thw) = N / 4`` tokens.
  ``source`` only names the image in ImageError messages (default: its filename, if any).
  """
  if not isinstance(pil_image, Image.Image):
    raise TypeError(f"preprocess expects a PIL image, got {type(pil_image).__name__}")
  name = repr(source) if source is not None else _source_name(pil_image)
  w, h = pil_image.size
  try:
    rh, rw = smart_resize(h, w, patch_size * merge_size, min_pixels, max_pixels)
  except ImageError as e:
    raise type(e)(f"{name}: {e}") from None
  rgb = to_rgb(pil_image).resize((rw, rh), Image.Resampling.BICUBIC)
  return patchify(normalize(np.asarray(rgb)), patch_size, temporal_patch_size, merge_size)


def num_image_tokens(grid_thw: Sequence[int] | np.ndarray, merge_size: int = MERGE_SIZE) -> int:
  """Number of LLM tokens (merged patches) for one image: ``t * h * w // merge_size**2``."""
  t, h, w = (int(v) for v in grid_thw)
  return t * h * w // merge_size**2
