"""Input pipelines: store reading (broken images, empty captions), per-stage
preprocessing, SR pairs, aligned crops, position resume, 2-process epoch
coverage; the built-in datasets and the alignment evaluators' ceiling and
floor."""

import io
import json
import os
import random

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from imagen_jax import embed
from imagen_jax.data import builtin
from imagen_jax.data import captions
from imagen_jax.data import digits
from imagen_jax.data import preprocess
from imagen_jax.data import shapes
from imagen_jax.data import sources
from imagen_jax.eval import digits_eval
from imagen_jax.eval import shapes_eval
from imagen_jax.stage import random_aligned_crop
from imagen_jax.text import store as store_lib
from tests import helpers

N = 24
BROKEN, TOO_SMALL, EMPTY = 3, 7, 11


def _png(seed, size=20, mode="RGB"):
  rs = np.random.RandomState(seed)
  arr = rs.randint(0, 255, (size, size + 4, 3), np.uint8)
  buf = io.BytesIO()
  Image.fromarray(arr).convert(mode).save(buf, "PNG")
  return buf.getvalue()


def _write_tfrecords(path):
  with tf.io.TFRecordWriter(os.path.join(path, "d-000.tfrecord")) as w:
    for i in range(N):
      image = (b"this is not an image" if i == BROKEN else
               _png(i, 4) if i == TOO_SMALL else _png(i))
      caption = "" if i == EMPTY else f"a red circle number {i}"
      feat = {"image": tf.train.Feature(bytes_list=tf.train.BytesList(value=[image])),
              "caption": tf.train.Feature(bytes_list=tf.train.BytesList(
                  value=[caption.encode()])),
              "id": tf.train.Feature(bytes_list=tf.train.BytesList(
                  value=[f"ex{i:03d}".encode()]))}
      w.write(tf.train.Example(features=tf.train.Features(feature=feat))
              .SerializeToString())
  return os.path.join(path, "d-*.tfrecord")


@pytest.fixture(scope="module")
def store_dir(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("store")
  config = helpers.load_config("tiny")
  config.data.source = "tfrecord"
  config.data.files = _write_tfrecords(str(tmp))
  config.data.image_key, config.data.caption_key, config.data.id_key = (
      "image", "caption", "id")
  config.embed.batch_size = 8
  config.embed.shard_size = 8
  config.embed.mesh_shape = (1, -1, 1)
  embed.run_embed(config, str(tmp), progress=False)
  return str(tmp / "embeddings")


def _source(store_dir, pi=0, pc=1, batch=4, **kw):
  return sources.StoreSource(store_lib.EmbeddingStore(store_dir), resolution=16,
                             global_batch=batch, seed=1, min_size=16,
                             process_index=pi, process_count=pc, **kw)


def test_store_skips_broken_and_small_images_keeps_empty_captions(store_dir):
  store = store_lib.EmbeddingStore(store_dir)
  assert len(store) == N and store.manifest["empty_captions"] == 1
  src = _source(store_dir)
  assert len(src) == N - 2 and src.filtered == 2   # broken + 4 px image
  ids = {r["id"] for r in store.get_many(src.usable)}
  assert "ex003" not in ids and "ex007" not in ids and "ex011" in ids
  # one epoch: the empty caption arrives as null text (mask all False)
  seen_null = 0
  for step in range(len(src) // 4 + 1):
    batch = src.local_batch(step)
    assert batch["image"].shape == (4, 16, 16, 3) and batch["image"].dtype == np.uint8
    assert batch["text"].shape[:2] == batch["text_mask"].shape
    null = ~batch["text_mask"].any(1)
    seen_null += int(null.sum())
    assert np.all(batch["text"][null] == 0)
  assert seen_null >= 1


def test_sr_source_pairs_are_consistent(store_dir):
  src = sources.StoreSource(store_lib.EmbeddingStore(store_dir), resolution=16,
                            lowres_resolution=4, global_batch=4, min_size=16)
  b = src.local_batch(0)
  assert b["lowres"].shape == (4, 4, 4, 3)
  for img, low in zip(b["image"], b["lowres"]):
    np.testing.assert_array_equal(preprocess.downsample_image(img, 4), low)


@pytest.mark.parametrize("mode,size", [("RGB", 40), ("L", 33), ("RGBA", 50),
                                       ("P", 64)])
def test_preprocess_shapes_ranges_and_pairs(mode, size):
  data = _png(5, size, mode)
  out = preprocess.preprocess(data, 32, 8)
  assert out["image"].shape == (32, 32, 3) and out["image"].dtype == np.uint8
  assert out["lowres"].shape == (8, 8, 3)
  np.testing.assert_array_equal(preprocess.downsample_image(out["image"], 8),
                                out["lowres"])
  flipped = preprocess.preprocess(data, 32, 8, flip=True)
  np.testing.assert_array_equal(flipped["image"], out["image"][:, ::-1])
  assert preprocess.preprocess(b"", 32) is None
  assert preprocess.preprocess(b"\x89PNG broken", 32) is None
  assert preprocess.image_size(b"garbage") == (0, 0)


def test_1024_stage_crops_are_aligned():
  rs = np.random.RandomState(0)
  hi = jnp.asarray(rs.rand(3, 64, 64, 3).astype(np.float32))
  lo = hi.reshape(3, 16, 4, 16, 4, 3).mean((2, 4))          # exact 4x box
  ch, cl = random_aligned_crop(hi, lo, 32, jax.random.PRNGKey(1))
  assert ch.shape == (3, 32, 32, 3) and cl.shape == (3, 8, 8, 3)
  np.testing.assert_allclose(ch.reshape(3, 8, 4, 8, 4, 3).mean((2, 4)), cl,
                             atol=1e-6)
  # offsets differ per example (not one crop for the batch)
  ch2, _ = random_aligned_crop(jnp.stack([hi[0]] * 3), jnp.stack([lo[0]] * 3),
                               32, jax.random.PRNGKey(2))
  assert not np.allclose(ch2[0], ch2[1]) or not np.allclose(ch2[1], ch2[2])


def test_two_processes_cover_each_example_once_per_epoch(store_dir):
  full = _source(store_dir, batch=2)
  n = len(full)                                    # 22 usable examples
  halves = [_source(store_dir, pi, 2, batch=2) for pi in range(2)]
  for epoch in range(2):
    seen = []
    for step in range(epoch * n // 2, (epoch + 1) * n // 2):
      for src in halves:
        pos = step * 2 + np.arange(src.start, src.stop)
        seen += src.stream_indices(pos).tolist()
    assert sorted(seen) == sorted(full.usable.tolist())
  # a different order in each epoch
  first = full.stream_indices(np.arange(n))
  second = full.stream_indices(np.arange(n, 2 * n))
  assert not np.array_equal(first, second)


def test_input_position_resumes_exactly(store_dir, tmp_path):
  """Train 4 steps straight vs 2 + restart + 2 on the store: same losses, params."""
  from imagen_jax.train import loop  # pylint: disable=g-import-not-at-top
  config = helpers.load_config("tiny")
  config.data.source = "tfrecord"
  config.data.store = store_dir
  config.data.min_size = 16
  config.batch_size = 8
  config.total_steps = 4
  config.checkpoint_every = 2
  config.log_every = 2
  config.async_checkpoints = False
  straight = loop.train(config, str(tmp_path / "a"), progress=False)
  first = loop.train(config, str(tmp_path / "b"), progress=False, stop_at=2)
  meta = json.loads((tmp_path / "b" / "checkpoints" / "2" / "meta" / "metadata")
                    .read_text())
  assert meta["data_position"] == 2
  second = loop.train(config, str(tmp_path / "b"), progress=False)
  assert first["losses"] + second["losses"] == straight["losses"]
  for x, y in zip(jax.tree_util.tree_leaves(straight["state"].params),
                  jax.tree_util.tree_leaves(second["state"].params)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


# --- built-in datasets ----------------------------------------------------------------

def test_shapes_are_deterministic_and_hold_out_pairs():
  holdout = shapes.parse_holdout("red triangle,blue circle")
  a, img_a = shapes.example(0, 5, 32, "train", holdout)
  b, img_b = shapes.example(0, 5, 32, "train", holdout)
  assert a == b and np.array_equal(img_a, img_b)
  kinds = set()
  for i in range(400):
    sc = shapes.scene(0, i, 64, "train", holdout)
    kinds.add(sc.kind)
    assert not any((o.color, o.shape) in holdout for o in sc.objects)
  assert kinds == set(shapes.KINDS)
  for i in range(20):
    sc = shapes.scene(0, i, 64, "holdout", holdout)
    assert sc.kind == "single" and (sc.objects[0].color, sc.objects[0].shape) in holdout
  with pytest.raises(ValueError, match="holdout item"):
    shapes.parse_holdout("pink hexagon")
  assert shapes.scene(0, 0, 64, "train").caption != shapes.scene(1, 0, 64, "train").caption \
      or shapes.scene(0, 1, 64).caption != shapes.scene(1, 1, 64).caption


def test_shapes_tfds_builder(tmp_path):
  cfg = helpers.load_config("demo", "quick").data
  cfg.data_dir = str(tmp_path)
  cfg.num_examples, cfg.num_test = 12, 4
  rows = builtin.load_split(cfg, "train")
  assert len(rows) == 12
  holdout = shapes.parse_holdout(cfg.holdout)
  for i, r in enumerate(sorted(rows, key=lambda r: int(r["id"].split("/")[1]))):
    sc, img = shapes.example(0, i, 32, "train", holdout)
    assert r["caption"] == sc.caption and json.loads(r["spec"]) == sc.spec
    np.testing.assert_array_equal(r["image"], img)
  assert len(builtin.load_split(cfg, "holdout")) == 4


def test_digits_split_is_fixed_and_captioned():
  train, test = digits.split_indices("train"), digits.split_indices("test")
  assert len(train) + len(test) == 1797 and not set(train) & set(test)
  caption, label, image = digits.example("test", 0, 32)
  assert caption == f"a handwritten digit {captions.DIGIT_WORDS[label]}"
  assert image.shape == (32, 32, 3) and image.dtype == np.uint8


# --- evaluators: ceiling and floor -----------------------------------------------------

@pytest.mark.parametrize("res", [64, 128])
def test_shapes_parser_ceiling_and_floor(res):
  scenes = [shapes.example(7, i, res, "test") for i in range(150)]
  rows = [shapes_eval.score(img, sc.spec, sc.kind) for sc, img in scenes]
  assert np.mean([r["all_correct"] for r in rows]) >= 0.99
  rs = np.random.RandomState(0)
  noise = [shapes_eval.score(rs.randint(0, 255, (res, res, 3), np.uint8),
                             sc.spec, sc.kind) for sc, _ in scenes[:60]]
  assert np.mean([r["all_correct"] for r in noise]) <= 0.05
  shuffled = [s for s, _ in scenes]
  random.Random(0).shuffle(shuffled)
  mism = [shapes_eval.score(img, other.spec, other.kind)
          for (_, img), other in zip(scenes, shuffled)]
  assert np.mean([r["all_correct"] for r in mism]) <= 0.2


def test_digits_classifier_ceiling_and_floor():
  ceiling = digits_eval.ceiling(32)
  assert ceiling >= 0.95
  rs = np.random.RandomState(0)
  noise = rs.randint(0, 255, (200, 32, 32, 3)).astype(np.uint8)
  labels = np.arange(200) % 10
  assert digits_eval.score(noise, labels) <= 0.25


def test_suites_and_scoring_on_real_images():
  """The suites' scoring gives the evaluators' ceilings on real images."""
  from imagen_jax.eval import suite  # pylint: disable=g-import-not-at-top
  data = helpers.load_config("demo", "digits").data
  prompts = suite.suite_for(data, 3)
  assert len(prompts) == 30 and prompts[0].text == "a handwritten digit zero"
  idx = digits.split_indices("test")
  by_label = {}
  for i in idx:
    s, label = digits.scan(int(i))
    by_label.setdefault(label, []).append(digits.render(s, 64))
  images = np.stack([by_label[p.spec["digit"]][k % 3]
                     for k, p in enumerate(prompts)])
  rep = suite.score_digits(images, prompts)
  assert rep["digits"]["accuracy"] >= 0.9 and rep["digits"]["ceiling"] >= 0.95
  shapes_data = helpers.load_config("demo", "shapes").data
  sp = suite.shapes_suite(shapes_data, 4)
  assert [p.category for p in sp].count("holdout") == 4
  assert all(not p.seen for p in sp if p.category == "holdout")
  holdout = shapes.parse_holdout(shapes_data.holdout)
  assert not any((o["color"], o["shape"]) in holdout
                 for p in sp if p.category == "relation"
                 for o in (p.spec["a"], p.spec["b"]))
  rendered = np.stack([_render_prompt(p, shapes_data) for p in sp])
  rep = suite.score_shapes(rendered, sp)
  assert rep["shapes"]["all_correct"] >= 0.99


def _render_prompt(p, data):
  """The scene a suite prompt was drawn from, rendered at 64 px."""
  holdout = shapes.parse_holdout(data.holdout)
  seed = int(data.render_seed)
  for split in ("test", "holdout"):
    for j in range(0, 4):
      for i in range(50):
        idx = 1_000_000 * j + i if split == "test" else i
        sc = shapes.scene(seed, idx, int(data.render_resolution), split,
                          holdout if split == "holdout" else frozenset(),
                          kind=p.kind if split == "test" else None)
        if sc.caption == p.text and sc.spec == p.spec:
          return shapes.render(sc, 64)
  raise AssertionError(f"scene of {p.text!r} not found")
