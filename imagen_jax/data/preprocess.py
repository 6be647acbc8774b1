"""Per-stage image preprocessing (host side, numpy/PIL).

decode -> RGB -> resize the shorter side to the stage resolution (area-aware,
anti-aliased) -> center crop -> uint8 ``[R, R, 3]``; SR stages also get the
low-res input by anti-aliased downsampling of that very image, so the pair is
consistent by construction. Optional horizontal flip is off by default:
captions mention left and right.
"""

from __future__ import annotations

import io
from typing import Optional

import numpy as np
from PIL import Image

# PIL's resize is anti-aliased when shrinking (its filter support scales with
# the factor); BICUBIC for quality, reducing_gap speeds up big reductions.
_FILTER = Image.BICUBIC


def image_size(data: bytes) -> tuple[int, int]:
  """(width, height) read from the header only; (0, 0) if unreadable."""
  if not data:
    return 0, 0
  try:
    with Image.open(io.BytesIO(data)) as img:
      return img.size
  except Exception:  # pylint: disable=broad-except
    return 0, 0


def decode_rgb(data: bytes) -> Optional[Image.Image]:
  """Decodes to an RGB PIL image; None for empty or broken bytes."""
  if not data:
    return None
  try:
    img = Image.open(io.BytesIO(data))
    img.load()
  except Exception:  # pylint: disable=broad-except
    return None
  if img.mode != "RGB":
    if img.mode in ("RGBA", "LA", "P"):
      img = img.convert("RGBA")
      bg = Image.new("RGBA", img.size, (255, 255, 255, 255))
      img = Image.alpha_composite(bg, img)
    img = img.convert("RGB")
  return img


def resize_center_crop(img: Image.Image, resolution: int) -> np.ndarray:
  """Shorter side to ``resolution``, then a centered square crop (uint8)."""
  w, h = img.size
  scale = resolution / min(w, h)
  nw, nh = max(resolution, round(w * scale)), max(resolution, round(h * scale))
  if (nw, nh) != (w, h):
    img = img.resize((nw, nh), _FILTER, reducing_gap=3.0)
  left, top = (nw - resolution) // 2, (nh - resolution) // 2
  img = img.crop((left, top, left + resolution, top + resolution))
  return np.asarray(img, np.uint8)


def downsample_image(image: np.ndarray, resolution: int) -> np.ndarray:
  """Anti-aliased downsampling of a uint8 ``[R, R, 3]`` image."""
  if image.shape[0] == resolution:
    return image
  return np.asarray(Image.fromarray(image).resize((resolution, resolution),
                                                  _FILTER), np.uint8)


def preprocess(data: bytes, resolution: int, lowres_resolution: int = 0,
               flip: bool = False) -> Optional[dict[str, np.ndarray]]:
  """Encoded image -> stage inputs, or None when it cannot be decoded.

  Args:
    data: encoded image bytes.
    resolution: stage resolution R.
    lowres_resolution: SR stages: size of the low-res input (0: none).
    flip: mirror horizontally.

  Returns:
    {"image": uint8 [R, R, 3]} plus "lowres" for SR stages, or None.
  """
  img = decode_rgb(data)
  if img is None:
    return None
  image = resize_center_crop(img, resolution)
  if flip:
    image = image[:, ::-1].copy()
  out = {"image": image}
  if lowres_resolution:
    out["lowres"] = downsample_image(image, lowres_resolution)
  return out
