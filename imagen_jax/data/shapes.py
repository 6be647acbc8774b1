"""`shapes`: procedurally rendered scenes with compositional captions.

Scenes come in three kinds, each with a plain-English caption:

  single    one object: "a small red circle"
  count     1-3 objects of one colour and shape: "two blue squares"
  relation  two objects: "a red circle to the left of a blue square"

Attributes: 6 colours (``captions.COLORS``), 3 shapes (circle, square,
triangle), 2 sizes (small = 1/4, large = 1/2 of the image side for single
objects), counts 1-3 and 4 relations. Everything is a pure function of
(seed, index), so any number of examples is reproducible. A *holdout* (e.g.
"red triangle,blue circle") removes those colour-shape combinations from
the training split; the ``holdout`` split holds exactly them, to measure
compositional generalisation.

Rendering is 4x supersampled and box-downsampled (smooth edges, exact
palette colours inside objects) on a black background.
"""

from __future__ import annotations

import dataclasses
import random
from typing import Optional

import numpy as np
from PIL import Image, ImageDraw

from imagen_jax.data import captions

KINDS = ("single", "count", "relation")
SUPERSAMPLE = 4


@dataclasses.dataclass(frozen=True)
class Obj:
  """One object: colour, shape, centre (x, y) and side length, in pixels."""
  color: str
  shape: str
  cx: float
  cy: float
  side: float


@dataclasses.dataclass(frozen=True)
class Scene:
  """A scene and the structured prompt it was drawn for."""
  kind: str
  objects: tuple[Obj, ...]
  caption: str
  spec: dict  # kind-specific ground truth for evaluators


def parse_holdout(holdout: str) -> frozenset[tuple[str, str]]:
  """"red triangle,blue circle" -> {("red", "triangle"), ("blue", "circle")}."""
  out = set()
  for item in filter(None, (s.strip() for s in holdout.split(","))):
    parts = item.split()
    if len(parts) != 2 or parts[0] not in captions.COLORS or parts[1] not in captions.SHAPES:
      raise ValueError(f"holdout item {item!r} is not '<color> <shape>' with "
                       f"color in {list(captions.COLORS)} and shape in "
                       f"{list(captions.SHAPES)}.")
    out.add((parts[0], parts[1]))
  return frozenset(out)


def _place(rng: random.Random, side: float, res: int, taken: list[Obj],
           region: Optional[tuple[float, float, float, float]] = None
           ) -> tuple[float, float]:
  """A centre for an object of ``side`` that overlaps nothing in ``taken``."""
  x0, y0, x1, y1 = region or (0, 0, res, res)
  half = side / 2 + 1
  for _ in range(200):
    cx = rng.uniform(x0 + half, x1 - half)
    cy = rng.uniform(y0 + half, y1 - half)
    if all(abs(cx - o.cx) > (side + o.side) / 2 + 2 or
           abs(cy - o.cy) > (side + o.side) / 2 + 2 for o in taken):
      return cx, cy
  return (x0 + x1) / 2, (y0 + y1) / 2


def sample_scene(rng: random.Random, res: int, kind: Optional[str] = None,
                 allowed=None) -> Scene:
  """Draws one scene.

  Args:
    rng: random source.
    res: image size in pixels.
    kind: "single", "count" or "relation" (random when None).
    allowed: predicate (color, shape) -> bool restricting combinations.

  Returns:
    The scene with its caption and ground truth.
  """
  allowed = allowed or (lambda c, s: True)
  combos = [(c, s) for c in captions.COLORS for s in captions.SHAPES if allowed(c, s)]
  kind = kind or rng.choice(KINDS)
  if kind == "single":
    color, shape = rng.choice(combos)
    size = rng.choice(captions.SIZES)
    side = res * (0.25 if size == "small" else 0.5)
    cx, cy = _place(rng, side, res, [])
    obj = Obj(color, shape, cx, cy, side)
    return Scene(kind, (obj,), captions.object_phrase(color, shape, size),
                 {"color": color, "shape": shape, "size": size, "count": 1})
  if kind == "count":
    color, shape = rng.choice(combos)
    count = rng.choice((1, 2, 3))
    side = res * 0.22
    objs: list[Obj] = []
    for _ in range(count):
      cx, cy = _place(rng, side, res, objs)
      objs.append(Obj(color, shape, cx, cy, side))
    return Scene(kind, tuple(objs),
                 captions.object_phrase(color, shape, count=count),
                 {"color": color, "shape": shape, "count": count})
  # relation: two distinct colours so the parser can tell them apart
  a = rng.choice(combos)
  b = rng.choice([cb for cb in combos if cb[0] != a[0]])
  relation = rng.choice(captions.RELATIONS)
  side = res * 0.3
  half = res / 2
  # A in one half, B in the opposite one, along the relation's axis.
  regions = {
      "to the left of": ((0, 0, half, res), (half, 0, res, res)),
      "to the right of": ((half, 0, res, res), (0, 0, half, res)),
      "above": ((0, 0, res, half), (0, half, res, res)),
      "below": ((0, half, res, res), (0, 0, res, half)),
  }[relation]
  ax, ay = _place(rng, side, res, [], regions[0])
  oa = Obj(a[0], a[1], ax, ay, side)
  bx, by = _place(rng, side, res, [oa], regions[1])
  ob = Obj(b[0], b[1], bx, by, side)
  return Scene(kind, (oa, ob), captions.relation_caption(a, relation, b),
               {"a": {"color": a[0], "shape": a[1]}, "relation": relation,
                "b": {"color": b[0], "shape": b[1]}})


def render(scene: Scene, res: int) -> np.ndarray:
  """Draws a scene as uint8 ``[res, res, 3]``."""
  s = SUPERSAMPLE
  img = Image.new("RGB", (res * s, res * s), captions.BACKGROUND)
  draw = ImageDraw.Draw(img)
  for o in scene.objects:
    fill = captions.COLORS[o.color]
    x0, y0 = (o.cx - o.side / 2) * s, (o.cy - o.side / 2) * s
    x1, y1 = (o.cx + o.side / 2) * s, (o.cy + o.side / 2) * s
    if o.shape == "circle":
      draw.ellipse((x0, y0, x1, y1), fill=fill)
    elif o.shape == "square":
      draw.rectangle((x0, y0, x1, y1), fill=fill)
    else:  # upright triangle filling its box
      draw.polygon([(o.cx * s, y0), (x1, y1), (x0, y1)], fill=fill)
  return np.asarray(img.resize((res, res), Image.BOX), np.uint8)


def scene(seed: int, index: int, res: int, split: str = "train",
          holdout: frozenset = frozenset(), kind: Optional[str] = None) -> Scene:
  """Scene ``index`` of a split (no rendering). Pure function of its args.

  "train" excludes held-out colour-shape pairs; "test" draws from all of
  them (new scenes: different seeds); "holdout" draws single-object scenes
  made only of held-out pairs.
  """
  salt = {"train": 0, "test": 1, "holdout": 2}[split]
  rng = random.Random(f"{seed}/{salt}/{index}")
  if split == "train":
    allowed = lambda c, s: (c, s) not in holdout  # noqa: E731
  elif split == "holdout":
    if not holdout:
      raise ValueError("the holdout split needs a non-empty holdout.")
    allowed = lambda c, s: (c, s) in holdout  # noqa: E731
    kind = kind or "single"
  else:
    allowed = None
  return sample_scene(rng, res, kind, allowed)


def example(seed: int, index: int, res: int, split: str = "train",
            holdout: frozenset = frozenset(), kind: Optional[str] = None
            ) -> tuple[Scene, np.ndarray]:
  """Example ``index`` of a split: (scene, image); see ``scene``."""
  sc = scene(seed, index, res, split, holdout, kind)
  return sc, render(sc, res)
