"""Per-stage alignment diagnostics: where a cascade loses what its prompts say.

Every row scores images of the final resolution with the same evaluator, so
the rows compare directly:

  ceiling                  the ground-truth scenes rendered at the final
                           resolution: what the evaluator can score at best.
  base_resolution_ceiling  the ground truth squeezed through the base stage's
                           resolution (downsampled as training data is, then
                           bicubic back up): what a perfect base stage gives
                           with a plain interpolating super-resolution.
  sr_only                  the last super-resolution stage fed the *real*
                           low-res images (the ground truth downsampled) and
                           the prompts: the SR stage alone.
  base_only                the base stage's samples, bicubic up to the final
                           resolution: the base stage alone.
  cascade                  the whole cascade, as users sample it.

Only the ``shapes`` suite has ground-truth scenes; for ``digits`` the
classifier's ceiling on real scans stands in for the first two rows.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from PIL import Image

from imagen_jax.data import preprocess
from imagen_jax.data import shapes

ROWS = ("ceiling", "base_resolution_ceiling", "sr_only", "base_only", "cascade")
# Columns of the printed table: key in a summary row -> header.
COLUMNS = {"all_correct": "all", "color": "color", "shape": "shape",
           "count": "count", "position": "pos", "size": "size",
           "relation_position": "rel.pos", "holdout_all_correct": "held-out",
           "accuracy": "digit"}


def resize_bicubic(images: np.ndarray, resolution: int) -> np.ndarray:
  """uint8 ``[N, r, r, 3]`` -> ``[N, R, R, 3]`` by PIL bicubic (no-op if r == R)."""
  if images.shape[1] == resolution:
    return images
  return np.stack([np.asarray(Image.fromarray(im).resize(
      (resolution, resolution), Image.BICUBIC), np.uint8) for im in images])


def reference_images(prompts: Sequence, data, resolution: int) -> np.ndarray:
  """Ground-truth images of shapes prompts at ``resolution``, uint8 ``[P, R, R, 3]``.

  Rendered at the dataset's render resolution and resized exactly as the
  training pipeline resizes them (``preprocess.downsample_image``).

  Args:
    prompts: ``suite.Prompt`` list whose ``scene`` is set.
    data: the ``config.data`` section the suite was built from.
    resolution: output size.

  Returns:
    The images.
  """
  render_res = int(data.render_resolution)
  out = []
  for p in prompts:
    if p.scene is None:
      raise ValueError(f"Prompt {p.text!r} has no ground-truth scene; only the "
                       "shapes suite has them.")
    img = shapes.render(p.scene, render_res)
    out.append(preprocess.downsample_image(img, resolution))
  return np.stack(out)


def through_resolution(images: np.ndarray, low: int) -> np.ndarray:
  """Downsamples as the data pipeline does, then bicubic back to full size."""
  res = images.shape[1]
  small = np.stack([preprocess.downsample_image(im, low) for im in images])
  return resize_bicubic(small, res)


def headline(scored: dict) -> dict:
  """The figures a diagnostics row reports, from a ``suite.score_*`` result."""
  if "digits" in scored:
    d = scored["digits"]
    return {"accuracy": d["accuracy"], "n": d["n"]}
  row = {k: v for k, v in scored["shapes"].items() if k != "by_kind"}
  cats = scored["by_category"]
  row["relation_position"] = cats.get("relation", {}).get("position")
  row["holdout_all_correct"] = cats.get("holdout", {}).get("all_correct")
  return row


def format_table(rows: dict) -> str:
  """The diagnostics as an aligned text table (one line per row, ROWS order)."""
  rows = {k: rows[k] for k in sorted(rows, key=lambda k: (
      ROWS.index(k) if k in ROWS else len(ROWS), k))}
  cols = [c for c in COLUMNS if any(r.get(c) is not None for r in rows.values())]
  name_w = max(len(n) for n in rows) + 2
  lines = ["stage diagnostics".ljust(name_w)
           + "".join(f"{COLUMNS[c]:>9s}" for c in cols) + "      n"]
  for name, r in rows.items():
    cells = "".join(f"{r[c]:9.2f}" if r.get(c) is not None else f"{'-':>9s}"
                    for c in cols)
    lines.append(name.ljust(name_w) + cells + f"{r.get('n', 0):7d}")
  return "\n".join(lines)
