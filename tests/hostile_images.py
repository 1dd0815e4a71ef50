"""Hostile image files made by code, for the loaders' tests: a PNG whose header claims a huge size (a decompression
bomb: PIL reads the size lazily, so nothing is decoded), and a real image with an aspect ratio above the processor's
limit of 200."""

import io
import struct
import zlib

from PIL import Image


def png_header_only(w: int, h: int) -> bytes:
  """A PNG that claims w x h but carries (almost) no pixel data: PIL reads the size lazily."""

  def chunk(tag, data):
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

  ihdr = struct.pack(">IIBBBBB", w, h, 1, 0, 0, 0, 0)  # 1-bit grayscale
  return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def bomb_png() -> bytes:
  """A PNG whose header claims 16384 x 16384 (~268M) pixels: beyond PIL's own limit (DecompressionBombError)."""
  return png_header_only(16384, 16384)


def thin_image(w: int = 402, h: int = 2) -> Image.Image:
  """A real (decodable) image with aspect ratio w / h (default 201 > 200): smart_resize refuses it."""
  return Image.new("RGB", (w, h), (200, 30, 30))


def png_bytes(img: Image.Image) -> bytes:
  buf = io.BytesIO()
  img.save(buf, format="PNG")
  return buf.getvalue()
