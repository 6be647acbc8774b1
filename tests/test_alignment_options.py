"""Options behind the embedded default's alignment: the "local" random T5
init, the residual SR target, thresholding relative to it, and the stage
diagnostics of the evaluation."""

import random

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from imagen_jax import diffusion
from imagen_jax.data import captions
from imagen_jax.data import shapes
from imagen_jax.diffusion import guidance
from imagen_jax.eval import diagnostics
from imagen_jax.eval import suite as suite_lib
from imagen_jax.stage import SampleInputs, Stage, StageSettings
from imagen_jax.text import encoder as encoder_lib
from tests import helpers


def _swapped_pairs(n, seed):
  rng = random.Random(seed)
  out = []
  for _ in range(n):
    a = (rng.choice(list(captions.COLORS)), rng.choice(captions.SHAPES))
    b = (rng.choice([c for c in captions.COLORS if c != a[0]]),
         rng.choice(captions.SHAPES))
    rel = rng.choice(captions.RELATIONS)
    out.append((captions.relation_caption(a, rel, b),
                captions.relation_caption(b, rel, a)))
  return out


def _separation(enc, pairs):
  """(mean over pairs of the worst token match, mean pooled cosine)."""
  a, ma = map(np.asarray, enc.encode([p[0] for p in pairs]))
  b, mb = map(np.asarray, enc.encode([p[1] for p in pairs]))
  worst, pooled = [], []
  for i in range(len(pairs)):
    x, y = a[i][ma[i]], b[i][mb[i]]
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    yn = y / np.linalg.norm(y, axis=1, keepdims=True)
    # every token of one caption against its best match in the other
    worst.append((xn @ yn.T).max(1).min())
    px, py = x.mean(0), y.mean(0)
    pooled.append(px @ py / np.linalg.norm(px) / np.linalg.norm(py))
  return float(np.mean(worst)), float(np.mean(pooled))


def test_local_init_separates_swapped_captions():
  pairs = _swapped_pairs(16, seed=3)
  plain = encoder_lib.TextEncoder.random("demo", max_length=24)
  local = encoder_lib.TextEncoder.random("demo", max_length=24,
                                         random_init="local")
  t_plain, p_plain = _separation(plain, pairs)
  t_local, p_local = _separation(local, pairs)
  # T5's own random init is nearly a bag of words: every token of a caption
  # has a near-twin in its swapped version.
  assert t_plain > 0.75
  assert t_local < 0.6 and t_local < t_plain - 0.25
  assert p_local < p_plain - 0.05
  # Identical captions still give identical embeddings.
  e1, _ = local.encode(["a red circle above a blue square"])
  e2, _ = local.encode(["a red circle above a blue square"])
  np.testing.assert_array_equal(np.asarray(e1), np.asarray(e2))


def test_local_init_is_recorded_and_rebuilt():
  enc = encoder_lib.TextEncoder.random("tiny", max_length=8, random_init="local")
  assert enc.spec["random_init"] == "local"
  again = encoder_lib.TextEncoder.from_spec(enc.spec)
  np.testing.assert_array_equal(
      np.asarray(again.params["encoder"]["relpos_bias"]["rel_embedding"]),
      encoder_lib.local_position_bias(enc.config))
  plain = encoder_lib.TextEncoder.random("tiny", max_length=8)
  with pytest.raises(ValueError, match="random_init"):
    encoder_lib.check_same_encoder(enc.spec, plain.spec, "x")
  # A spec written before the field existed is T5's own init.
  old = {k: v for k, v in plain.spec.items() if k != "random_init"}
  encoder_lib.check_same_encoder(old, plain.spec, "x")


def test_local_offsets_and_bias():
  assert encoder_lib.local_offsets(4) == [-1, 1, -2, 2]
  enc = encoder_lib.TextEncoder.random("tiny", max_length=8, random_init="local")
  bias = encoder_lib.local_position_bias(enc.config)
  assert bias.shape == (enc.config.num_heads, enc.config.num_buckets)
  assert ((bias == 0).sum(1) == 1).all()


def test_unknown_random_init_is_one_line():
  with pytest.raises(ValueError, match=r"random_init 'nope'; choose one of t5, local"):
    encoder_lib.TextEncoder.random("tiny", random_init="nope")


def test_threshold_relative_to_offset():
  x0 = jnp.array([[0.5, -0.5, 0.2]])
  offset = jnp.array([[0.8, -0.8, 0.0]])
  out = guidance._threshold_offset(x0, "static", 99.5, offset)
  # the image x0 + offset is clipped to [-1, 1], then the offset removed
  np.testing.assert_allclose(np.asarray(out + offset), [[1.0, -1.0, 0.2]],
                             atol=1e-6)
  np.testing.assert_allclose(
      np.asarray(guidance._threshold_offset(x0, "none", 99.5, offset)), x0,
      atol=1e-6)


def _sr_stage(**kw):
  config = helpers.load_config("sr256", "tiny")
  config.diffusion.prediction = "x0"
  for k, v in kw.items():
    config.diffusion[k] = v
  return config, Stage.from_config(config)


def test_unknown_sr_target_is_one_line():
  with pytest.raises(ValueError, match=r"sr_target 'nope'; choose one of image, residual"):
    _sr_stage(sr_target="nope")


def test_residual_target_untrained_returns_upsampled_input():
  config, stage = _sr_stage(sr_target="residual")
  res, low = stage.resolution, stage.lowres_resolution
  rng = np.random.RandomState(0)
  lowres = rng.randint(0, 256, (2, low, low, 3)).astype(np.uint8)
  text = jnp.asarray(rng.randn(2, 4, int(config.model.text_dim)), jnp.float32)
  mask = jnp.ones((2, 4), bool)
  from imagen_jax import build  # pylint: disable=g-import-not-at-top
  params = stage.unet.init(jax.random.PRNGKey(0),
                           **build.unet_inputs(config, 2, 4))["params"]
  out = stage.sample(params, SampleInputs(text, mask, lowres=lowres),
                     jax.random.PRNGKey(1),
                     StageSettings(num_steps=3, guidance_scale=1.0,
                                   threshold="static"))
  # The output conv starts at zero: an x0 network predicts residual 0, so the
  # sample is the network's own upsampling of the clean low-res input.
  want = jax.image.resize(jnp.asarray(lowres, jnp.float32) / 127.5 - 1.0,
                          (2, res, res, 3), stage.unet.lowres_resize)
  np.testing.assert_allclose(np.asarray(out), np.clip(np.asarray(want), -1, 1),
                             atol=1e-5)
  # And the training loss is the residual's: zero prediction, loss = mean
  # square of image - upsampled input (x0 target, no weighting).
  # A high-res image close to its interpolated low-res version, as real ones are.
  image = np.clip(np.round((np.asarray(want) + 1.0) * 127.5
                           + rng.randint(-8, 9, (2, res, res, 3))),
                  0, 255).astype(np.uint8)
  batch = {"image": image, "lowres": lowres, "text": text, "text_mask": mask}
  _, plain = _sr_stage(sr_target="image")
  loss_res, _ = stage.loss(params, batch, jax.random.PRNGKey(2), train=False)
  loss_img, _ = plain.loss(params, batch, jax.random.PRNGKey(2), train=False)
  resid = np.asarray(image, np.float32) / 127.5 - 1.0 - np.asarray(want)
  assert float(loss_res) < 0.1 * float(loss_img)
  np.testing.assert_allclose(float(loss_res), float((resid ** 2).mean()),
                             rtol=1e-4)


def test_diagnostics_rows_on_ground_truth():
  import ml_collections  # pylint: disable=g-import-not-at-top
  data = ml_collections.ConfigDict(dict(
      source="shapes", holdout="red triangle,blue circle", num_examples=200,
      render_resolution=64, render_seed=5))
  prompts = suite_lib.shapes_suite(data, 4)
  assert all(p.scene is not None for p in prompts)
  truth = diagnostics.reference_images(prompts, data, 64)
  scored = suite_lib.score_shapes(truth, prompts)
  row = diagnostics.headline(scored)
  assert row["all_correct"] == 1.0 and row["relation_position"] == 1.0
  assert row["holdout_all_correct"] == 1.0
  squeezed = diagnostics.through_resolution(truth, 16)
  assert squeezed.shape == truth.shape
  assert diagnostics.headline(suite_lib.score_shapes(squeezed, prompts))[
      "color"] >= 0.9
  table = diagnostics.format_table({"ceiling": row, "base_only": row})
  assert table.splitlines()[0].split()[:3] == ["stage", "diagnostics", "all"]
  assert len(table.splitlines()) == 3


def test_scene_render_matches_suite_prompt():
  import ml_collections  # pylint: disable=g-import-not-at-top
  data = ml_collections.ConfigDict(dict(
      source="shapes", holdout="", num_examples=50, render_resolution=32,
      render_seed=1))
  p = suite_lib.shapes_suite(data, 1)[0]
  assert p.scene.caption == p.text
  assert shapes.render(p.scene, 32).shape == (32, 32, 3)


def test_unknown_threshold_is_one_line():
  from imagen_jax.stage import StageSettings  # pylint: disable=g-import-not-at-top
  with pytest.raises(ValueError, match=r"sample\.threshold='soft' is invalid; choose one of dynamic, static, none"):
    StageSettings(threshold="soft").check()


def test_suite_seed_draws_another_suite_of_the_grammar():
  import ml_collections  # pylint: disable=g-import-not-at-top
  data = ml_collections.ConfigDict(dict(
      source="shapes", holdout="red triangle,blue circle", num_examples=100,
      render_resolution=64, render_seed=0))
  a = suite_lib.suite_for(data, 6)
  b = suite_lib.suite_for(data, 6, suite_seed=12345)
  assert [p.category for p in a] == [p.category for p in b]
  assert [p.text for p in a] != [p.text for p in b]
  held = {("red", "triangle"), ("blue", "circle")}
  for p in b:
    pairs = {(o.color, o.shape) for o in p.scene.objects}
    assert (p.category == "holdout") == bool(pairs & held)
