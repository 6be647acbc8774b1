"""Batch sources for training: the embedding store, and the synthetic one.

``StoreSource`` reads the training-ready records the embed job wrote (image
bytes + stored T5 embeddings) as one deterministic stream: epoch e visits the
store's usable examples in a pseudo-random order keyed by (seed, e) — a
Feistel permutation, so shuffling needs no buffer and no O(N) memory and is
as good at LAION scale as on 1,000 examples. Global batch p holds stream
positions ``[p * B, (p + 1) * B)``; process i decodes its slice of it. Images
whose shorter side is below the stage's minimum (or that are missing or
broken) are filtered out up front, from the sizes the embed job recorded,
and counted.
"""

from __future__ import annotations

import logging
from typing import Callable, Optional

import numpy as np

from imagen_jax.data import pipeline
from imagen_jax.data import preprocess
from imagen_jax.text import store as store_lib


def _round(x: np.ndarray, key: np.uint64, bits: int) -> np.ndarray:
  """One Feistel round function on ``bits``-bit halves (splitmix-style mix)."""
  mask = np.uint64((1 << bits) - 1)
  z = (x.astype(np.uint64) + key) * np.uint64(0x9E3779B97F4A7C15)
  z ^= z >> np.uint64(31)
  z *= np.uint64(0xBF58476D1CE4E5B9)
  z ^= z >> np.uint64(29)
  return z & mask


def feistel_permutation(i: np.ndarray, n: int, seed: int, rounds: int = 6
                        ) -> np.ndarray:
  """A pseudo-random bijection of [0, n) evaluated at ``i`` (vectorised).

  A balanced Feistel network on the smallest even number of bits covering n,
  with cycle-walking to stay inside [0, n).

  Args:
    i: indices in [0, n).
    n: domain size.
    seed: permutation key.
    rounds: Feistel rounds.

  Returns:
    The permuted indices, same shape as ``i``.
  """
  if n <= 1:
    return np.zeros_like(i)
  half = max(1, (int(n - 1).bit_length() + 1) // 2)
  mask = np.uint64((1 << half) - 1)
  keys = [np.uint64(k) for k in np.random.default_rng([seed, 0x5EED]).integers(
      0, 2**63, rounds)]
  x = np.asarray(i, np.uint64)
  out = np.empty_like(x)
  todo = np.arange(x.size)
  cur = x.reshape(-1).copy()
  with np.errstate(over="ignore"):
    while todo.size:
      left, right = cur >> np.uint64(half), cur & mask
      for k in keys:
        left, right = right, left ^ _round(right, k, half)
      cur = (left << np.uint64(half)) | right
      inside = cur < np.uint64(n)
      out.reshape(-1)[todo[inside]] = cur[inside]
      todo, cur = todo[~inside], cur[~inside]
  return out.astype(np.int64)


class StoreSource:
  """Stage batches from an embedding store (see module docstring)."""

  def __init__(self, store: store_lib.EmbeddingStore, *, resolution: int,
               global_batch: int, seed: int = 0, lowres_resolution: int = 0,
               min_size: int = 0, flip: bool = False, text_len: int = 0,
               process_index: int = 0, process_count: int = 1):
    self.store = store
    self.resolution = resolution
    self.lowres_resolution = lowres_resolution
    self.global_batch = global_batch
    self.seed = seed
    self.flip = flip
    self.text_len = text_len or store.max_length
    self.start, self.stop = pipeline.local_range(global_batch, process_index,
                                                 process_count)
    min_size = min_size or 1
    self.usable = np.nonzero(store.sides >= min_size)[0].astype(np.int64)
    self.filtered = int(len(store) - len(self.usable))
    if not len(self.usable):
      raise ValueError(f"Embedding store {store.path!r} has no image with a "
                       f"shorter side >= {min_size} px (of {len(store)}); "
                       "lower data.min_size or use larger images.")
    if self.filtered:
      logging.info("data: %d of %d examples filtered (no image, broken, or "
                   "shorter side < %d px).", self.filtered, len(store), min_size)

  def __len__(self) -> int:
    return len(self.usable)

  def stream_indices(self, positions: np.ndarray) -> np.ndarray:
    """Store indices at stream positions (epoch-wise pseudo-random order)."""
    n = len(self.usable)
    positions = np.asarray(positions, np.int64)
    epochs, within = positions // n, positions % n
    out = np.empty_like(positions)
    for e in np.unique(epochs):
      sel = epochs == e
      out[sel] = self.usable[feistel_permutation(within[sel], n,
                                                 self.seed * 1_000_003 + int(e))]
    return out

  def local_batch(self, position: int) -> dict[str, np.ndarray]:
    pos = position * self.global_batch + np.arange(self.start, self.stop)
    records = self.store.get_many(self.stream_indices(pos))
    # Random flips (when enabled) are a function of the stream position.
    flips = (np.random.default_rng([self.seed, 0xF11B, position]).random(
        self.global_batch)[self.start:self.stop] < 0.5) & self.flip
    images, lows = [], []
    for rec, flip in zip(records, flips):
      out = preprocess.preprocess(rec["image"], self.resolution,
                                  self.lowres_resolution, bool(flip))
      if out is None:  # the size check passed but decoding failed: rare
        out = {"image": np.zeros((self.resolution,) * 2 + (3,), np.uint8)}
        if self.lowres_resolution:
          out["lowres"] = np.zeros((self.lowres_resolution,) * 2 + (3,), np.uint8)
      images.append(out["image"])
      if self.lowres_resolution:
        lows.append(out["lowres"])
    text, mask = self.store.padded_text(records, self.text_len)
    batch = {"image": np.stack(images), "text": text, "text_mask": mask}
    if self.lowres_resolution:
      batch["lowres"] = np.stack(lows)
    return batch


def make_source(config, workdir: str, encode_fn: Optional[Callable] = None,
                process_index: int = 0, process_count: int = 1):
  """The batch source a config asks for.

  ``data.source == "synthetic"`` builds ``SyntheticSource`` (captions encoded
  with ``encode_fn``); every other source means "the embedding store built
  from it" (``data.store`` or ``WORKDIR/embeddings``).
  """
  res = int(config.resolution)
  low = int(config.lowres_resolution)
  if config.data.source == "synthetic":
    return pipeline.SyntheticSource(
        resolution=res, lowres_resolution=low,
        global_batch=int(config.batch_size), encode_fn=encode_fn,
        seed=int(config.seed), process_index=process_index,
        process_count=process_count, num_examples=int(config.data.num_examples))
  from imagen_jax import embed  # pylint: disable=g-import-not-at-top
  path = embed.store_path(config, workdir)
  store = store_lib.EmbeddingStore(path)
  return StoreSource(store, resolution=res, lowres_resolution=low,
                     global_batch=int(config.batch_size), seed=int(config.seed),
                     min_size=int(config.data.min_size) or res,
                     flip=bool(config.data.flip),
                     text_len=int(config.text.max_length),
                     process_index=process_index, process_count=process_count)
