"""`digits`: scikit-learn's handwritten digits (real scans), upscaled and captioned.

The 1797 8x8 greyscale scans (values 0-16) that ship with scikit-learn,
upscaled (bicubic) to the stage resolution as white-on-black RGB images and
captioned "a handwritten digit seven". The split is fixed: a stratified
80/20 train/test split with seed 0 (1437 / 360 images).
"""

from __future__ import annotations

import functools

import numpy as np
from PIL import Image

from imagen_jax.data import captions


@functools.lru_cache(maxsize=1)
def _data():
  from sklearn.datasets import load_digits  # pylint: disable=g-import-not-at-top
  from sklearn.model_selection import train_test_split  # pylint: disable=g-import-not-at-top
  d = load_digits()
  idx = np.arange(len(d.target))
  train, test = train_test_split(idx, test_size=0.2, random_state=0,
                                 stratify=d.target)
  return d.images.astype(np.float32), d.target.astype(np.int64), {
      "train": np.sort(train), "test": np.sort(test)}


def split_indices(split: str) -> np.ndarray:
  """Indices (into scikit-learn's order) of a split."""
  return _data()[2][split]


def scan(index: int) -> tuple[np.ndarray, int]:
  """The raw 8x8 scan (0-16 floats) and its label."""
  images, labels, _ = _data()
  return images[index], int(labels[index])


def render(scan8: np.ndarray, res: int) -> np.ndarray:
  """An 8x8 scan as a uint8 ``[res, res, 3]`` white-on-black image."""
  gray = np.clip(scan8 / 16.0 * 255.0, 0, 255).astype(np.uint8)
  big = Image.fromarray(gray, "L").resize((res, res), Image.BICUBIC)
  return np.repeat(np.asarray(big, np.uint8)[..., None], 3, axis=-1)


def example(split: str, i: int, res: int) -> tuple[str, int, np.ndarray]:
  """The i-th example of a split: (caption, label, image)."""
  idx = split_indices(split)[i]
  s, label = scan(int(idx))
  return captions.digit_caption(label), label, render(s, res)
