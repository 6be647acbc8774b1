"""A damaged newest checkpoint: resume falls back to the step before it.

A committed step whose files were damaged afterwards (truncated by a full
disk, corrupted by a bad copy) must not stop a job: resume warns in one line
naming the damaged step and the step it uses instead, moves the damaged one
aside (nothing deleted) and repeats the uninterrupted run exactly from there.
"""

from __future__ import annotations

import logging
import os
import shutil

import jax
import numpy as np
import pytest

from imagen_jax.train import loop
from imagen_jax.train.checkpoint import Checkpointer
from tests import helpers


def _config(total):
  return helpers.tiny_train_config(**{
      "total_steps": total, "checkpoint_every": 2, "log_every": 1,
      "keep_checkpoints": 3, "mesh.shape": (1, 1, 1), "mesh.num_devices": 1})


def _files(root):
  out = {}
  for r, _, fs in os.walk(root):
    for f in fs:
      path = os.path.join(r, f)
      out[os.path.relpath(path, root)] = os.path.getsize(path)
  return out


def _largest_array_file(step_dir):
  files = _files(os.path.join(step_dir, "state"))
  name = max(files, key=files.get)
  return os.path.join(step_dir, "state", name)


def _truncate(path):
  with open(path, "r+b") as f:
    f.truncate(os.path.getsize(path) // 2)


def _corrupt(path):
  size = os.path.getsize(path)
  with open(path, "r+b") as f:
    f.seek(size // 2)
    chunk = f.read(64)
    f.seek(size // 2)
    f.write(bytes(b ^ 0xFF for b in chunk))


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """An uninterrupted 6-step run: its losses and final state."""
  out = loop.train(_config(6), str(tmp_path_factory.mktemp("ref") / "run"),
                   progress=False)
  return out["losses"], jax.device_get(out["state"])


@pytest.mark.parametrize("damage", [_truncate, _corrupt],
                         ids=["truncated", "corrupted"])
def test_resume_falls_back_past_a_damaged_step(damage, reference, tmp_path,
                                               caplog):
  workdir = str(tmp_path / "run")
  first = loop.train(_config(6), workdir, progress=False, stop_at=4)
  assert Checkpointer(workdir).all_steps() == [2, 4]
  step4 = os.path.join(workdir, "checkpoints", "4")
  damage(_largest_array_file(step4))
  before = _files(step4)
  caplog.set_level(logging.WARNING)
  second = loop.train(_config(6), workdir, progress=False)
  warnings = [r for r in caplog.records if "cannot be read" in r.getMessage()]
  assert len(warnings) == 1
  msg = warnings[0].getMessage()
  assert "step 4" in msg and "step 2" in msg and "\n" not in msg, msg
  assert warnings[0].exc_info is None  # one line, no traceback
  # Nothing deleted: the damaged step is kept, byte for byte, beside the
  # steps the resumed run wrote (4 again, and 6).
  assert _files(step4 + ".damaged") == before
  assert Checkpointer(workdir).all_steps() == [2, 4, 6]
  # Steps 3-6 repeat the uninterrupted run exactly.
  ref_losses, ref_state = reference
  assert first["losses"] == ref_losses[:4]
  assert second["losses"] == ref_losses[2:]
  for a, b in zip(jax.tree_util.tree_leaves(jax.device_get(second["state"])),
                  jax.tree_util.tree_leaves(ref_state)):
    np.testing.assert_array_equal(a, b)


@pytest.fixture(scope="module")
def two_steps(tmp_path_factory):
  """A workdir trained 2 steps (one committed checkpoint, step 2)."""
  workdir = str(tmp_path_factory.mktemp("two") / "run")
  loop.train(_config(2), workdir, progress=False)
  return workdir


def _wider(config):
  config.model.base_channels = 24


def _adafactor(config):
  config.optimizer.name = "adafactor"


@pytest.mark.parametrize("change,names", [
    (_wider, "params/"), (_adafactor, "opt_state/")],
    ids=["model_width", "optimizer"])
def test_a_state_of_another_structure_is_a_config_error(
    change, names, two_steps, tmp_path, capsys):
  # A copy, so both cases start from the same committed step.
  workdir = str(tmp_path / "run")
  shutil.copytree(two_steps, workdir)
  config_json = os.path.join(workdir, "config.json")
  if change is _wider:
    # The workdir's config.json would refuse a wider model before any
    # checkpoint is read; without it only the checkpoint can tell.
    os.remove(config_json)
    saved_config = None
  else:
    with open(config_json, "rb") as f:
      saved_config = f.read()
  before = _files(workdir)
  config = _config(4)
  change(config)
  with pytest.raises(SystemExit) as exit_info:
    loop.run_as_cli("imagen-train", loop.train, config, workdir,
                    progress=False)
  assert exit_info.value.code == 2
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1, err
  assert "Traceback" not in err
  assert err.startswith("imagen-train: checkpoint step 2 in "), err
  assert os.path.join(workdir, "checkpoints") in err, err
  assert names in err and "another structure" in err, err
  assert "new --workdir" in err, err
  # Nothing moved aside, deleted or overwritten: the config the run was
  # trained with is still there to resume with.
  assert Checkpointer(workdir).all_steps() == [2]
  assert not any(".damaged" in name for name in _files(workdir))
  after = _files(workdir)
  assert {k: v for k, v in after.items() if k in before} == before
  if saved_config is not None:
    with open(config_json, "rb") as f:
      assert f.read() == saved_config
