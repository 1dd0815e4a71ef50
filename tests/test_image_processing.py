"""deepeyes_jax.processing.image against transformers' Qwen2VLImageProcessorPil (the ground truth)."""

import warnings

import numpy as np
import pytest
from hostile_images import png_bytes as _png_bytes
from hostile_images import png_header_only
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from transformers import Qwen2VLImageProcessorPil
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as hf_smart_resize

from deepeyes_jax.processing import image as improc

SMALL_MAX = 64 * 28 * 28


def _noise(h, w, channels=3, seed=0, dtype=np.uint8, high=256):
  rng = np.random.default_rng(seed)
  shape = (h, w, channels) if channels > 1 else (h, w)
  return rng.integers(0, high, shape, dtype=dtype)


def _rgb(h, w, seed=0):
  return Image.fromarray(_noise(h, w, 3, seed), mode="RGB")


def _palette_with_transparency(h, w):
  img = Image.fromarray(_noise(h, w, 1, seed=3, high=16), mode="L").convert("P")
  img.info["transparency"] = 5  # palette index 5 is transparent -> composited onto white
  return img


CASES = {
  "tiny_5x7_upscaled": (lambda: _rgb(5, 7), improc.MIN_PIXELS, improc.MAX_PIXELS),
  "wide_20x3000": (lambda: _rgb(20, 3000, 1), improc.MIN_PIXELS, improc.MAX_PIXELS),
  "tall_3000x20": (lambda: _rgb(3000, 20, 2), improc.MIN_PIXELS, improc.MAX_PIXELS),
  # 199:1 with a side that rounds to 0 -> transformers' upscaling branch (qwen_vl_utils differs)
  "ratio_199_10x1990": (lambda: _rgb(10, 1990, 3), improc.MIN_PIXELS, improc.MAX_PIXELS),
  "ratio_199.9_15x2999": (lambda: _rgb(15, 2999, 4), improc.MIN_PIXELS, improc.MAX_PIXELS),
  "exact_56x56_at_min": (lambda: _rgb(56, 56, 5), improc.MIN_PIXELS, improc.MAX_PIXELS),
  "exact_224x448": (lambda: _rgb(224, 448, 6), improc.MIN_PIXELS, improc.MAX_PIXELS),
  "odd_333x517": (lambda: _rgb(333, 517, 7), improc.MIN_PIXELS, improc.MAX_PIXELS),
  "above_max_1000x1500": (lambda: _rgb(1000, 1500, 8), improc.MIN_PIXELS, SMALL_MAX),
  "hf_default_min_31x45": (lambda: _rgb(31, 45, 9), 56 * 56, SMALL_MAX),
  "rgba_100x150": (lambda: Image.fromarray(_noise(100, 150, 4, 10), mode="RGBA"), improc.MIN_PIXELS, SMALL_MAX),
  "gray_L_97x61": (lambda: Image.fromarray(_noise(97, 61, 1, 11), mode="L"), improc.MIN_PIXELS, SMALL_MAX),
  "palette_transparency_40x50": (lambda: _palette_with_transparency(40, 50), improc.MIN_PIXELS, SMALL_MAX),
  "uint16_30x40": (
    lambda: Image.fromarray(_noise(30, 40, 1, 12, np.uint16, 600)),  # mode I;16, saturates at 255
    improc.MIN_PIXELS,
    SMALL_MAX,
  ),
}


@pytest.mark.parametrize("name", list(CASES))
def test_preprocess_matches_transformers(name):
  make, min_pixels, max_pixels = CASES[name]
  img = make()
  hf = Qwen2VLImageProcessorPil(size={"shortest_edge": min_pixels, "longest_edge": max_pixels})
  expected = hf(images=img, return_tensors="np")

  pixel_values, grid_thw = improc.preprocess(img, min_pixels=min_pixels, max_pixels=max_pixels)

  assert pixel_values.dtype == np.float32 and grid_thw.dtype == np.int64
  assert grid_thw.shape == (3,)
  np.testing.assert_array_equal(grid_thw, expected["image_grid_thw"][0])
  assert pixel_values.shape == expected["pixel_values"].shape == (grid_thw[1] * grid_thw[2], 1176)
  np.testing.assert_allclose(pixel_values, expected["pixel_values"], rtol=0, atol=1e-5)
  assert improc.num_image_tokens(grid_thw) * 4 == pixel_values.shape[0]


_pixels = st.sampled_from([56 * 56, improc.MIN_PIXELS, 256 * 28 * 28])
_max_pixels = st.sampled_from([SMALL_MAX, 28 * 28 * 1280, improc.MAX_PIXELS])
_side = st.integers(1, 40_000)


@settings(max_examples=400, deadline=None)
@given(
  h=_side,
  w=_side,
  near_limit=st.booleans(),
  min_pixels=_pixels,
  max_pixels=_max_pixels,
)
def test_smart_resize_matches_transformers(h, w, near_limit, min_pixels, max_pixels):
  if near_limit:
    h = h % 200 + 1
    w = h * 200 + (w % 21) - 10  # aspect ratios straddling 200
  try:
    expected = hf_smart_resize(h, w, factor=28, min_pixels=min_pixels, max_pixels=max_pixels)
  except ValueError:
    with pytest.raises(improc.ImageError, match=f"{w}x{h}"):
      improc.smart_resize(h, w, 28, min_pixels, max_pixels)
    return
  assert improc.smart_resize(h, w, 28, min_pixels, max_pixels) == expected


def test_smart_resize_defaults_are_deepeyes():
  assert (improc.MIN_PIXELS, improc.MAX_PIXELS) == (4 * 28 * 28, 16384 * 28 * 28)
  # 5000x5000 is 25M px: capped by the DeepEyes max (12.8M), not by the HF default (1M). Note 3556, not
  # sqrt(MAX_PIXELS) = 3584: 5000 / (5000 / 3584) / 28 is 127.99999... in floats and gets floored.
  assert improc.smart_resize(5000, 5000) == hf_smart_resize(5000, 5000, 28, 4 * 784, 16384 * 784) == (3556, 3556)


def test_aspect_ratio_limit():
  assert improc.smart_resize(1, 200) == hf_smart_resize(1, 200, 28, improc.MIN_PIXELS, improc.MAX_PIXELS)
  for h, w in [(1, 201), (201, 1), (3, 700)]:
    with pytest.raises(improc.ImageError, match=f"{w}x{h}"):
      improc.smart_resize(h, w)
  with pytest.raises(improc.ImageError, match=r"'wide.png'.*402x2.*201"):
    improc.preprocess(Image.new("RGB", (402, 2)), source="wide.png")


def test_patchify_is_block_major():
  rng = np.random.default_rng(0)
  gh, gw = 4, 6
  chw = rng.standard_normal((3, gh * 14, gw * 14)).astype(np.float32)
  pixel_values, grid_thw = improc.patchify(chw)
  np.testing.assert_array_equal(grid_thw, [1, gh, gw])
  assert pixel_values.shape == (gh * gw, 1176) and pixel_values.dtype == np.float32
  for row in range(gh * gw):
    block, (in_r, in_c) = divmod(row, 4)[0], divmod(row % 4, 2)
    ph, pw = (block // (gw // 2)) * 2 + in_r, (block % (gw // 2)) * 2 + in_c
    patch = chw[:, ph * 14 : (ph + 1) * 14, pw * 14 : (pw + 1) * 14]
    got = pixel_values[row].reshape(3, 2, 14, 14)  # (C, T, P, P)
    np.testing.assert_array_equal(got[:, 0], patch)
    np.testing.assert_array_equal(got[:, 1], patch)


def test_normalize_values_and_layout():
  rgb = np.array([[[0, 128, 255], [255, 255, 255]]], dtype=np.uint8)  # (H=1, W=2, C=3)
  out = improc.normalize(rgb)
  assert out.shape == (3, 1, 2) and out.dtype == np.float32
  mean, std = np.array(improc.IMAGE_MEAN), np.array(improc.IMAGE_STD)
  np.testing.assert_allclose(out[:, 0, 0], (np.array([0, 128, 255]) / 255 - mean) / std, atol=1e-6)
  np.testing.assert_allclose(out[:, 0, 1], (1 - mean) / std, atol=1e-6)


@pytest.mark.parametrize("h,w", [(5, 7), (28, 28), (333, 517), (10, 1990), (4000, 3000)])
def test_num_image_tokens_matches_transformers(h, w):
  hf = Qwen2VLImageProcessorPil(size={"shortest_edge": improc.MIN_PIXELS, "longest_edge": improc.MAX_PIXELS})
  rh, rw = improc.smart_resize(h, w)
  grid = [1, rh // 14, rw // 14]
  assert improc.num_image_tokens(grid) == hf.get_number_of_image_patches(h, w) // 4


def test_num_image_tokens_formula():
  assert improc.num_image_tokens(np.array([1, 4, 6])) == 6
  assert improc.num_image_tokens([2, 4, 6]) == 12
  assert improc.num_image_tokens([1, 4, 6], merge_size=1) == 24


def test_load_image_sources_agree(tmp_path):
  img = _rgb(33, 47, seed=20)
  data = _png_bytes(img)
  path = tmp_path / "x.png"
  path.write_bytes(data)
  for src in (str(path), path, data, bytearray(data), img):
    out = improc.load_image(src)
    assert out.mode == "RGB" and out.size == (47, 33)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(img))


def test_load_image_composites_alpha_onto_white():
  rgba = np.zeros((2, 2, 4), dtype=np.uint8)
  rgba[..., :3] = (10, 20, 30)
  rgba[0, 0, 3] = 0  # fully transparent -> white
  rgba[0, 1, 3] = 255  # opaque -> unchanged
  out = np.asarray(improc.load_image(_png_bytes(Image.fromarray(rgba, mode="RGBA"))))
  np.testing.assert_array_equal(out[0, 0], [255, 255, 255])
  np.testing.assert_array_equal(out[0, 1], [10, 20, 30])
  gray = improc.load_image(Image.fromarray(np.full((3, 3), 77, np.uint8), mode="L"))
  assert gray.mode == "RGB" and np.all(np.asarray(gray) == 77)


def test_undecodable_input_names_source(tmp_path):
  with pytest.raises(improc.ImageError, match="<bytes>"):
    improc.load_image(b"definitely not an image")
  bad = tmp_path / "bad.jpg"
  bad.write_bytes(b"\xff\xd8 garbage")
  with pytest.raises(improc.ImageError, match="bad.jpg"):
    improc.load_image(bad)
  with pytest.raises(improc.ImageError, match="missing.png"):
    improc.load_image(tmp_path / "missing.png")
  truncated = _png_bytes(_rgb(64, 64))[:400]
  with pytest.raises(improc.ImageError, match="<bytes>"):
    improc.load_image(truncated)


def test_empty_image_rejected():
  with pytest.raises(improc.ImageError, match="0x5"):
    improc.load_image(Image.new("RGB", (0, 5)))
  with pytest.raises(improc.ImageError, match="'blank'.*7x0"):
    improc.preprocess(Image.new("RGB", (7, 0)), source="blank")


def test_decompression_bomb_rejected():
  limit_before = Image.MAX_IMAGE_PIXELS
  # Beyond PIL's own hard limit (2 * MAX_IMAGE_PIXELS): PIL's DecompressionBombError -> ImageError.
  with pytest.raises(improc.ImageError, match="<bytes>"):
    improc.load_image(png_header_only(30_000, 30_000))
  # Our limit is checked from the header, before decoding (the data here is empty).
  with pytest.raises(improc.ImageError, match="3000x2000.*max_decoded_pixels=1000000"):
    improc.load_image(png_header_only(3000, 2000), max_decoded_pixels=10**6)
  # The limit is exact on a real image.
  data = _png_bytes(_rgb(64, 64))
  with pytest.raises(improc.ImageError, match="64x64"):
    improc.load_image(data, max_decoded_pixels=64 * 64 - 1)
  assert improc.load_image(data, max_decoded_pixels=64 * 64).size == (64, 64)
  assert Image.MAX_IMAGE_PIXELS == limit_before  # no global change leaks


def test_pil_bomb_warning_does_not_escape():
  # 10000x10000 is between PIL's warning (MAX_IMAGE_PIXELS) and error (2x) thresholds and under ours,
  # so it gets past the size checks and then fails to decode (no pixel data) -- without a warning.
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    with pytest.raises(improc.ImageError, match="cannot decode"):
      improc.load_image(png_header_only(10_000, 10_000))
  assert not [w for w in caught if issubclass(w.category, Image.DecompressionBombWarning)]


def test_check_resizable_is_the_limit_smart_resize_applies():
  improc.check_resizable(2, 400)  # 200:1 is allowed
  assert improc.smart_resize(2, 400)
  for h, w in ((2, 402), (402, 2), (0, 5), (5, 0)):
    with pytest.raises(improc.ImageSizeError):
      improc.check_resizable(h, w)
    with pytest.raises(improc.ImageSizeError):
      improc.smart_resize(h, w)
  with pytest.raises(improc.ImageSizeError, match="'thin'.*aspect ratio 201.0 exceeds 200"):
    improc.preprocess(Image.new("RGB", (402, 2)), source="thin")


def test_probe_image_reads_the_header_and_applies_the_processors_limits(tmp_path):
  assert improc.probe_image(_png_bytes(_rgb(30, 40))) == (40, 30)
  path = tmp_path / "ok.png"
  path.write_bytes(_png_bytes(_rgb(8, 9)))
  assert improc.probe_image(path) == (9, 8) and improc.probe_image(_rgb(3, 4)) == (4, 3)
  # A decompression bomb: PIL's own limit, and ours, both from the header (nothing is decoded).
  with pytest.raises(improc.ImageSizeError, match="<bytes>: refusing to decode"):
    improc.probe_image(png_header_only(16384, 16384))
  with pytest.raises(improc.ImageSizeError, match="max_decoded_pixels=1000000"):
    improc.probe_image(png_header_only(3000, 2000), max_decoded_pixels=10**6)
  with pytest.raises(improc.ImageSizeError, match="ok2.png.*aspect ratio"):
    (tmp_path / "ok2.png").write_bytes(_png_bytes(Image.new("RGB", (402, 2))))
    improc.probe_image(tmp_path / "ok2.png")
  with pytest.raises(improc.ImageError, match="<bytes>") as info:
    improc.probe_image(b"\x89PNG\r\n\x1a\n not a png")
  assert not isinstance(info.value, improc.ImageSizeError)
  corrupt = bytearray(_png_bytes(_rgb(16, 16)))
  corrupt[-20] ^= 0xFF  # a chunk checksum no longer matches: verify() fails
  with pytest.raises(improc.ImageError):
    improc.probe_image(bytes(corrupt))
