"""Crash fuzz: SIGKILL a tiny training run at random moments, then finish it.

  python benchmarks/crash_fuzz.py [--kills=20] [--steps=300] [--seed=0]

Runs ``imagen-train`` (configs/tiny.py, one CPU device, a save every
``--every`` steps, a log line every step) uninterrupted into one workdir,
then into another that it kills with SIGKILL ``--kills`` times: half of the
kills at a random moment after the run has resumed training, half while an
async save is being written (an orbax temporary step directory exists),
after a random delay. Then it lets the run finish and checks that

- every loss any of the runs logged (TensorBoard, exact float32) equals the
  uninterrupted run's at that step, and every step was logged;
- the final checkpoint (params, EMA, optimizer state, counters, data
  position) is bitwise equal to the uninterrupted run's.

Prints a table of the kills (when, where, which step had committed) and the
verdict. Not part of the test suite: it takes minutes.
"""

from __future__ import annotations

import argparse
import glob
import os
import random
import signal
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def _cmd(workdir: str, args) -> list[str]:
  return [sys.executable, "-m", "imagen_jax.train",
          f"--config={ROOT}/configs/tiny.py", f"--workdir={workdir}",
          f"--config.total_steps={args.steps}",
          f"--config.checkpoint_every={args.every}", "--config.log_every=1",
          "--config.keep_checkpoints=2", "--config.mesh.num_devices=1",
          "--config.mesh.shape=(1,1,1)"]


def _env() -> dict:
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu",
             TF_CPP_MIN_LOG_LEVEL="3")
  env["XLA_FLAGS"] = " ".join(
      f for f in env.get("XLA_FLAGS", "").split()
      if "xla_force_host_platform_device_count" not in f)
  return env


def _in_save(workdir: str) -> bool:
  return bool(glob.glob(os.path.join(workdir, "checkpoints", "*.orbax-checkpoint-tmp*")))


def _events_size(workdir: str) -> int:
  return sum(os.path.getsize(p) for p in
             glob.glob(os.path.join(workdir, "events.out.tfevents.*")))


def _committed(workdir: str):
  from imagen_jax.train import checkpoint  # pylint: disable=g-import-not-at-top
  return checkpoint.latest_step(workdir)


def _losses(workdir: str) -> list[tuple[int, float]]:
  from tensorboard.compat.proto import event_pb2  # pylint: disable=g-import-not-at-top
  from tensorboard.util import tensor_util  # pylint: disable=g-import-not-at-top
  from imagen_jax.text import tasks  # pylint: disable=g-import-not-at-top
  out = []
  for path in glob.glob(os.path.join(workdir, "events.out.tfevents.*")):
    with open(path, "rb") as f:
      try:
        for rec in tasks.read_tfrecords(f):
          ev = event_pb2.Event.FromString(rec)
          for v in ev.summary.value:
            if v.tag == "loss":
              out.append((int(ev.step),
                          float(tensor_util.make_ndarray(v.tensor))))
      except ValueError:
        pass  # the record a kill cut short
  return out


def _final_state(workdir: str):
  """The newest checkpoint's arrays and meta, as numpy (no model needed)."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  from imagen_jax.train import checkpoint  # pylint: disable=g-import-not-at-top
  step = checkpoint.latest_step(workdir)
  d = os.path.join(checkpoint.checkpoint_dir(workdir), str(step))
  state = ocp.PyTreeCheckpointer().restore(os.path.join(d, "state"))
  meta = ocp.Checkpointer(ocp.JsonCheckpointHandler()).restore(
      os.path.join(d, "meta"))
  return step, state, meta


def main() -> int:
  p = argparse.ArgumentParser()
  p.add_argument("--kills", type=int, default=20)
  p.add_argument("--steps", type=int, default=300)
  p.add_argument("--every", type=int, default=4)
  p.add_argument("--seed", type=int, default=0)
  args = p.parse_args()
  rng = random.Random(args.seed)
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
  import common  # pylint: disable=g-import-not-at-top
  print(common.machine_line())
  t_start = time.time()
  with tempfile.TemporaryDirectory() as tmp:
    ref, fuzz = os.path.join(tmp, "ref"), os.path.join(tmp, "fuzz")
    t0 = time.time()
    subprocess.run(_cmd(ref, args), env=_env(), check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ref_s = time.time() - t0
    rows, kills = [], 0
    while kills < args.kills:
      in_save = kills % 2 == 1
      before = _committed(fuzz)
      size0 = _events_size(fuzz)
      proc = subprocess.Popen(_cmd(fuzz, args), env=_env(),
                              stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
      t0 = time.time()
      # Wait until this run trains (its first logged step), then for the
      # moment chosen.
      while proc.poll() is None and _events_size(fuzz) <= size0 + 200:
        time.sleep(0.01)
      if in_save:
        while proc.poll() is None and not _in_save(fuzz):
          time.sleep(0.005)
        time.sleep(rng.uniform(0.0, 0.3))
        where = "in save" if _in_save(fuzz) else "just after a save"
      else:
        time.sleep(rng.uniform(0.0, 2.0))
        where = "in save" if _in_save(fuzz) else "training"
      if proc.poll() is not None:
        rows.append([kills + 1, "-", "finished before the kill", before, "-"])
        break
      proc.send_signal(signal.SIGKILL)
      proc.wait()
      kills += 1
      rows.append([kills, f"{time.time() - t0:.1f}", where, before,
                   _committed(fuzz)])
    t0 = time.time()
    done = subprocess.run(_cmd(fuzz, args), env=_env(),
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    final_s = time.time() - t0
    if done.returncode:
      print(done.stderr.decode(errors="replace")[-3000:])
      return 1
    ref_losses = dict(_losses(ref))
    got = _losses(fuzz)
    mismatched = [(s, l, ref_losses.get(s)) for s, l in got
                  if ref_losses.get(s) != l]
    missing = sorted(set(ref_losses) - {s for s, _ in got})
    (rs, rstate, rmeta), (fs, fstate, fmeta) = _final_state(ref), _final_state(fuzz)
    leaves_r = jax.tree_util.tree_leaves(rstate)
    leaves_f = jax.tree_util.tree_leaves(fstate)
    state_equal = (rs == fs and rmeta == fmeta and len(leaves_r) == len(leaves_f)
                   and all(np.array_equal(np.asarray(a), np.asarray(b))
                           for a, b in zip(leaves_r, leaves_f)))
  print(f"\ntiny config, {args.steps} steps, save every {args.every}, one CPU "
        f"device; uninterrupted run {ref_s:.0f} s, final run {final_s:.0f} s, "
        f"all {time.time() - t_start:.0f} s")
  common.print_table(["kill", "s after start", "moment", "committed before",
                      "committed after"], rows)
  in_saves = sum(r[2] == "in save" for r in rows)
  print(f"\nkills: {kills} ({in_saves} inside an async save); logged losses: "
        f"{len(got)} over {len(ref_losses)} steps, {len(mismatched)} differ "
        f"from the uninterrupted run, {len(missing)} steps never logged; "
        f"final state (step {fs}) bitwise equal: {state_equal}")
  if mismatched:
    print("first mismatches:", mismatched[:5])
  return 0 if state_equal and not mismatched and not missing else 1


if __name__ == "__main__":
  sys.exit(main())
