"""PNG grids and per-sample files for training samples, the CLI and the demo."""

from __future__ import annotations

import os
import textwrap
from typing import Optional, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from imagen_jax import fileio


def _font(size: int):
  try:
    return ImageFont.load_default(size=size)
  except TypeError:  # Pillow < 10.1 has one bitmap size
    return ImageFont.load_default()


def grid(images: np.ndarray, captions: Optional[Sequence[str]] = None,
         ncol: int = 0, min_cell: int = 128) -> Image.Image:
  """Tiles uint8 ``[N, H, W, C]`` images, each with its caption underneath.

  Small images are enlarged (nearest neighbour) to at least ``min_cell``
  pixels so captions stay readable; without captions they keep their size.

  Args:
    images: ``[N, H, W, C]`` uint8, C in {1, 3}.
    captions: one string per image, or None.
    ncol: columns (0: about square).
    min_cell: smallest cell width when captions are drawn.

  Returns:
    The grid as a PIL image.
  """
  images = np.asarray(images, np.uint8)
  if images.shape[-1] == 1:
    images = np.repeat(images, 3, -1)
  n, h, w, _ = images.shape
  ncol = ncol or int(np.ceil(np.sqrt(n)))
  nrow = int(np.ceil(n / ncol))
  scale = max(1, -(-min_cell // w)) if captions else 1
  cw, ch = w * scale, h * scale
  font = _font(max(10, cw // 14))
  lines = []
  if captions:
    chars = max(8, int(cw / (font.size * 0.55)))
    lines = [textwrap.wrap(str(c), chars)[:3] for c in captions]
  text_h = (font.size + 2) * max((len(ln) for ln in lines), default=0)
  pad = 2
  out = Image.new("RGB", (ncol * (cw + pad) + pad,
                          nrow * (ch + text_h + pad) + pad), (255, 255, 255))
  draw = ImageDraw.Draw(out)
  for i in range(n):
    r, c = divmod(i, ncol)
    x, y = pad + c * (cw + pad), pad + r * (ch + text_h + pad)
    tile = Image.fromarray(images[i])
    if scale > 1:
      tile = tile.resize((cw, ch), Image.NEAREST)
    out.paste(tile, (x, y))
    for j, line in enumerate(lines[i] if lines else []):
      draw.text((x + 1, y + ch + 1 + j * (font.size + 2)), line, fill=(0, 0, 0),
                font=font)
  return out


def save_grid(images: np.ndarray, path: str,
              captions: Optional[Sequence[str]] = None, ncol: int = 0) -> str:
  """Writes ``grid(images, captions, ncol)`` as a PNG; returns the path."""
  img = grid(images, captions, ncol)
  parent = os.path.dirname(path)
  if parent:
    fileio.makedirs(parent)
  with fileio.open_file(path, "wb") as f:
    img.save(f, format="PNG")
  return path


def save_each(images: np.ndarray, prefix: str) -> list[str]:
  """Writes ``{prefix}_{i:03d}.png`` per image; returns the paths."""
  paths = []
  for i, im in enumerate(np.asarray(images, np.uint8)):
    path = f"{prefix}_{i:03d}.png"
    with fileio.open_file(path, "wb") as f:
      Image.fromarray(im).save(f, format="PNG")
    paths.append(path)
  return paths
