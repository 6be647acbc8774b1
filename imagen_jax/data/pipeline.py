"""Training input: deterministic batch sources indexed by position, prefetched.

A *batch source* maps a position (how many global batches came before) to
this process's share of that global batch. Being a pure function of the
position (and the seed), a source is resumed exactly by saving one integer in
the checkpoint: no example is repeated or skipped after a restart. Each
process builds the examples ``[pi * b, (pi + 1) * b)`` of every global batch
(``b = global_batch / process_count``); ``jax.make_array_from_process_local_data``
assembles the global array on the data axes.

Batches are dicts of numpy arrays, batch-major (see ``imagen_jax.stage``).
"""

from __future__ import annotations

import collections
import concurrent.futures
from typing import Callable, Protocol

import numpy as np


class BatchSource(Protocol):
  """What the training loop reads from."""

  def local_batch(self, position: int) -> dict[str, np.ndarray]:
    """This process's share of global batch number ``position``."""


def local_range(global_batch: int, process_index: int, process_count: int
                ) -> tuple[int, int]:
  """The slice [start, stop) of each global batch that a process builds."""
  if global_batch % process_count:
    raise ValueError(f"batch_size {global_batch} is not divisible by the "
                     f"{process_count} processes; use a multiple of it.")
  per = global_batch // process_count
  return process_index * per, (process_index + 1) * per


def downsample(images: np.ndarray, factor: int) -> np.ndarray:
  """Box-filter (area) downsampling of uint8 ``[B, H, W, C]`` by ``factor``.

  The area filter is the anti-aliased downsampling for integer factors.
  """
  if factor == 1:
    return images
  b, h, w, c = images.shape
  x = images.reshape(b, h // factor, factor, w // factor, factor, c)
  return np.round(x.astype(np.float32).mean(axis=(2, 4))).astype(np.uint8)


class SyntheticSource:
  """Deterministic synthetic scenes with real captions (tests, ``configs/tiny.py``).

  Example g (global index) is one square of a palette colour and size at a
  position drawn from ``(seed, g)`` on a black background, captioned "a large
  red square". The captions are encoded once, at construction, by the run's
  real text encoder (a small random-weight T5 in tests), so checkpoints
  trained on this source can be sampled from text like any other.
  """

  def __init__(self, *, resolution: int, global_batch: int, encode_fn,
               seed: int = 0, lowres_resolution: int = 0,
               process_index: int = 0, process_count: int = 1,
               num_examples: int = 0):
    from imagen_jax.data import captions  # pylint: disable=g-import-not-at-top
    self.resolution = resolution
    self.lowres_resolution = lowres_resolution
    self.global_batch = global_batch
    self.seed = seed
    self.num_examples = num_examples  # 0: an endless stream
    self.start, self.stop = local_range(global_batch, process_index,
                                        process_count)
    self.colors = list(captions.COLORS.items())
    self.sizes = list(captions.SIZES)
    self.captions = [captions.object_phrase(c, "square", s)
                     for c, _ in self.colors for s in self.sizes]
    emb, mask = encode_fn(self.captions)
    self._emb = np.asarray(emb, np.float32)
    self._mask = np.asarray(mask, bool)

  def example(self, g: int) -> dict[str, np.ndarray]:
    """The g-th example of the stream."""
    if self.num_examples:
      g %= self.num_examples
    rng = np.random.default_rng([self.seed, g])
    r = self.resolution
    ci = int(rng.integers(len(self.colors)))
    si = int(rng.integers(len(self.sizes)))
    side = r // 4 if si == 0 else r // 2
    y, x = rng.integers(0, r - side + 1, 2)
    img = np.zeros((r, r, 3), np.uint8)
    img[y:y + side, x:x + side] = self.colors[ci][1]
    k = ci * len(self.sizes) + si
    return {"image": img, "text": self._emb[k], "text_mask": self._mask[k]}

  def local_batch(self, position: int) -> dict[str, np.ndarray]:
    base = position * self.global_batch
    exs = [self.example(base + k) for k in range(self.start, self.stop)]
    batch = {k: np.stack([e[k] for e in exs]) for k in exs[0]}
    if self.lowres_resolution:
      batch["lowres"] = downsample(batch["image"],
                                   self.resolution // self.lowres_resolution)
    return batch


class Prefetcher:
  """Prepares the batches of the next positions on worker threads.

  Decoding images in numpy/PIL releases the GIL, so a few threads keep a
  2-core host ahead of the device; order is preserved.
  """

  def __init__(self, fn: Callable[[int], dict], start: int, depth: int = 2,
               workers: int = 2):
    self._fn = fn
    self._next = start
    self._depth = max(depth, 1)
    self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=workers)
    self._queue: collections.deque = collections.deque()
    self._fill()

  def _fill(self):
    while len(self._queue) < self._depth:
      self._queue.append((self._next, self._pool.submit(self._fn, self._next)))
      self._next += 1

  def get(self, position: int) -> dict:
    """The batch at ``position`` (must be requested in order)."""
    pos, fut = self._queue.popleft()
    if pos != position:
      raise RuntimeError(f"Prefetcher out of order: asked {position}, has {pos}.")
    self._fill()
    return fut.result()

  def close(self):
    self._pool.shutdown(wait=False, cancel_futures=True)
