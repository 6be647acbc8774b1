"""Training as separate processes: resume after SIGKILL, SIGTERM, 2 hosts, CLI errors."""

import os
import random
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from imagen_jax.train import loop
from tests import helpers

TINY = f"--config={helpers.ROOT}/configs/tiny.py"
FAST = ["--config.log_every=1", "--config.mesh.shape=(1,1,1)",
        "--config.mesh.num_devices=1"]


def _popen(workdir, *args, env=None):
  full_env = dict(os.environ)
  full_env.update(env or {})
  return subprocess.Popen(
      [sys.executable, "-m", "imagen_jax.train", TINY, f"--workdir={workdir}",
       *args], cwd=helpers.ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
      text=True, env=full_env)


def _final_state(workdir, step):
  from imagen_jax import build, parallel
  from imagen_jax.stage import Stage
  from imagen_jax.train import optim
  from imagen_jax.train import state as state_lib
  from imagen_jax.train.checkpoint import Checkpointer
  import jax
  config = helpers.tiny_train_config()
  mesh = parallel.make_mesh((1, 1, 1), jax.devices()[:1])
  stage = Stage.from_config(config)
  tx, _ = optim.make_optimizer(config.optimizer, int(config.total_steps))
  abstract, sh = state_lib.state_shardings(stage.unet, build.unet_inputs(config, 1, 4),
                                           tx, mesh)
  state, meta = Checkpointer(workdir).restore(step, abstract, sh)
  return jax.device_get(state), meta


def test_resume_after_sigkill_repeats_the_run_exactly(tmp_path):
  args = FAST + ["--config.total_steps=20", "--config.checkpoint_every=3"]
  ref = _popen(str(tmp_path / "ref"), *args)
  out, err = ref.communicate(timeout=900)
  assert ref.returncode == 0, err[-2000:]
  work = tmp_path / "killed"
  ckdir = work / "checkpoints"
  rng = random.Random(0)
  kills = 0
  for attempt in range(4):
    proc = _popen(str(work), *args)
    # Kill at a random moment: after 1-3 new checkpoint events, sometimes
    # while a save is still in its temporary directory.
    target = rng.randint(1, 3)
    seen = set(os.listdir(ckdir)) if ckdir.exists() else set()
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None:
      now = set(os.listdir(ckdir)) if ckdir.exists() else set()
      new = now - seen
      if any("tmp" in n for n in new) and attempt % 2 == 0:
        break  # mid-save
      if len([n for n in new if n.isdigit()]) >= target:
        time.sleep(rng.uniform(0.0, 0.5))
        break
      time.sleep(0.01)
    if proc.poll() is None:
      proc.send_signal(signal.SIGKILL)
      kills += 1
    proc.communicate()
  assert kills >= 2
  proc = _popen(str(work), *args)
  out, err = proc.communicate(timeout=900)
  assert proc.returncode == 0, err[-2000:]
  ref_losses = helpers.read_scalars(str(tmp_path / "ref"), "loss")
  got_losses = helpers.read_scalars(str(work), "loss")
  assert sorted(ref_losses) == sorted(got_losses) == list(range(1, 21))
  for step in ref_losses:
    assert ref_losses[step] == got_losses[step], step
  a, meta_a = _final_state(str(tmp_path / "ref"), 20)
  b, meta_b = _final_state(str(work), 20)
  assert meta_a["data_position"] == meta_b["data_position"] == 20
  import jax
  for x, y in zip(jax.tree_util.tree_leaves((a.params, a.ema_params, a.opt_state)),
                  jax.tree_util.tree_leaves((b.params, b.ema_params, b.opt_state))):
    np.testing.assert_array_equal(x, y)


def test_sigterm_saves_and_exits_then_resumes(tmp_path):
  work = str(tmp_path / "term")
  args = FAST + ["--config.total_steps=400", "--config.checkpoint_every=1000"]
  proc = _popen(work, *args)
  deadline = time.time() + 600
  while time.time() < deadline:
    line = proc.stdout.readline()
    if line.startswith("step 3/") or proc.poll() is not None:
      break
  proc.send_signal(signal.SIGTERM)
  out, err = proc.communicate(timeout=300)
  assert proc.returncode == loop.PREEMPTED_EXIT_CODE, err[-2000:]
  assert "preempted at step" in err
  from imagen_jax.train.checkpoint import Checkpointer
  steps = Checkpointer(work).all_steps()
  assert len(steps) == 1 and 3 <= steps[0] < 400
  saved = steps[0]
  proc = _popen(work, *(FAST + ["--config.total_steps=%d" % (saved + 2),
                                "--config.checkpoint_every=1000"]))
  out, err = proc.communicate(timeout=600)
  assert proc.returncode == 0, err[-2000:]
  assert f"step {saved} -> {saved + 2}" in out


def _free_port():
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


@pytest.mark.parametrize("mesh_args", [
    ["--config.mesh.shape=(8,1,1)"],
    # Each process as one DCN granule (as GPU hosts are): a (4,1,1) mesh per
    # process, two of them along data.
    ["--config.mesh.shape=(4,1,1)", "--config.mesh.dcn_shape=(2,1,1)"],
], ids=["one_mesh", "hybrid_dcn"])
def test_two_processes_match_one(tmp_path, mesh_args):
  common = ["--config.total_steps=4", "--config.log_every=1",
            "--config.checkpoint_every=4"]
  one = _popen(str(tmp_path / "one"), *common, "--config.mesh.shape=(8,1,1)")
  _, err = one.communicate(timeout=900)
  assert one.returncode == 0, err[-2000:]
  port = _free_port()
  env = {"XLA_FLAGS": os.environ["XLA_FLAGS"].replace(
      "device_count=8", "device_count=4")}
  procs = [_popen(str(tmp_path / "two"), *common, *mesh_args,
                  f"--coordinator=localhost:{port}",
                  "--num_processes=2", f"--process_id={i}", env=env)
           for i in range(2)]
  for p in procs:
    _, err = p.communicate(timeout=900)
    assert p.returncode == 0, err[-3000:]
  a = helpers.read_scalars(str(tmp_path / "one"), "loss")
  b = helpers.read_scalars(str(tmp_path / "two"), "loss")
  assert sorted(a) == sorted(b) == [1, 2, 3, 4]
  for step in a:
    np.testing.assert_allclose(b[step], a[step], rtol=1e-5)


@pytest.mark.parametrize("args,match", [
    (["--config.no_such_key=3"], "no_such_key"),
    (["--config.batch_size=12", "--config.mesh.shape=(8,1,1)"],
     "batch_size 12 is not divisible by the 8 data-parallel devices"),
    (["--config.mesh.shape=(16,1,1)"], "needs 16 devices but 8 are present"),
    (["--config.mesh.dcn_shape=(3,1,1)"],
     r"dcn_shape=\(3, 1, 1\) does not split the 8 devices"),
    (["--config.mesh.shape=(4,1,1)", "--config.mesh.dcn_shape=(2,1,1)"],
     r"asks for 2 slices but the devices form 1 \(processes\)"),
])
def test_cli_bad_input_one_line_exit_2(tmp_path, args, match):
  res = helpers.run_cli("imagen_jax.train", TINY, f"--workdir={tmp_path}/w", *args)
  assert res.returncode == 2, res.stderr[-2000:]
  lines = [ln for ln in res.stderr.strip().splitlines() if ln.startswith("imagen-train:")]
  assert len(lines) == 1 and re_search(match, lines[0]), res.stderr[-2000:]


def test_cli_missing_config_file(tmp_path):
  res = helpers.run_cli("imagen_jax.train", f"--config={tmp_path}/nope.py",
                        f"--workdir={tmp_path}/w")
  assert res.returncode == 2
  lines = [ln for ln in res.stderr.strip().splitlines() if ln.startswith("imagen-train:")]
  assert len(lines) == 1 and "nope.py" in lines[0]


def re_search(pattern, text):
  import re
  return re.search(pattern, text) is not None
