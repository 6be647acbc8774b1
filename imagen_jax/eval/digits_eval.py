"""Scores generated digits with a classifier trained on the real scans.

The classifier (an RBF SVM on the 8x8 scans) is trained on the digits'
training split. Images of any size are mapped back to 8x8 the same way for
real and generated ones (greyscale, area downsampling, 0-16 range), so its
accuracy on the real test split rendered at the sample resolution is the
ceiling a generator can reach.
"""

from __future__ import annotations

import functools

import numpy as np
from PIL import Image

from imagen_jax.data import digits


def to_scan(image: np.ndarray) -> np.ndarray:
  """uint8 ``[R, R, 3]`` -> 8x8 floats in 0-16 (area downsampling)."""
  gray = np.asarray(image, np.float32).mean(-1)
  small = Image.fromarray(gray.astype(np.float32), "F").resize((8, 8), Image.BOX)
  return np.clip(np.asarray(small) / 255.0 * 16.0, 0, 16)


@functools.lru_cache(maxsize=4)
def classifier(res: int):
  """SVM trained on training-split scans rendered at ``res`` and mapped back."""
  from sklearn.svm import SVC  # pylint: disable=g-import-not-at-top
  idx = digits.split_indices("train")
  x = np.stack([to_scan(digits.render(digits.scan(int(i))[0], res)).ravel()
                for i in idx])
  y = np.array([digits.scan(int(i))[1] for i in idx])
  return SVC(gamma=0.001, C=10.0).fit(x, y)


def predict(images: np.ndarray) -> np.ndarray:
  """Digit labels of uint8 ``[N, R, R, 3]`` images."""
  clf = classifier(images.shape[1])
  return clf.predict(np.stack([to_scan(im).ravel() for im in images]))


def ceiling(res: int) -> float:
  """Classifier accuracy on the real test split rendered at ``res``."""
  idx = digits.split_indices("test")
  ims = np.stack([digits.render(digits.scan(int(i))[0], res) for i in idx])
  labels = np.array([digits.scan(int(i))[1] for i in idx])
  return float((predict(ims) == labels).mean())


def score(images: np.ndarray, labels: np.ndarray) -> float:
  """Fraction of generated images classified as their prompted digit."""
  return float((predict(images) == np.asarray(labels)).mean())
