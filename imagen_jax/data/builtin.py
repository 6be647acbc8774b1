"""tfds builders for the built-in datasets; nothing is downloaded.

``imagen_shapes`` (``data/shapes.py``) and ``imagen_digits``
(``data/digits.py``) are ordinary tfds ``GeneratorBasedBuilder``s whose
examples are generated locally: ``prepare(config.data)`` writes them into the
tfds data dir once (the builder config's name encodes its parameters, so
different sizes or holdouts never collide), and every tfds / seqio reader
works on them as on any downloaded dataset.

Features: ``image`` (PNG), ``caption``, ``id``, ``kind`` and ``spec`` (the
structured prompt as JSON, for the alignment evaluators).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os

import tensorflow_datasets as tfds

from imagen_jax.data import digits
from imagen_jax.data import shapes

VERSION = tfds.core.Version("1.0.0")


@dataclasses.dataclass(eq=False)
class ShapesConfig(tfds.core.BuilderConfig):
  resolution: int = 64
  num_train: int = 10000
  num_test: int = 500
  seed: int = 0
  holdout: str = ""


@dataclasses.dataclass(eq=False)
class DigitsConfig(tfds.core.BuilderConfig):
  resolution: int = 32


def _features(res: int):
  return tfds.features.FeaturesDict({
      "image": tfds.features.Image(shape=(res, res, 3), encoding_format="png"),
      "caption": tfds.features.Text(),
      "id": tfds.features.Text(),
      "kind": tfds.features.Text(),
      "spec": tfds.features.Text(),
  })


class ImagenShapes(tfds.core.GeneratorBasedBuilder):
  """Procedural scenes with compositional captions (see data/shapes.py)."""
  VERSION = VERSION
  # No BUILDER_CONFIGS: the config is always passed (``builder_config``),
  # and seqio refuses to read a builder that lists several.

  def _info(self):
    return tfds.core.DatasetInfo(builder=self,
                                 features=_features(self.builder_config.resolution))

  def _split_generators(self, dl_manager):
    del dl_manager
    cfg = self.builder_config
    splits = {"train": self._generate_examples("train", cfg.num_train),
              "test": self._generate_examples("test", cfg.num_test)}
    if cfg.holdout:
      splits["holdout"] = self._generate_examples("holdout", cfg.num_test)
    return splits

  def _generate_examples(self, split: str, n: int):
    cfg = self.builder_config
    holdout = shapes.parse_holdout(cfg.holdout)
    for i in range(n):
      scene, image = shapes.example(cfg.seed, i, cfg.resolution, split, holdout)
      yield i, {"image": image, "caption": scene.caption, "id": f"{split}/{i}",
                "kind": scene.kind, "spec": json.dumps(scene.spec, sort_keys=True)}


class ImagenDigits(tfds.core.GeneratorBasedBuilder):
  """scikit-learn's handwritten digits, upscaled and captioned."""
  VERSION = VERSION
  # Configs are passed in, as for ImagenShapes.

  def _info(self):
    return tfds.core.DatasetInfo(builder=self,
                                 features=_features(self.builder_config.resolution))

  def _split_generators(self, dl_manager):
    del dl_manager
    return {"train": self._generate_examples("train"),
            "test": self._generate_examples("test")}

  def _generate_examples(self, split: str):
    res = self.builder_config.resolution
    for i in range(len(digits.split_indices(split))):
      caption, label, image = digits.example(split, i, res)
      yield i, {"image": image, "caption": caption, "id": f"{split}/{i}",
                "kind": "digit", "spec": json.dumps({"digit": label})}


def builder_config(data) -> tfds.core.BuilderConfig:
  """The BuilderConfig a ``config.data`` section (source shapes|digits) means."""
  res = int(data.render_resolution)
  if data.source == "shapes":
    n = int(data.num_examples) or 10000
    tag = hashlib.sha1(data.holdout.encode()).hexdigest()[:8] if data.holdout else "none"
    return ShapesConfig(name=f"r{res}_n{n}_s{int(data.render_seed)}_h{tag}",
                        version=VERSION, resolution=res, num_train=n,
                        num_test=int(data.num_test), seed=int(data.render_seed),
                        holdout=data.holdout)
  if data.source == "digits":
    return DigitsConfig(name=f"r{res}", version=VERSION, resolution=res)
  raise ValueError(f"data.source {data.source!r} is not a built-in dataset.")


def data_dir(data) -> str:
  """Where a config's dataset lives: one directory per builder config.

  seqio memoizes builders by (name, data_dir) and ignores the config, so two
  configs of one builder in one process must not share a data_dir.
  """
  root = data.data_dir or os.path.join(os.path.expanduser("~"),
                                       "tensorflow_datasets")
  return os.path.join(root, "imagen_builtin", builder_config(data).name)


def prepare(data) -> tuple[str, dict]:
  """Generates the dataset if needed; returns (tfds name, builder kwargs)."""
  name = {"shapes": "imagen_shapes", "digits": "imagen_digits"}[data.source]
  cfg = builder_config(data)
  builder = tfds.builder(name, config=cfg, data_dir=data_dir(data))
  if not builder.is_prepared():
    print(f"rendering {name} ({cfg.name}) into {builder.data_dir}", flush=True)
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(verify_ssl=False))
  return f"{name}:{VERSION}", {"config": cfg}


def load_split(data, split: str) -> list[dict]:
  """All examples of a split as dicts of numpy values (small datasets)."""
  name, kwargs = prepare(data)
  builder = tfds.builder(name.split(":")[0], data_dir=data_dir(data), **kwargs)
  ds = builder.as_dataset(split=split, shuffle_files=False)
  out = []
  for ex in tfds.as_numpy(ds):
    out.append({k: (v.decode() if isinstance(v, bytes) else v) for k, v in ex.items()})
  return out
