"""Prompt suites of the alignment benchmark and their scoring.

``shapes`` suite, one category per question:
  single    one object of a seen colour-shape pair ("a small red circle")
  count     1-3 objects ("two blue squares")
  relation  two objects and a relation ("a red circle above a green square")
  holdout   single objects of the colour-shape pairs held out of training:
            prompts never seen in training (compositional generalisation)
Every prompt carries ``seen``: whether its exact caption occurs in the
training split. Scenes come from the dataset's test / holdout splits (the
same generator and seed as the data), so the suite is fixed by the config.

``digits`` suite: "a handwritten digit seven", the same number of prompts
per digit, scored by the classifier trained on the real scans.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import numpy as np

from imagen_jax.data import captions
from imagen_jax.data import shapes


@dataclasses.dataclass(frozen=True)
class Prompt:
  text: str
  category: str
  spec: dict
  kind: str = ""      # shapes: scene kind the parser scores against
  seen: bool = False  # the exact caption occurs in the training split
  # shapes: the ground-truth scene the prompt was drawn from (diagnostics
  # render it); None for suites without one.
  scene: Optional[shapes.Scene] = dataclasses.field(default=None,
                                                    compare=False)


def _train_captions(data) -> set[str]:
  holdout = shapes.parse_holdout(data.holdout)
  n = int(data.num_examples) or 10000
  res = int(data.render_resolution)
  return {shapes.scene(int(data.render_seed), i, res, "train", holdout).caption
          for i in range(n)}


def shapes_suite(data, per_category: int,
                 suite_seed: Optional[int] = None) -> list[Prompt]:
  """The shapes prompt suite for a ``config.data`` section (source shapes).

  Args:
    data: the dataset section (holdout, render seed and resolution).
    per_category: prompts per category.
    suite_seed: draw the prompts with this seed instead of the dataset's:
      another suite of the same grammar. Which captions count as seen in
      training still follows the dataset's own seed.

  Returns:
    The prompts, category by category.
  """
  holdout = shapes.parse_holdout(data.holdout)
  res = int(data.render_resolution)
  seed = int(data.render_seed) if suite_seed is None else int(suite_seed)
  seen = _train_captions(data)
  out = []
  for kind in shapes.KINDS:
    for i in range(per_category):
      sc = shapes.scene(seed, i, res, "test", kind=kind)
      # the test split draws from every pair; held-out pairs get their own
      # category, so redraw those here
      j = 0
      while holdout and any((o.color, o.shape) in holdout for o in sc.objects):
        j += 1
        sc = shapes.scene(seed, 1_000_000 * j + i, res, "test", kind=kind)
      out.append(Prompt(sc.caption, kind, sc.spec, kind, sc.caption in seen,
                        sc))
  if holdout:
    for i in range(per_category):
      sc = shapes.scene(seed, i, res, "holdout", holdout)
      out.append(Prompt(sc.caption, "holdout", sc.spec, sc.kind,
                        sc.caption in seen, sc))
  return out


def digits_suite(per_digit: int) -> list[Prompt]:
  """``per_digit`` prompts for each digit 0-9."""
  return [Prompt(captions.digit_caption(d), "digit", {"digit": d})
          for d in range(10) for _ in range(per_digit)]


def suite_for(data, per_category: int,
              suite_seed: Optional[int] = None) -> list[Prompt]:
  """The suite of a dataset (``config.data.source`` shapes or digits).

  ``suite_seed`` draws another shapes suite of the same grammar (see
  ``shapes_suite``); the digits suite has no randomness.
  """
  if data.source == "shapes":
    return shapes_suite(data, per_category, suite_seed)
  if data.source == "digits":
    return digits_suite(per_category)   # per_category prompts per digit
  raise ValueError(f"No alignment suite for data.source {data.source!r}; the "
                   "benchmark covers the built-in datasets shapes and digits.")


def score_shapes(images: np.ndarray, prompts: Sequence[Prompt]) -> dict:
  """Per-prompt scores and summaries: overall, per category, unseen prompts."""
  from imagen_jax.eval import shapes_eval  # pylint: disable=g-import-not-at-top
  rows = [shapes_eval.score(im, p.spec, p.kind) for im, p in zip(images, prompts)]
  overall = shapes_eval.summarize(rows, [p.category for p in prompts])
  by_category = overall.pop("by_kind")
  unseen = [r for r, p in zip(rows, prompts) if not p.seen]
  report = {
      "shapes": overall,
      "by_category": by_category,
      "unseen": shapes_eval.summarize(unseen, ["unseen"] * len(unseen))
                if unseen else {"n": 0},
  }
  report["unseen"].pop("by_kind", None)
  return report | {"rows": rows}


def score_digits(images: np.ndarray, prompts: Sequence[Prompt]) -> dict:
  """Classifier accuracy against the prompted digit, beside its ceiling."""
  from imagen_jax.eval import digits_eval  # pylint: disable=g-import-not-at-top
  labels = np.array([p.spec["digit"] for p in prompts])
  pred = digits_eval.predict(images)
  per_digit = {str(d): float((pred[labels == d] == d).mean())
               for d in range(10) if (labels == d).any()}
  rows = [{"predicted": int(a), "correct": bool(a == b)}
          for a, b in zip(pred, labels)]
  return {"digits": {"accuracy": float((pred == labels).mean()),
                     "ceiling": digits_eval.ceiling(images.shape[1]),
                     "n": len(prompts), "per_digit": per_digit},
          "rows": rows}
