"""Everything on a gs:// workdir, against a real GCS server on localhost.

One module fixture runs the whole story once, in two subprocesses whose
environment points tensorstore, google-cloud-storage and gcsfs at
fake-gcs-server (``tests/gcs_server.py``), with an empty directory as the
current directory:

  A. images and captions in the bucket -> ``imagen-embed`` (the store in the
     bucket) -> ``imagen-train`` on ``gs://.../run``; the test SIGKILLs it
     while a checkpoint is being written (a step folder without its commit
     marker);
  B. the same training resumes to the end; an uninterrupted run of the same
     config trains into a local workdir from the same store; then
     ``imagen-export`` gs -> gs and ``imagen-sample`` from the export, writing
     to the bucket.

The tests then read the bucket through the server's JSON API. Run as a
script, this file is the subprocesses' driver.
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from tests import gcs_server
from tests import helpers

BUCKET = "imagen-test"
RUN = f"gs://{BUCKET}/run"
EXPORT = f"gs://{BUCKET}/export"
TOTAL = 10
N_IMAGES = 16


def _overrides(config, phase: str) -> None:
  """The test run: tiny model, images from the bucket.

  Phase A saves every 2 steps (to be killed in a save); the others save at
  the end only, which changes no loss.
  """
  config.data.source = "folder"
  config.data.folder = f"gs://{BUCKET}/images"
  config.data.store = f"{RUN}/embeddings"
  config.embed.batch_size = 8
  config.embed.shard_size = 8
  config.embed.mesh_shape = (1, 1, 1)
  config.batch_size = 4
  config.total_steps = TOTAL
  config.log_every = 1
  config.checkpoint_every = 2 if phase == "A" else TOTAL
  config.keep_checkpoints = 3
  config.prefetch = 1
  config.sample_every = TOTAL if phase == "B" else 0
  config.num_samples = 2
  config.sample.num_steps = 2


def _driver(phase: str, local_workdir: str) -> None:
  """Runs phase A (embed + train, to be killed) or B (see module doc)."""
  sys.path.insert(0, helpers.ROOT)
  import jax  # pylint: disable=g-import-not-at-top
  from imagen_jax import embed  # pylint: disable=g-import-not-at-top
  from imagen_jax import export  # pylint: disable=g-import-not-at-top
  from imagen_jax import sample  # pylint: disable=g-import-not-at-top
  from imagen_jax.train import loop  # pylint: disable=g-import-not-at-top

  t0 = time.time()

  def mark(what):
    print(f"TIME {what} {time.time() - t0:.1f}s", flush=True)
  mark("imports")
  config = helpers.load_config("tiny")
  _overrides(config, phase)
  if phase == "A":
    embed.run_embed(config, RUN, progress=False)
    mark("embed")
    loop.train(config, RUN, progress=False)
    return
  gs = loop.train(config, RUN, progress=False)
  mark("resume")
  local_config = helpers.load_config("tiny")
  _overrides(local_config, "local")
  ref = loop.train(local_config, local_workdir, progress=False)
  mark("local run")
  same = jax.tree_util.tree_all(jax.tree_util.tree_map(
      lambda a, b: np.array_equal(np.asarray(a), np.asarray(b)),
      jax.device_get(gs["state"]), jax.device_get(ref["state"])))
  codes = [
      export.main([f"--workdir={RUN}", f"--out={EXPORT}"]),
      mark("export") or sample.main([f"--stages={EXPORT}", "--prompt=a red square",
                   f"--out=gs://{BUCKET}/samples/export.png",
                   "--config.num_steps=2"]),
  ]
  mark("sample")
  print("RESULT " + json.dumps({"state_equal": bool(same), "codes": codes,
                                "step": gs["step"]}), flush=True)


def _upload_images(server) -> None:
  """16x16 PNGs of coloured squares with .txt captions, into the bucket."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  import urllib.request  # pylint: disable=g-import-not-at-top
  colours = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220),
             "yellow": (230, 220, 30)}
  rs = np.random.RandomState(0)
  for i in range(N_IMAGES):
    name = list(colours)[i % 4]
    img = np.full((16, 16, 3), 240, np.uint8)
    x, y = rs.randint(0, 8, 2)
    img[y:y + 8, x:x + 8] = colours[name]
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    for obj, data in ((f"images/{i:02d}.png", buf.getvalue()),
                      (f"images/{i:02d}.txt", f"a {name} square".encode())):
      req = urllib.request.Request(
          f"{server.url}/upload/storage/v1/b/{BUCKET}/o?uploadType=media&name="
          f"{obj}", data=data, method="POST",
          headers={"Content-Type": "application/octet-stream"})
      urllib.request.urlopen(req, timeout=10).read()


def _env(server) -> dict:
  env = dict(os.environ, **server.env())
  env["PYTHONPATH"] = os.pathsep.join(
      [helpers.ROOT] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
  # One CPU device: the test is about storage, not sharding.
  env["XLA_FLAGS"] = " ".join(
      f for f in env.get("XLA_FLAGS", "").split()
      if "xla_force_host_platform_device_count" not in f)
  return env


def _uncommitted_steps(server) -> set[int]:
  names = server.list(BUCKET, "run/checkpoints/")
  steps, committed = set(), set()
  for n in names:
    part = n[len("run/checkpoints/"):].split("/")[0]
    if part.isdigit():
      steps.add(int(part))
      if n.endswith("/commit_success.txt"):
        committed.add(int(part))
  return steps - committed


@pytest.fixture(scope="module")
def story(tmp_path_factory):
  server, why = gcs_server.start()
  if server is None:
    pytest.skip(why)
  try:
    server.create_bucket(BUCKET)
    _upload_images(server)
    cwd = tmp_path_factory.mktemp("empty_cwd")
    local = str(tmp_path_factory.mktemp("local") / "run")
    cmd = [sys.executable, os.path.abspath(__file__)]
    env = _env(server)
    a = subprocess.Popen(cmd + ["A", local], cwd=cwd, env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    killed_in_save = None
    deadline = time.time() + 400
    while time.time() < deadline and a.poll() is None:
      partial = [s for s in _uncommitted_steps(server) if s >= 4]
      if partial:
        a.send_signal(signal.SIGKILL)
        killed_in_save = partial
        break
      time.sleep(0.02)
    out_a = a.communicate()[0].decode(errors="replace")
    assert a.returncode == -signal.SIGKILL, out_a[-3000:]
    # The kill landed inside a save: that step is still uncommitted.
    assert set(killed_in_save) & _uncommitted_steps(server), killed_in_save
    b = subprocess.run(cmd + ["B", local], cwd=cwd, env=env,
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                       timeout=1500)
    out_b = b.stdout.decode(errors="replace")
    assert b.returncode == 0, out_b[-3000:]
    result = json.loads(next(l for l in out_b.splitlines()
                             if l.startswith("RESULT "))[len("RESULT "):])
    yield dict(server=server, cwd=cwd, local=local, result=result,
               out=out_a + out_b)
  finally:
    server.stop()


def _scalars(event_files: list[bytes], tag: str) -> list[tuple[int, float]]:
  """(step, value) of one scalar tag over TensorBoard event files' bytes."""
  from tensorboard.compat.proto import event_pb2  # pylint: disable=g-import-not-at-top
  from tensorboard.util import tensor_util  # pylint: disable=g-import-not-at-top
  from imagen_jax.text import tasks  # pylint: disable=g-import-not-at-top
  out = []
  for data in event_files:
    for rec in tasks.read_tfrecords(io.BytesIO(data)):
      ev = event_pb2.Event.FromString(rec)
      for v in ev.summary.value:
        if v.tag == tag:
          val = (float(tensor_util.make_ndarray(v.tensor))
                 if v.HasField("tensor") else float(v.simple_value))
          out.append((int(ev.step), val))
  return out


def test_killed_in_a_save_resumes_to_the_uninterrupted_losses_and_params(story):
  server = story["server"]
  assert story["result"]["step"] == TOTAL
  # Final train state (params, EMA, optimizer state) bitwise equal.
  assert story["result"]["state_equal"]
  events = [server.read(BUCKET, n) for n in server.list(BUCKET, "run/")
            if "tfevents" in n]
  # Two runs (killed, resumed): two event files.
  assert len(events) >= 2
  local_events = []
  for root, _, files in os.walk(story["local"]):
    for f in files:
      if "tfevents" in f:
        with open(os.path.join(root, f), "rb") as fh:
          local_events.append(fh.read())
  ref = dict(_scalars(local_events, "loss"))
  assert sorted(ref) == list(range(1, TOTAL + 1))
  got = _scalars(events, "loss")
  # Every step is logged by one run or the other, and every logged loss (the
  # killed run's and the resumed run's repeats too) equals the reference.
  assert {s for s, _ in got} == set(ref)
  for step, loss in got:
    assert loss == ref[step], (step, loss, ref[step])


def test_events_and_sample_grids_land_in_the_bucket(story):
  names = story["server"].list(BUCKET)
  assert any(n.startswith("run/") and "tfevents" in n for n in names)
  assert f"run/samples/step_{TOTAL:08d}.png" in names
  assert "samples/export.png" in names and "samples/export.json" in names
  sidecar = json.loads(story["server"].read(BUCKET, "samples/export.json"))
  assert sidecar["stages"][0]["path"] == EXPORT


def test_export_and_sample_to_and_from_gs(story):
  assert story["result"]["codes"] == [0, 0]
  names = story["server"].list(BUCKET, "export/")
  assert "export/stage.json" in names and "export/text_encoder.json" in names
  assert any(n.startswith("export/params/") for n in names)
  stage = json.loads(story["server"].read(BUCKET, "export/stage.json"))
  assert stage["exported_from"] == {"workdir": RUN, "step": TOTAL, "ema": True}
  # The embedding store is in the bucket too, and complete.
  store = story["server"].list(BUCKET, "run/embeddings/")
  assert "run/embeddings/manifest.json" in store


def test_nothing_is_written_under_the_current_directory(story):
  assert os.listdir(story["cwd"]) == []


if __name__ == "__main__":
  _driver(sys.argv[1], sys.argv[2])
