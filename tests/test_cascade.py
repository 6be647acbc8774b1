"""Cascade: chaining checks, stages, determinism, one call per step, no
recompilation, sharded == single-device, negative prompts, export; the
validate / prepare / run_stage steps of ``sample`` and a stage's typed inputs."""

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from imagen_jax import cascade as cascade_lib
from imagen_jax import parallel
from imagen_jax.stage import SampleInputs, Stage
from tests import demo_fixture

PROMPTS = ["a red circle", "two blue squares", "a green square above a red circle"]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  return demo_fixture.quick_demo_workdir(tmp_path_factory)


@pytest.fixture(scope="module")
def cascade(workdir):
  mesh = parallel.make_mesh((1, 1, 1), jax.devices()[:1])
  return cascade_lib.Cascade.load([os.path.join(workdir, "base"),
                                   os.path.join(workdir, "sr")], mesh=mesh)


def _settings(cas, **kw):
  return cascade_lib.resolve_settings([s.config for s in cas.stages], kw)


def test_chain_checks(cascade):
  base, sr = cascade.stages
  cascade_lib.check_chain([base, sr])
  with pytest.raises(cascade_lib.CascadeError, match="super-resolution"):
    cascade_lib.check_chain([sr])
  with pytest.raises(cascade_lib.CascadeError, match="only the first stage"):
    cascade_lib.check_chain([base, base])
  cfg = sr.config.copy_and_resolve_references()
  cfg.lowres_resolution = 16
  cfg.resolution = 64
  bad = dataclasses.replace(sr, stage=Stage.from_config(cfg), path="bad_sr")
  with pytest.raises(cascade_lib.CascadeError, match="chain mismatch.*16px"):
    cascade_lib.check_chain([base, bad])
  with pytest.raises(cascade_lib.CascadeError, match="text embeddings"):
    cascade_lib.check_chain([base, sr], d_model=999)
  other = dict(sr.text_encoder_spec, seed=123)
  with pytest.raises(cascade_lib.CascadeError, match="seed"):
    cascade_lib.check_chain([base, dataclasses.replace(sr, text_encoder_spec=other)])


def test_load_errors(workdir, tmp_path):
  with pytest.raises(cascade_lib.CascadeError, match="does not exist"):
    cascade_lib.Cascade.load([str(tmp_path / "nope")])
  (tmp_path / "empty").mkdir()
  with pytest.raises(cascade_lib.CascadeError, match="neither a training workdir"):
    cascade_lib.Cascade.load([str(tmp_path / "empty")])
  with pytest.raises(cascade_lib.CascadeError, match="chain mismatch|base stage"):
    cascade_lib.Cascade.load([os.path.join(workdir, "sr")])


def test_settings_resolution(cascade):
  s = _settings(cascade, num_steps="7,3", sampler="dpmpp_2m", guidance_scale="")
  assert [x.num_steps for x in s] == [7, 3]
  assert {x.sampler for x in s} == {"dpmpp_2m"}
  assert s[0].guidance_scale == float(cascade.stages[0].config.sample.guidance_scale)
  with pytest.raises(cascade_lib.CascadeError, match=r"sample\.sampler='euler' is invalid; choose one of ancestral"):
    _settings(cascade, sampler="euler")
  with pytest.raises(cascade_lib.CascadeError, match="3 values for 2 stages"):
    _settings(cascade, num_steps="1,2,3")
  with pytest.raises(cascade_lib.CascadeError, match="Unknown sampling setting"):
    _settings(cascade, steps=3)


def test_stages_stop_after_and_seeds(cascade):
  st = _settings(cascade, num_steps=3)
  out = cascade.sample(PROMPTS, settings=st, num_samples=2, seed=1)
  assert [o.shape for o in out] == [(6, 8, 8, 3), (6, 32, 32, 3)]
  assert all(o.dtype == np.uint8 for o in out)
  again = cascade.sample(PROMPTS, settings=st, num_samples=2, seed=1)
  for a, b in zip(out, again):
    np.testing.assert_array_equal(a, b)
  other = cascade.sample(PROMPTS, settings=st, num_samples=2, seed=2)
  assert not np.array_equal(out[-1], other[-1])
  # samples of one prompt differ from each other (their own noise)
  assert not np.array_equal(out[-1][0], out[-1][1])
  base_only = cascade.sample(PROMPTS, settings=st, num_samples=2, seed=1,
                             stop_after=0)
  assert len(base_only) == 1
  np.testing.assert_array_equal(base_only[0], out[0])


def test_super_resolve_given_image(cascade):
  st = _settings(cascade, num_steps=3)
  rs = np.random.RandomState(0)
  low = rs.randint(0, 255, (2, 8, 8, 3)).astype(np.uint8)
  out = cascade.sample(PROMPTS[:2], settings=st, start_image=low, start_stage=1,
                       seed=0)
  assert len(out) == 1 and out[0].shape == (2, 32, 32, 3)
  # the SR output follows its input: another input gives another image
  out2 = cascade.sample(PROMPTS[:2], settings=st, start_image=255 - low,
                        start_stage=1, seed=0)
  assert not np.array_equal(out[0], out2[0])
  with pytest.raises(cascade_lib.CascadeError, match="takes 8x8"):
    cascade.sample(PROMPTS[:2], settings=st, start_image=np.zeros((2, 16, 16, 3),
                                                                np.uint8),
                   start_stage=1)
  with pytest.raises(cascade_lib.CascadeError, match="no input"):
    cascade.sample(PROMPTS[:2], settings=st, start_stage=1)


def test_guidance_is_one_network_call_per_step(workdir, monkeypatch):
  """Counts U-Net calls at run time: num_steps per stage, each on 2B inputs."""
  mesh = parallel.make_mesh((1, 1, 1), jax.devices()[:1])
  cas = cascade_lib.Cascade.load([os.path.join(workdir, "base"),
                                  os.path.join(workdir, "sr")], mesh=mesh)
  calls = []
  unet_cls = type(cas.stages[0].stage.unet)
  original = unet_cls.__call__

  def counted(self, x, *args, **kwargs):
    jax.debug.callback(lambda n: calls.append(int(n)), x.shape[0])
    return original(self, x, *args, **kwargs)

  monkeypatch.setattr(unet_cls, "__call__", counted)
  st = _settings(cas, num_steps="5,4", guidance_scale="3.0,2.0")
  cas.sample(PROMPTS, settings=st, seed=0)
  jax.effects_barrier()
  assert calls == [6] * 5 + [6] * 4  # 2 x 3 prompts, one call per step
  calls.clear()
  st = _settings(cas, num_steps="5,4", guidance_scale="1.0,1.0")
  cas.sample(PROMPTS, settings=st, seed=0)
  jax.effects_barrier()
  assert calls == [3] * 9  # unguided: B examples per call


def test_second_call_compiles_nothing(cascade):
  from jax._src import dispatch  # pylint: disable=g-import-not-at-top
  events = []

  def listener(event, duration, **kw):
    del duration, kw
    if event == dispatch.JAXPR_TO_MLIR_MODULE_EVENT:
      events.append(event)

  st = _settings(cascade, num_steps=2, guidance_scale=2.0)
  cascade.sample(PROMPTS, settings=st, seed=3)
  before = cascade.compilations
  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    cascade.sample(PROMPTS, settings=st, seed=4)
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)
  assert events == []
  assert cascade.compilations == before


def test_sharded_matches_single_device(workdir, cascade):
  sharded = cascade_lib.Cascade.load([os.path.join(workdir, "base"),
                                      os.path.join(workdir, "sr")],
                                     mesh_shape=(4, 2, 1))
  assert sharded.mesh.devices.size == 8
  st = _settings(cascade, num_steps=3)
  prompts = PROMPTS + ["a small cyan triangle"] * 5   # 8: one per device
  a = cascade.sample(prompts, settings=st, seed=0)[-1].astype(int)
  b = sharded.sample(prompts, settings=st, seed=0)[-1].astype(int)
  assert np.abs(a - b).max() <= 2
  assert np.abs(a - b).mean() < 0.05


def test_negative_prompt_changes_images(cascade):
  st = _settings(cascade, num_steps=3, guidance_scale=3.0)
  plain = cascade.sample(PROMPTS, settings=st, seed=0)[-1]
  neg = cascade.sample(PROMPTS, settings=st, seed=0,
                       negative_prompts=["a yellow triangle"] * 3)[-1]
  assert not np.array_equal(plain, neg)
  with pytest.raises(cascade_lib.CascadeError, match="one per prompt"):
    cascade.sample(PROMPTS, settings=st, negative_prompts=["x"])


def test_export_samples_like_the_workdir(workdir, cascade, tmp_path):
  out = cascade_lib.export_stage(os.path.join(workdir, "sr"), str(tmp_path / "sr"))
  assert os.path.isfile(os.path.join(out, "stage.json"))
  size = sum(os.path.getsize(os.path.join(d, f))
             for d, _, fs in os.walk(os.path.join(out, "params")) for f in fs)
  ckpt = os.path.join(workdir, "sr", "checkpoints")
  full = sum(os.path.getsize(os.path.join(d, f))
             for d, _, fs in os.walk(ckpt) for f in fs)
  assert size < full / 2   # no optimizer state, no raw params
  mesh = parallel.make_mesh((1, 1, 1), jax.devices()[:1])
  exported = cascade_lib.Cascade.load([os.path.join(workdir, "base"), out],
                                      mesh=mesh)
  st = _settings(cascade, num_steps=3)
  np.testing.assert_array_equal(
      cascade.sample(PROMPTS, settings=st, seed=0)[-1],
      exported.sample(PROMPTS, settings=st, seed=0)[-1])


def test_validate_refuses_before_any_work(cascade):
  st = _settings(cascade, num_steps=2)
  low = np.zeros((3, 8, 8, 3), np.uint8)
  before = cascade.compilations
  assert cascade.validate(3, st) == (0, 1)
  assert cascade.validate(3, st, stop_after=0) == (0, 0)
  assert cascade.validate(3, st, start_image=low, start_stage=1) == (1, 1)
  assert cascade.validate(3, st, start_image=low, start_noise_level=0.5) == (0, 1)
  for kwargs, message in [
      (dict(stop_after=2), "do not exist"),
      (dict(num_samples=0), "num_samples >= 1"),
      (dict(negative_prompts=["x"]), "one per prompt"),
      (dict(start_stage=1), "no input"),
      (dict(start_image=low[:2], start_stage=1), "one per prompt"),
      (dict(start_image=np.zeros((3, 16, 16, 3), np.uint8), start_stage=1),
       "takes 8x8"),
      (dict(start_image=low), "needs start_noise_level"),
      (dict(start_image=low, start_noise_level=1.5), r"in \(0, 1\]"),
      (dict(start_noise_level=0.5), "needs a start_image"),
  ]:
    with pytest.raises(cascade_lib.CascadeError, match=message):
      cascade.validate(3, st, **kwargs)
  with pytest.raises(cascade_lib.CascadeError, match="need 2"):
    cascade.validate(3, st[:1])
  with pytest.raises(cascade_lib.CascadeError, match="num_steps=0"):
    cascade.validate(3, [dataclasses.replace(st[0], num_steps=0), st[1]])
  assert cascade.compilations == before


def test_prepare_repeats_pads_and_shards(workdir):
  """3 prompts x 2 samples on 8 data-parallel devices: 6 rows + 2 padding."""
  cas = cascade_lib.Cascade.load([os.path.join(workdir, "base"),
                                  os.path.join(workdir, "sr")],
                                 mesh_shape=(4, 2, 1))
  low = np.random.RandomState(0).randint(0, 255, (3, 8, 8, 3)).astype(np.uint8)
  batch = cas.prepare(PROMPTS, num_samples=2, negative_prompts=["x"] * 3,
                      start_image=low)
  assert batch.num_images == 6
  text, mask = (np.asarray(x) for x in cas.encode(PROMPTS))
  neg_text, _ = (np.asarray(x) for x in cas.encode(["x"] * 3))
  rows = [0, 0, 1, 1, 2, 2, 2, 2]  # prompt-major, padded with the last row
  inputs = batch.inputs
  np.testing.assert_array_equal(np.asarray(inputs.text), text[rows])
  np.testing.assert_array_equal(np.asarray(inputs.text_mask), mask[rows])
  np.testing.assert_array_equal(np.asarray(inputs.negative_text), neg_text[rows])
  np.testing.assert_array_equal(np.asarray(batch.start_image), low[rows])
  assert inputs.lowres is None and inputs.init_image is None
  for x in (inputs.text, inputs.text_mask, batch.start_image):
    assert x.sharding.is_equivalent_to(
        parallel.batch_sharding(cas.mesh, x.ndim), x.ndim)
  plain = cas.prepare(PROMPTS[:1])
  assert plain.num_images == 1 and plain.inputs.text.shape[0] == 8
  assert plain.inputs.negative_text is None and plain.start_image is None


def test_run_stage_is_one_stage_of_sample(cascade):
  st = _settings(cascade, num_steps=3)
  full = cascade.sample(PROMPTS, settings=st, seed=5)
  batch = cascade.prepare(PROMPTS)
  root = jax.random.PRNGKey(5)
  base = cascade.run_stage(0, st[0], batch.inputs, None,
                           jax.random.fold_in(root, 0))
  np.testing.assert_array_equal(np.asarray(base)[:3], full[0])
  sr = cascade.run_stage(1, st[1], batch.inputs, base,
                         jax.random.fold_in(root, 1))
  np.testing.assert_array_equal(np.asarray(sr)[:3], full[1])
  with pytest.raises(cascade_lib.CascadeError, match="no input"):
    cascade.run_stage(1, st[1], batch.inputs, None, root)


def test_stage_checks_its_typed_inputs(cascade):
  base, sr = (s.stage for s in cascade.stages)
  width = int(cascade.stages[0].config.model.text_dim)
  text, mask = jnp.zeros((2, 4, width)), jnp.ones((2, 4), bool)
  low = jnp.zeros((2, 8, 8, 3), jnp.uint8)
  sr.check_inputs(SampleInputs(text, mask, lowres=low))
  base.check_inputs(SampleInputs(text, mask, init_image=low), start_logsnr=0.0)
  for stage, inputs, logsnr, message in [
      (sr, SampleInputs(text, mask), None, "super-resolution stage"),
      (base, SampleInputs(text, mask, lowres=low), None, "base stage"),
      (base, SampleInputs(text, mask, negative_text=text), None, "together"),
      (base, SampleInputs(text, mask, init_image=low), None, "start_logsnr"),
      (base, SampleInputs(text, mask), 0.0, "start_logsnr"),
      (sr, SampleInputs(text, mask, lowres=low[:1]), None, "1 examples for 2"),
      (base, SampleInputs(text, mask[:, :3]), None, "text_mask"),
  ]:
    with pytest.raises(ValueError, match=message):
      stage.check_inputs(inputs, logsnr)
  # A pytree: unset optional inputs are no leaves, so jit traces without them.
  assert len(jax.tree_util.tree_leaves(SampleInputs(text, mask))) == 2
  assert len(jax.tree_util.tree_leaves(SampleInputs(text, mask, lowres=low))) == 3


def test_null_negative_prompt_is_null_text_guidance(cascade):
  """A negative input of zeros with an all-False mask is the null text."""
  base = cascade.stages[0]
  st = _settings(cascade, num_steps=2, guidance_scale=3.0)[0]
  text, mask = cascade.encode(PROMPTS)
  fn = jax.jit(base.stage.uint8_sampler(st))
  rng = jax.random.PRNGKey(0)
  null = fn(base.params, SampleInputs(text, mask), rng)
  neg = fn(base.params, SampleInputs(text, mask, negative_text=jnp.zeros_like(text),
                                     negative_mask=jnp.zeros_like(mask)), rng)
  np.testing.assert_array_equal(np.asarray(null), np.asarray(neg))
