"""A deterministic scene parser for `shapes` images and per-attribute scores.

Parsing: bright pixels are assigned the palette colour of nearest
chromaticity (brightness-normalised RGB, so anti-aliased edges keep their
hue); each colour's pixels are split into 8-connected components; small
specks are dropped; each component's shape is the template (square, circle,
upright triangle, each filling the component's bounding box) with the best
IoU; its size is its bounding box side relative to the image; positions are
centroids.

Scoring against the structured prompt (``Scene.spec``) per attribute where it
applies: color (the prompted colours are present), shape (their objects have
the prompted shapes), count (the number of objects of the prompted colour,
or one per colour), position (the relation between the two objects' centres
holds), size (single objects), and all-correct.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import numpy as np
from scipy import ndimage

from imagen_jax.data import captions

ATTRIBUTES = ("color", "shape", "count", "position", "size")
_PALETTE = np.array(list(captions.COLORS.values()), np.float32)
_NAMES = list(captions.COLORS)
_CHROMA = _PALETTE / np.linalg.norm(_PALETTE, axis=1, keepdims=True)


@dataclasses.dataclass(frozen=True)
class Component:
  color: str
  shape: str
  area: int
  cx: float
  cy: float
  side: float  # sqrt of bounding-box area, in pixels


def _templates(h: int, w: int) -> dict[str, np.ndarray]:
  yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
  cy, cx = (h - 1) / 2, (w - 1) / 2
  circle = ((yy - cy) / (h / 2)) ** 2 + ((xx - cx) / (w / 2)) ** 2 <= 1.0
  # Upright triangle: apex at the top centre, base at the bottom.
  frac = (yy + 0.5) / h
  triangle = np.abs(xx + 0.5 - w / 2) <= frac * w / 2
  return {"square": np.ones((h, w), bool), "circle": circle, "triangle": triangle}


def parse(image: np.ndarray, min_brightness: float = 90.0,
          min_area_frac: float = 0.004) -> list[Component]:
  """Objects found in a uint8 ``[H, W, 3]`` image, largest first."""
  img = image.astype(np.float32)
  h, w, _ = img.shape
  bright = img.max(-1) >= min_brightness
  norm = img / np.maximum(np.linalg.norm(img, axis=-1, keepdims=True), 1e-6)
  label = np.argmax(norm @ _CHROMA.T, axis=-1)
  min_area = max(2, int(min_area_frac * h * w))
  out = []
  for ci, name in enumerate(_NAMES):
    mask = bright & (label == ci)
    comps, n = ndimage.label(mask, structure=np.ones((3, 3)))
    for sl, k in zip(ndimage.find_objects(comps), range(1, n + 1)):
      region = comps[sl] == k
      area = int(region.sum())
      if area < min_area:
        continue
      rh, rw = region.shape
      best, best_iou = "square", -1.0
      for shape, tpl in _templates(rh, rw).items():
        iou = (region & tpl).sum() / max((region | tpl).sum(), 1)
        if iou > best_iou:
          best, best_iou = shape, iou
      ys, xs = np.nonzero(region)
      out.append(Component(name, best, area, float(xs.mean() + sl[1].start),
                           float(ys.mean() + sl[0].start), float(np.sqrt(rh * rw))))
  return sorted(out, key=lambda c: -c.area)


def _of(objs: Sequence[Component], color: str) -> list[Component]:
  return [o for o in objs if o.color == color]


def score(image: np.ndarray, spec: dict, kind: str) -> dict[str, Optional[bool]]:
  """Per-attribute correctness of one image for its prompt (None: n/a)."""
  objs = parse(image)
  res = image.shape[0]
  out: dict[str, Optional[bool]] = {a: None for a in ATTRIBUTES}
  if kind in ("single", "count"):
    mine = _of(objs, spec["color"])
    out["color"] = bool(mine)
    out["shape"] = bool(mine) and sum(o.shape == spec["shape"] for o in mine) * 2 > len(mine)
    if kind == "single":
      out["count"] = len(objs) == 1
      big = mine[0].side / res > 0.375 if mine else None
      out["size"] = bool(mine) and (big == (spec["size"] == "large"))
    else:
      out["count"] = len(mine) == spec["count"]
  else:
    a, b = _of(objs, spec["a"]["color"]), _of(objs, spec["b"]["color"])
    out["color"] = bool(a) and bool(b)
    out["shape"] = (bool(a) and bool(b) and a[0].shape == spec["a"]["shape"]
                    and b[0].shape == spec["b"]["shape"])
    out["count"] = len(a) == 1 and len(b) == 1
    if a and b:
      dx, dy = a[0].cx - b[0].cx, a[0].cy - b[0].cy
      out["position"] = {"to the left of": dx < 0, "to the right of": dx > 0,
                         "above": dy < 0, "below": dy > 0}[spec["relation"]]
    else:
      out["position"] = False
  applicable = [v for v in out.values() if v is not None]
  out["all_correct"] = all(applicable)
  return out


def summarize(results: Sequence[dict], kinds: Sequence[str]) -> dict:
  """Fractions correct per attribute (where applicable), overall and per kind."""
  def frac(rows, key):
    vals = [r[key] for r in rows if r.get(key) is not None]
    return float(np.mean(vals)) if vals else None

  report = {k: frac(results, k) for k in ATTRIBUTES + ("all_correct",)}
  report["n"] = len(results)
  report["by_kind"] = {}
  for kind in sorted(set(kinds)):
    rows = [r for r, k in zip(results, kinds) if k == kind]
    report["by_kind"][kind] = {k: frac(rows, k) for k in ATTRIBUTES + ("all_correct",)}
    report["by_kind"][kind]["n"] = len(rows)
  return report
