"""T5 encoder speed and embedding-store size.

  python benchmarks/t5_embed_speed.py [--sizes=small,base] [--batches=32,128]

For each T5 size (random weights) and batch: captions/s of the jitted
encoder at the paper's 128 tokens, its FLOPs per caption (XLA cost analysis)
and the FLOP/s reached as a fraction of this machine's float32 matmul peak,
measured in the same run. Then the bytes per stored caption of the embedding
store (bfloat16, trimmed to each caption's length) against a padded float32
store at 128 tokens, on captions of the built-in datasets and on longer,
COCO-like ones.

Targets: base at batch 128 >= 50% of matmul FLOP/s; stored bytes per caption
<= 1/3 of the padded float32 store.
"""

from __future__ import annotations

import argparse
import random

import common
import numpy as np

from imagen_jax.data import captions as captions_lib
from imagen_jax.text import store as store_lib
from imagen_jax.text.encoder import TextEncoder, tokenize
from imagen_jax.train import metrics

COCO_LIKE = [
    "A man riding a wave on top of a surfboard.",
    "A kitchen with wooden cabinets and a white refrigerator next to a window.",
    "Two giraffes standing next to each other in a grassy field near trees.",
    "A plate of food with broccoli, rice and a piece of grilled chicken on it.",
    "A red double decker bus driving down a city street past tall buildings.",
]


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--sizes", default="small,base")
  parser.add_argument("--batches", default="32,128")
  parser.add_argument("--length", type=int, default=128)
  args = parser.parse_args()
  print(common.machine_line())
  peak = common.matmul_peak_flops()
  rows = []
  for size in args.sizes.split(","):
    enc = TextEncoder.random(size, seed=0, max_length=args.length,
                             vocab_path="default")
    for batch in (int(b) for b in args.batches.split(",")):
      rs = np.random.RandomState(0)
      ids = rs.randint(3, 1000, (batch, args.length)).astype(np.int32)
      mask = np.ones_like(ids, bool)
      fwd = enc._forward()  # pylint: disable=protected-access
      lowered = fwd.lower(enc.params, ids, mask)
      compiled = lowered.compile()
      flops = metrics.step_flops(lowered)
      secs = common.time_call(lambda: common.block(compiled(enc.params, ids, mask)),
                              repeats=3)
      rows.append([size, batch, batch / secs, flops / batch / 1e9,
                   flops / secs / 1e9, flops / secs / peak])
  print(f"\nT5 encoder at {args.length} tokens, float32, random weights; "
        f"measured matmul peak {peak / 1e9:.1f} GFLOP/s")
  common.print_table(["T5", "batch", "captions/s", "GFLOP/caption", "GFLOP/s",
                      "of matmul peak"], rows)

  # Stored bytes per caption.
  enc = TextEncoder.random("base", seed=0, max_length=128, vocab_path="default")
  sets = {
      "built-in (shapes/digits)": captions_lib.caption_corpus(random.Random(0), 200),
      "COCO-like": COCO_LIKE,
  }
  rows = []
  for name, caps in sets.items():
    ids, mask, _ = tokenize(enc.vocab, caps, 128)
    lengths = mask.sum(1)
    stored = np.mean([len(store_lib.encode_record(
        str(i), c, b"", np.zeros((n, enc.d_model), np.float32), n))
        for i, (c, n) in enumerate(zip(caps, lengths))])
    padded = 128 * enc.d_model * 4
    rows.append([name, float(lengths.mean()), stored, padded, stored / padded])
  print("\nBytes per stored caption (T5-base width 768; the ratio is the same "
        "for any width): bf16 trimmed record vs padded float32 at 128 tokens")
  common.print_table(["captions", "mean tokens", "stored bytes",
                      "padded f32 bytes", "ratio"], rows)


if __name__ == "__main__":
  main()
