"""Checkpoint saves with and without the on-device snapshot (8 CPU devices).

Both paths write the same checkpoint: the same arrays, checksum and packing
record, readable onto another mesh; the state handed to ``save`` may be
donated to the next step at once on either. ``snapshot_fits`` picks
orbax's path where a copy would not fit beside the step.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest

from imagen_jax import build
from imagen_jax import parallel
from imagen_jax.stage import Stage
from imagen_jax.train import checkpoint as ckpt_lib
from imagen_jax.train import optim
from imagen_jax.train import state as state_lib
from tests import helpers


def _state(mesh_shape):
  config = helpers.tiny_train_config()
  n = int(np.prod(mesh_shape))
  mesh = parallel.make_mesh(mesh_shape, jax.devices()[:n])
  stage = Stage.from_config(config)
  tx, _ = optim.make_optimizer(config.optimizer, 10)
  abstract, sh = state_lib.state_shardings(
      stage.unet, build.unet_inputs(config, 1, 4), tx, mesh)
  state = state_lib.init_state(stage.unet, config, tx, mesh, sh,
                               jax.random.PRNGKey(0))
  return state, abstract, sh


def _bump(state):
  """What the next step does to the saved buffers: overwrites them."""
  return jax.jit(lambda s: jax.tree_util.tree_map(lambda x: x + 1, s),
                 donate_argnums=0)(state)


@pytest.fixture
def small_pack(monkeypatch):
  # The tiny state's leaves are all small: a lower bound makes its larger
  # leaves "large", so both kinds of leaf are written.
  monkeypatch.setattr(ckpt_lib, "PACK_LEAF_BYTES", 4096)


def test_snapshot_and_orbax_paths_write_the_same_checkpoint(tmp_path,
                                                            small_pack):
  del small_pack
  state, abstract, sh = _state((1, 8, 1))
  expected = jax.device_get(state)
  _, small, large = ckpt_lib._split(state)  # pylint: disable=protected-access
  assert small and large
  metas, restored = {}, {}
  for mode in ("always", "never"):
    state, _, _ = _state((1, 8, 1))  # the same values each time
    ck = ckpt_lib.Checkpointer(str(tmp_path / mode), snapshot=mode)
    ck.prepare(state)
    assert ck.uses_snapshot() == (mode == "always")
    ck.save(3, state, {"data_position": 3})
    state = _bump(state)  # donated while the save may still be running
    ck.wait()
    assert ck.timings[-1]["snapshot"] == (mode == "always")
    assert ck.timings[-1]["commit_s"] is not None
    # Read back onto another mesh.
    _, abstract2, sh2 = _state((2, 4, 1))
    restored[mode], metas[mode] = ck.restore(3, abstract2, sh2)
    ck.close()
  assert metas["always"] == metas["never"]
  for mode in ("always", "never"):
    for got, want in zip(jax.tree_util.tree_leaves(restored[mode]),
                         jax.tree_util.tree_leaves(expected)):
      np.testing.assert_array_equal(np.asarray(got), want)
  # init_from reads the params alone from a packed checkpoint.
  params = ckpt_lib.restore_params(str(tmp_path / "never"), abstract.ema_params,
                                   sh.ema_params)
  for got, want in zip(jax.tree_util.tree_leaves(params),
                       jax.tree_util.tree_leaves(expected.ema_params)):
    np.testing.assert_array_equal(np.asarray(got), want)


class _Device:
  device_kind = "fake accelerator"

  def __init__(self, limit):
    self._limit = limit

  def memory_stats(self):
    return {"bytes_limit": self._limit, "peak_bytes_in_use": 0}


def test_snapshot_fits_compares_step_and_copy_with_the_device():
  gib = 2**30
  # The case: a 60.4 GiB step and a ~16 GiB state on an 80 GB GPU.
  fits, why = ckpt_lib.snapshot_fits(int(16 * gib), int(60.4 * gib),
                                     _Device(int(74.5 * gib)))
  assert not fits and "60.40 GiB" in why
  fits, _ = ckpt_lib.snapshot_fits(int(16 * gib), int(30 * gib),
                                   _Device(int(74.5 * gib)))
  assert fits


def test_auto_takes_orbax_path_where_the_copy_does_not_fit(tmp_path,
                                                           small_pack,
                                                           monkeypatch):
  del small_pack
  state, _, _ = _state((1, 8, 1))
  monkeypatch.setattr(ckpt_lib, "_available_host_bytes", lambda: 1024)
  ck = ckpt_lib.Checkpointer(str(tmp_path / "w"))
  ck.prepare(state)
  assert not ck.uses_snapshot()
  ck.close()
  monkeypatch.undo()
  monkeypatch.setattr(ckpt_lib, "PACK_LEAF_BYTES", 4096)
  ck = ckpt_lib.Checkpointer(str(tmp_path / "w2"))
  ck.prepare(state)
  assert ck.uses_snapshot()
  ck.close()
