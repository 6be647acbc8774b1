"""The caption grammar of the built-in datasets (shapes, digits).

Kept in one place so the datasets, the alignment evaluators and the demo
vocabulary agree on every word.
"""

from __future__ import annotations

import random

# RGB palette of the shapes dataset: six hues far apart in colour space, so a
# nearest-colour parser separates them even on blurry 16-32 px samples.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (230, 40, 40),
    "green": (40, 200, 60),
    "blue": (50, 80, 235),
    "yellow": (240, 220, 40),
    "purple": (160, 50, 210),
    "cyan": (40, 220, 230),
}
BACKGROUND = (0, 0, 0)
SHAPES = ("circle", "square", "triangle")
SIZES = ("small", "large")
COUNT_WORDS = {1: "one", 2: "two", 3: "three"}
RELATIONS = ("to the left of", "to the right of", "above", "below")
DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven",
               "eight", "nine")


def plural(shape: str) -> str:
  """English plural of a shape noun."""
  return shape + "s"


def object_phrase(color: str, shape: str, size: str | None = None,
                  count: int = 1) -> str:
  """'a small red circle' / 'two red circles'."""
  if count == 1:
    words = ["a"] + ([size] if size else []) + [color, shape]
  else:
    words = [COUNT_WORDS[count]] + ([size] if size else []) + [color,
                                                               plural(shape)]
  return " ".join(words)


def relation_caption(a: tuple[str, str], relation: str, b: tuple[str, str]
                     ) -> str:
  """'a red circle to the left of a blue square'."""
  return f"{object_phrase(*a)} {relation} {object_phrase(*b)}"


def digit_caption(digit: int) -> str:
  """'a handwritten digit seven'."""
  return f"a handwritten digit {DIGIT_WORDS[digit]}"


def grammar_stems() -> tuple[str, ...]:
  """Every word of the grammar's captions, sorted; plurals by their stem."""
  words = {"a", "handwritten", "digit"}
  words.update(COLORS, SHAPES, SIZES, COUNT_WORDS.values(), DIGIT_WORDS)
  for relation in RELATIONS:
    words.update(relation.split())
  return tuple(sorted(words))


def caption_corpus(rng: random.Random, n: int) -> list[str]:
  """``n`` random captions covering the whole grammar (vocabulary training)."""
  colors = list(COLORS)
  out = []
  for i in range(n):
    kind = i % 4
    if kind == 0:
      out.append(object_phrase(rng.choice(colors), rng.choice(SHAPES),
                               rng.choice(SIZES + (None,))))
    elif kind == 1:
      out.append(object_phrase(rng.choice(colors), rng.choice(SHAPES),
                               count=rng.choice([2, 3])))
    elif kind == 2:
      out.append(relation_caption((rng.choice(colors), rng.choice(SHAPES)),
                                  rng.choice(RELATIONS),
                                  (rng.choice(colors), rng.choice(SHAPES))))
    else:
      out.append(digit_caption(rng.randrange(10)))
  return out
