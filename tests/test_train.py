"""Training: mesh equivalence, learning, NaN guard, checkpoints, bad input."""

import functools
import json
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from imagen_jax import build
from imagen_jax import host_malloc
from imagen_jax.stage import SampleInputs, Stage, StageSettings
from imagen_jax.train import loop
from imagen_jax.train import metrics as metrics_lib
from imagen_jax.train import optim
from imagen_jax.train import state as state_lib
from imagen_jax.train.checkpoint import Checkpointer
from imagen_jax.train.step import make_train_step
from imagen_jax import parallel
from tests import helpers


def _train(tmp_path, name, **overrides):
  config = helpers.tiny_train_config(**overrides)
  return loop.train(config, str(tmp_path / name), progress=False)


def _flops_per_step(metrics, devices):
  """The step FLOPs behind a run's logged TFLOP/s per device (metrics.Throughput)."""
  return (metrics["tflops_per_device"] * 1e12 * devices
          / metrics["steps_per_sec"])


@functools.lru_cache(maxsize=None)
def _one_device_losses(tmp):
  import pathlib
  out = _train(pathlib.Path(tmp), "one", **{
      "total_steps": 5, "log_every": 1, "checkpoint_every": 5,
      "mesh.shape": (1, 1, 1), "mesh.num_devices": 1})
  return tuple(out["losses"]), out["state"], _flops_per_step(out["metrics"], 1)


@pytest.mark.parametrize("shape", [(8, 1, 1), (2, 4, 1), (1, 8, 1), (2, 2, 2)])
def test_losses_equal_across_meshes(tmp_path_factory, shape):
  ref_losses, ref_state, ref_flops = _one_device_losses(
      str(tmp_path_factory.mktemp("ref")))
  out = _train(tmp_path_factory.mktemp("mesh"), "m", **{
      "total_steps": 5, "log_every": 1, "checkpoint_every": 5,
      "mesh.shape": shape})
  np.testing.assert_allclose(out["losses"], ref_losses, rtol=2e-5, atol=1e-6)
  # TFLOP/s per device and MFU count the same step FLOPs on every mesh (a
  # per-device count divided by the devices again would log 1/8 here).
  np.testing.assert_allclose(_flops_per_step(out["metrics"], 8), ref_flops,
                             rtol=1e-6)
  # Params agree as a whole. (Not element by element: zero-initialised layers
  # get gradients near 0 in the first steps, where Adam's m / sqrt(v) turns
  # float-reordering noise across meshes into +-lr sign flips.)
  diff = sum(float(np.sum((np.asarray(a) - np.asarray(b)) ** 2))
             for a, b in zip(jax.tree_util.tree_leaves(out["state"].params),
                             jax.tree_util.tree_leaves(ref_state.params)))
  norm = sum(float(np.sum(np.asarray(b) ** 2))
             for b in jax.tree_util.tree_leaves(ref_state.params))
  assert diff <= 1e-8 * norm, (diff, norm)
  # FSDP / tensor parallel really split the params.
  if shape[1] * shape[2] > 1:
    kernel = out["state"].params["up_1_res_0"]["conv_0"]["kernel"]
    assert len({str(s.index) for s in kernel.addressable_shards}) > 1


def test_tiny_run_learns_and_keeps_max_checkpoints(tmp_path, caplog):
  config = helpers.tiny_train_config(**{"total_steps": 300, "log_every": 100,
                                        "checkpoint_every": 50,
                                        "keep_checkpoints": 2,
                                        "keep_period": 100,
                                        "mesh.shape": (1, 1, 1),
                                        "mesh.num_devices": 1})
  workdir = str(tmp_path / "learn")
  stage = Stage.from_config(config)
  from imagen_jax.data import sources
  from imagen_jax.text import encoder as encoder_lib
  enc = encoder_lib.from_config(config.text)
  src = sources.make_source(config, workdir, enc.encode)
  fixed = src.local_batch(12345)
  eval_loss = jax.jit(lambda p: jnp.mean(jnp.stack([
      stage.loss(p, fixed, jax.random.PRNGKey(i), train=False)[0]
      for i in range(4)])))
  with caplog.at_level(logging.INFO):
    out = loop.train(config, workdir, progress=False)
  # The start log names the peak's source and the host allocator.
  assert any("(measured (cpu matmul)); host malloc: "
             + host_malloc.loaded_allocator() in r.getMessage()
             for r in caplog.records), [r.getMessage() for r in caplog.records]
  tx, _ = optim.make_optimizer(config.optimizer, 300)
  module = stage.unet
  init = state_lib.init_state(module, config, tx,
                              parallel.make_mesh((1, 1, 1), jax.devices()[:1]),
                              state_lib.state_shardings(
                                  module, build.unet_inputs(config, 1, 4), tx,
                                  parallel.make_mesh((1, 1, 1), jax.devices()[:1]))[1],
                              jax.random.PRNGKey(0))
  start = float(eval_loss(jax.device_get(init.params)))
  end = float(eval_loss(jax.device_get(out["state"].ema_params)))
  assert end < 0.3 * start, (start, end)
  # TensorBoard got the scalar "loss" every log_every steps.
  assert sorted(helpers.read_scalars(workdir, "loss")) == [100, 200, 300]
  # keep_checkpoints = 2 (the newest two), plus every keep_period-th step
  # (50 and 150 were deleted)
  assert Checkpointer(workdir).all_steps() == [100, 200, 250, 300]


def test_nan_guard_skips_bitwise_and_stops(tmp_path, monkeypatch):
  config = helpers.tiny_train_config(**{"mesh.shape": (1, 1, 1),
                                        "mesh.num_devices": 1})
  mesh = parallel.make_mesh((1, 1, 1), jax.devices()[:1])
  stage = Stage.from_config(config)
  tx, lr = optim.make_optimizer(config.optimizer, 10)
  abstract, sh = state_lib.state_shardings(stage.unet, build.unet_inputs(config, 1, 4),
                                           tx, mesh)
  state = state_lib.init_state(stage.unet, config, tx, mesh, sh, jax.random.PRNGKey(0))
  step = make_train_step(stage, tx, lr, config, mesh, sh)
  rs = np.random.RandomState(0)
  good = {"image": rs.randint(0, 255, (16, 16, 16, 3)).astype(np.uint8),
          "text": rs.randn(16, 16, 32).astype(np.float32),
          "text_mask": np.ones((16, 16), bool)}
  bad = dict(good, text=np.full_like(good["text"], np.nan))
  state, _ = step(state, good)
  before = jax.device_get(state)
  state, m = step(state, bad)
  after = jax.device_get(state)
  assert int(m["skipped"]) == 1 and int(after.skipped) == 1
  assert int(after.step) == int(before.step) + 1
  for a, b in zip(jax.tree_util.tree_leaves((before.params, before.opt_state, before.ema_params)),
                  jax.tree_util.tree_leaves((after.params, after.opt_state, after.ema_params))):
    np.testing.assert_array_equal(a, b)
  state, m = step(state, good)
  assert int(m["skipped"]) == 0 and int(jax.device_get(state.skipped)) == 0

  # In the loop: K poisoned steps in a row stop the run with a clear error
  # within log_every steps of the K-th (the count is read at logs and saves
  # only), and no non-finite state is checkpointed.
  from imagen_jax.data import sources
  real = sources.make_source

  class Poisoned:
    def __init__(self, inner):
      self.inner = inner
    def local_batch(self, position):
      b = self.inner.local_batch(position)
      if position >= 3:
        b["text"] = np.full_like(b["text"], np.inf)
      return b

  monkeypatch.setattr(sources, "make_source", lambda *a, **k: Poisoned(real(*a, **k)))
  config = helpers.tiny_train_config(**{"max_consecutive_skips": 4,
                                        "checkpoint_every": 3, "log_every": 5})
  # Steps 4-7 are the first four skips; the save at step 9 (before the log
  # at 10) reads the count and refuses.
  with pytest.raises(loop.NonFiniteError,
                     match=r"6 consecutive steps .*at step 9\)"):
    loop.train(config, str(tmp_path / "nan"), progress=False)
  ck = Checkpointer(str(tmp_path / "nan"))
  steps = ck.all_steps()
  # 3 and 6 saved (6 had 3 skips), 9 refused (6 in a row).
  assert steps == [3, 6]
  restored, _ = ck.restore(max(steps), *state_lib.state_shardings(
      stage.unet, build.unet_inputs(config, 1, 4), tx,
      parallel.make_mesh((8, 1, 1))))
  assert bool(state_lib.is_finite_tree(restored.params))


def test_step_flops_count_the_whole_step_on_any_mesh():
  config = helpers.tiny_train_config(batch_size=16)
  counts = {}
  for shape in ((1, 1, 1), (8, 1, 1), (2, 2, 2)):
    n = int(np.prod(shape))
    mesh = parallel.make_mesh(shape, jax.devices()[:n])
    stage = Stage.from_config(config)
    tx, lr = optim.make_optimizer(config.optimizer, 10)
    abstract, sh = state_lib.state_shardings(
        stage.unet, build.unet_inputs(config, 1, 4), tx, mesh)
    step = make_train_step(stage, tx, lr, config, mesh, sh)
    state = state_lib.abstract_with_shardings(abstract, sh)
    inputs = build.unet_inputs(config, 16, 8)
    r = int(config.resolution)
    batch = {"image": jax.ShapeDtypeStruct((16, r, r, 3), jnp.uint8),
             "text": inputs["text"], "text_mask": inputs["text_mask"]}
    batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype,
                                     sharding=parallel.batch_sharding(mesh, v.ndim))
             for k, v in batch.items()}
    counts[shape] = (metrics_lib.step_flops(step.lowered(state, batch)),
                     step.compiled(state, batch).cost_analysis()["flops"])
  whole, one_device_compiled = counts[(1, 1, 1)]
  # A real count: XLA's count of the optimised one-device program agrees.
  assert abs(whole / one_device_compiled - 1) < 0.05, counts
  for shape, (lowered, per_device) in counts.items():
    assert lowered == whole, counts
    # The compiled SPMD program holds one device's share of the step.
    assert abs(per_device * np.prod(shape) / whole - 1) < 0.1, counts


def test_steps_between_logs_never_read_the_device(tmp_path, monkeypatch):
  """No device-to-host read between logs: steps are dispatched ahead.

  The loop runs every step that neither logs, samples nor saves under
  ``jax.transfer_guard_device_to_host("disallow_explicit")``. On a CPU a
  "device" array is host memory and jax does not check the guard there, so
  this test makes every device-to-host read (``ArrayImpl._value``, behind
  ``device_get``, ``float()``, ``np.asarray``) check it as an accelerator
  would: a run with sparse logs finishes, and a read slipped into a quiet
  step raises.
  """
  from jax._src import array as array_lib  # pylint: disable=g-import-not-at-top
  from jax._src import config as jax_config  # pylint: disable=g-import-not-at-top
  from imagen_jax.train import metrics as metrics_lib
  real_value = array_lib.ArrayImpl._value
  reads = {"allowed": 0}

  def guarded_value(self):
    if jax_config.transfer_guard_device_to_host.value == "disallow_explicit":
      raise RuntimeError("Disallowed device-to-host transfer")
    reads["allowed"] += 1
    return real_value.fget(self)
  monkeypatch.setattr(array_lib.ArrayImpl, "_value", property(guarded_value))
  config = helpers.tiny_train_config(**{
      "total_steps": 12, "log_every": 6, "checkpoint_every": 12,
      "mesh.shape": (1, 1, 1), "mesh.num_devices": 1})
  out = loop.train(config, str(tmp_path / "quiet"), progress=False)
  assert out["step"] == 12 and len(out["losses"]) == 2
  assert reads["allowed"] > 0  # the patch sees the reads at logs and saves
  real_add = metrics_lib.Accumulator.add

  def add_and_read(self, m, skip_run):
    real_add(self, m, skip_run)
    float(m["loss"])  # a per-step sync, as the loop once had
  monkeypatch.setattr(metrics_lib.Accumulator, "add", add_and_read)
  with pytest.raises(RuntimeError, match="Disallowed device-to-host"):
    loop.train(config, str(tmp_path / "sync"), progress=False)


def test_restore_on_a_different_mesh(tmp_path):
  workdir = str(tmp_path / "remesh")
  first = loop.train(helpers.tiny_train_config(**{
      "total_steps": 6, "checkpoint_every": 6, "log_every": 6,
      "mesh.shape": (2, 2, 2)}), workdir, progress=False)
  for shape, n in (((1, 4, 1), 4), ((1, 1, 1), 1)):
    config = helpers.tiny_train_config(**{
        "total_steps": 6, "checkpoint_every": 6, "log_every": 6,
        "mesh.shape": shape, "mesh.num_devices": n})
    mesh = parallel.make_mesh(shape, jax.devices()[:n])
    stage = Stage.from_config(config)
    tx, _ = optim.make_optimizer(config.optimizer, 6)
    abstract, sh = state_lib.state_shardings(stage.unet, build.unet_inputs(config, 1, 4), tx, mesh)
    restored, meta = Checkpointer(workdir).restore(6, abstract, sh)
    assert meta["data_position"] == 6
    for a, b in zip(jax.tree_util.tree_leaves(restored),
                    jax.tree_util.tree_leaves(first["state"])):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    leaf = jax.tree_util.tree_leaves(restored.params)[0]
    assert len(leaf.sharding.device_set) == n
  # And training continues on the new mesh from there.
  more = loop.train(helpers.tiny_train_config(**{
      "total_steps": 8, "checkpoint_every": 8, "log_every": 1,
      "mesh.shape": (1, 4, 1), "mesh.num_devices": 4}), workdir, progress=False)
  assert more["step"] == 8 and len(more["losses"]) == 2


def test_workdir_refuses_other_model_shapes(tmp_path):
  workdir = str(tmp_path / "w")
  loop.train(helpers.tiny_train_config(**{"total_steps": 1, "checkpoint_every": 1,
                                          "log_every": 1}), workdir, progress=False)
  with pytest.raises(loop.ConfigError, match="different model"):
    loop.train(helpers.tiny_train_config(**{"model.base_channels": 32}),
               workdir, progress=False)


def test_init_from_another_run(tmp_path):
  src = loop.train(helpers.tiny_train_config(**{"total_steps": 3, "checkpoint_every": 3,
                                                "log_every": 3}),
                   str(tmp_path / "src"), progress=False)
  out = loop.train(helpers.tiny_train_config(**{
      "total_steps": 1, "checkpoint_every": 1, "log_every": 1,
      "init_from": str(tmp_path / "src"), "optimizer.learning_rate": 0.0}),
      str(tmp_path / "dst"), progress=False)
  # lr 0 for one step: params stay the source's EMA params.
  for a, b in zip(jax.tree_util.tree_leaves(out["state"].params),
                  jax.tree_util.tree_leaves(src["state"].ema_params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_async_save_snapshot_survives_donation(tmp_path):
  """The loop donates the state to the next step right after ``save``."""
  from imagen_jax.data import sources
  from imagen_jax.text import encoder as encoder_lib
  config = helpers.tiny_train_config(**{"mesh.shape": (2, 4, 1)})
  mesh = parallel.make_mesh((2, 4, 1), jax.devices()[:8])
  stage = Stage.from_config(config)
  tx, lr = optim.make_optimizer(config.optimizer, 10)
  abstract, sh = state_lib.state_shardings(
      stage.unet, build.unet_inputs(config, 1, 4), tx, mesh)
  state = state_lib.init_state(stage.unet, config, tx, mesh, sh,
                               jax.random.PRNGKey(0))
  step = make_train_step(stage, tx, lr, config, mesh, sh)
  source = sources.make_source(config, str(tmp_path),
                               encoder_lib.from_config(config.text).encode)
  batch = loop._global_batch(source.local_batch(0), mesh)  # pylint: disable=protected-access
  state, _ = step(state, batch)
  expected = [np.asarray(x) for x in jax.tree_util.tree_leaves(state)]
  saved_params = [np.asarray(x) for x in jax.tree_util.tree_leaves(state.params)]
  ck = Checkpointer(str(tmp_path / "w"))
  assert ck._handoff is not None  # pylint: disable=protected-access
  ck.prepare(state)
  ck.save(1, state, {"data_position": 1})
  for _ in range(3):  # donates (and overwrites) the saved buffers
    state, _ = step(state, batch)
  ck.wait()
  # The live params moved on; the checkpoint holds the state at save time.
  assert any(not np.array_equal(np.asarray(a), b) for a, b in
             zip(jax.tree_util.tree_leaves(state.params), saved_params))
  restored, meta = ck.restore(1, abstract, sh)
  assert meta["data_position"] == 1
  for got, want in zip(jax.tree_util.tree_leaves(restored), expected):
    np.testing.assert_array_equal(np.asarray(got), want)
  ck.close()


def test_async_save_error_surfaces_on_wait(tmp_path):
  ck = Checkpointer(str(tmp_path / "w"))
  ck.save(1, {"x": jnp.ones(3)}, {"data_position": 1})
  ck.wait()
  ck.save(1, {"x": jnp.ones(3)}, {"data_position": 1})  # step 1 exists
  with pytest.raises(Exception, match="1"):
    ck.wait()


def test_periodic_sample_grids_use_ema_params_and_sample_settings(
    tmp_path, monkeypatch):
  """Each grid shows the EMA params' samples drawn with ``config.sample``
  (here DDIM with eta > 0 and guidance), and the sampler compiles once."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  from imagen_jax import images as images_lib  # pylint: disable=g-import-not-at-top
  from imagen_jax.stage import to_uint8_image  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  config = helpers.tiny_train_config(**{
      "total_steps": 4, "log_every": 2, "checkpoint_every": 4,
      "sample_every": 2, "num_samples": 3, "sample.num_steps": 3,
      "sample.eta": 0.7, "sample.guidance_scale": 2.0,
      "mesh.shape": (1, 1, 1), "mesh.num_devices": 1})
  calls = []
  original = loop._SampleGrid.__call__  # pylint: disable=protected-access

  def spy(self, state, batch, step, writer):
    seen = (jax.device_get(state.ema_params),
            {k: np.asarray(v) for k, v in batch.items()}, step)
    original(self, state, batch, step, writer)
    calls.append(seen + (self._fn._cache_size(),))  # pylint: disable=protected-access

  monkeypatch.setattr(loop._SampleGrid, "__call__", spy)  # pylint: disable=protected-access
  workdir = tmp_path / "run"
  loop.train(config, str(workdir), progress=False)
  assert [c[2] for c in calls] == [2, 4]
  assert [c[3] for c in calls] == [1, 1]  # the second grid compiled nothing
  stage = Stage.from_config(config)

  @jax.jit
  def expected(params, text, mask, rng):
    return to_uint8_image(stage.sample(
        params, SampleInputs(text, mask), rng,
        StageSettings(sampler="ddim", num_steps=3, guidance_scale=2.0, eta=0.7,
                      threshold="dynamic", percentile=99.5)))

  grids = []
  for params, batch, step, _ in calls:
    want = np.asarray(expected(params, batch["text"][:3], batch["text_mask"][:3],
                               jax.random.PRNGKey(step)))
    got = np.asarray(Image.open(workdir / "samples" / f"step_{step:08d}.png"))
    np.testing.assert_array_equal(got, np.asarray(images_lib.grid(want)))
    grids.append(got)
  assert not np.array_equal(grids[0], grids[1])  # params moved, new noise
  tags = set()
  for path in (workdir).glob("events.out.tfevents.*"):
    for event in tf.compat.v1.train.summary_iterator(str(path)):
      tags.update((event.step, v.tag) for v in event.summary.value)
  assert {(2, "samples"), (4, "samples")} <= tags


def test_peak_flops_config_wins_else_cpu_measures():
  assert metrics_lib.peak_flops_per_device(5e12) == (5e12, "config")
  peak, source = metrics_lib.peak_flops_per_device()
  assert source == "measured (cpu matmul)"
  # The host's measured float32 matmul rate, split over the virtual devices.
  total = peak * len(jax.local_devices())
  assert 1e8 < total < 1e13, total
  one = metrics_lib.measure_matmul_flops(sizes=(256,), repeats=2)
  assert 1e8 < one < 1e13, one


def test_workdir_written_before_a_model_field_existed_resumes(tmp_path):
  """A config.json that lacks a later-declared model field means its default;
  a real change of that field is still refused."""
  config = helpers.load_config("base64")
  workdir = str(tmp_path)
  loop.check_workdir_config(workdir, config)
  path = tmp_path / "config.json"
  old = json.loads(path.read_text())
  del old["model"]["text_layers"]
  path.write_text(json.dumps(old))
  loop.check_workdir_config(workdir, config)
  config.model.text_layers = 2
  with pytest.raises(loop.ConfigError, match="different model"):
    loop.check_workdir_config(workdir, config)
