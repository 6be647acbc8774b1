"""Input pipeline throughput per host: examples/s of the training reader.

  python benchmarks/input_speed.py [--examples=512]

Builds embedding stores of synthetic photos-like images (smooth noise,
JPEG or PNG) with 24 x 256 stored embeddings, then times
``StoreSource.local_batch`` (read, decode, resize/crop, low-res for SR,
text padding) alone and through the training loop's ``Prefetcher`` with 1,
2 and 4 worker threads, for the demo's stages and a 256 px SR stage fed from
512 px JPEGs. The last column compares with what the stage's train step
consumes on this machine (images/s from benchmarks/train_speed.py and the
demo's logs): above 1 the step is not starved.

Target: the prefetched reader delivers more examples/s than the step eats.
"""

from __future__ import annotations

import argparse
import io
import os
import tempfile
import time

import common
import numpy as np
from PIL import Image

from imagen_jax.data import pipeline
from imagen_jax.data import sources
from imagen_jax.text import store as store_lib

D_MODEL, TEXT_LEN = 256, 24


def _image(rs, size, fmt):
  small = rs.randint(0, 255, (8, 8, 3)).astype(np.uint8)
  img = Image.fromarray(small).resize((size, size), Image.BICUBIC)
  buf = io.BytesIO()
  img.save(buf, fmt, quality=90) if fmt == "JPEG" else img.save(buf, fmt)
  return buf.getvalue()


def build_store(path: str, n: int, size: int, fmt: str) -> store_lib.EmbeddingStore:
  rs = np.random.RandomState(0)
  writer = store_lib.StoreWriter(path, 0)
  per_shard = 256
  for k in range(0, n, per_shard):
    recs, sides = [], []
    for i in range(k, min(n, k + per_shard)):
      length = rs.randint(6, TEXT_LEN)
      recs.append(store_lib.encode_record(
          f"ex{i}", "a caption", _image(rs, size, fmt),
          rs.randn(length, D_MODEL).astype(np.float32), length))
      sides.append(size)
    writer.write_shard(k // per_shard, recs, sides)
  writer.mark_done(writer.shard_stats(TEXT_LEN))
  store_lib.finalize(path, 1, text_encoder={"config": {"d_model": D_MODEL}},
                     d_model=D_MODEL, max_length=TEXT_LEN, task="bench")
  return store_lib.EmbeddingStore(path)


def measure(store, res, low, batch, workers, batches):
  src = sources.StoreSource(store, resolution=res, lowres_resolution=low,
                            global_batch=batch, text_len=TEXT_LEN)
  if workers == 0:
    t = time.perf_counter()
    for p in range(batches):
      src.local_batch(p)
    return batch * batches / (time.perf_counter() - t)
  pre = pipeline.Prefetcher(src.local_batch, 0, depth=2 * workers,
                            workers=workers)
  pre.get(0)
  t = time.perf_counter()
  for p in range(1, batches + 1):
    pre.get(p)
  rate = batch * batches / (time.perf_counter() - t)
  pre.close()
  return rate


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--examples", type=int, default=512)
  args = parser.parse_args()
  print(common.machine_line())
  # (name, stored size, format, stage res, low-res, batch, step images/s)
  # step images/s: demo base ~95, demo SR ~28 (logs of imagen-demo on this
  # machine), the 32-wide 64 px SR step (sr256:cpu base_channels=32) from
  # train_speed (~23 img/s).
  cases = [("demo base 16px (64px PNG)", 64, "PNG", 16, 0, 32, 95.0),
           ("demo SR 16->64 (64px PNG)", 64, "PNG", 64, 16, 8, 28.0),
           ("SR 64->256 (512px JPEG)", 512, "JPEG", 256, 64, 8, None)]
  rows = []
  with tempfile.TemporaryDirectory() as tmp:
    stores = {}
    for name, size, fmt, res, low, batch, need in cases:
      key = (size, fmt)
      if key not in stores:
        stores[key] = build_store(os.path.join(tmp, f"{size}{fmt}"),
                                  args.examples, size, fmt)
      store = stores[key]
      batches = max(4, min(args.examples // batch, 32))
      for workers in (0, 1, 2, 4):
        rate = measure(store, res, low, batch, workers, batches)
        rows.append([name, "serial" if workers == 0 else f"prefetch x{workers}",
                     batch, rate, "-" if need is None else rate / need])
  print("\nStoreSource.local_batch examples/s on one host (2 cores); last "
        "column: examples/s / the stage's train-step images/s on this machine.")
  common.print_table(["stage (stored images)", "reader", "batch",
                      "examples/s", "headroom vs step"], rows)


if __name__ == "__main__":
  main()
