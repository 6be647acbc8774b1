"""imagen-sample and imagen-export CLIs: outputs, sidecar, one-line errors."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from tests import demo_fixture
from tests import helpers


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  return demo_fixture.quick_demo_workdir(tmp_path_factory)


def _run(module, args, timeout=300):
  return subprocess.run([sys.executable, "-m", module, *args], cwd=helpers.ROOT,
                        capture_output=True, text=True, timeout=timeout,
                        stdin=subprocess.DEVNULL)


def _one_line_error(proc, pattern):
  assert proc.returncode == 2, proc.stderr[-2000:]
  lines = [ln for ln in proc.stderr.splitlines()
           if ln.startswith("imagen-sample:") or ln.startswith("imagen-export:")]
  assert len(lines) == 1, proc.stderr[-2000:]
  assert "Traceback" not in proc.stderr
  assert pattern in lines[0], lines[0]


def test_sample_writes_grid_pngs_and_sidecar(workdir, tmp_path):
  prompts = tmp_path / "prompts.txt"
  prompts.write_text("# a comment\na red circle\n\ntwo blue squares\n")
  out = tmp_path / "out" / "grid.png"
  proc = _run("imagen_jax.sample", [
      f"--stages={workdir}/base,{workdir}/sr", "--prompt", "a yellow square",
      "--prompts-file", str(prompts), "--num-samples", "2", "--seed", "5",
      "--out", str(out), "--config.num_steps=3,2", "--config.guidance_scale=2.0",
      "--config.kernels=reference"])
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert out.is_file()
  files = sorted(p.name for p in out.parent.glob("grid_*.png"))
  assert files == [f"grid_{i:03d}.png" for i in range(6)]
  assert np.asarray(Image.open(out.parent / "grid_000.png")).shape == (32, 32, 3)
  side = json.loads((out.parent / "grid.json").read_text())
  assert side["prompts"] == ["a yellow square", "a red circle", "two blue squares"]
  assert side["seed"] == 5 and side["num_samples"] == 2
  assert [s["settings"]["num_steps"] for s in side["stages"]] == [3, 2]
  assert {s["settings"]["guidance_scale"] for s in side["stages"]} == {2.0}
  assert side["text_encoder"]["t5"] == "tiny"
  assert side["kernels"] == ["reference", "reference"]
  assert "stage 0" in proc.stderr and "stage 1" in proc.stderr  # progress bars


def test_sample_from_export_and_start_image(workdir, tmp_path):
  proc = _run("imagen_jax.export", [f"--workdir={workdir}/sr",
                                    f"--out={tmp_path}/sr_export"])
  assert proc.returncode == 0, proc.stderr[-3000:]
  low = tmp_path / "low.png"
  Image.fromarray(np.full((20, 20, 3), 200, np.uint8)).save(low)
  out = tmp_path / "sr.png"
  proc = _run("imagen_jax.sample", [
      f"--stages={workdir}/base,{tmp_path}/sr_export", "--prompt", "a red square",
      "--start-image", str(low), "--out", str(out), "--config.num_steps=2"])
  assert proc.returncode == 0, proc.stderr[-3000:]
  side = json.loads((tmp_path / "sr.json").read_text())
  assert side["start_image"] == str(low)
  assert np.asarray(Image.open(tmp_path / "sr_000.png")).shape == (32, 32, 3)


@pytest.mark.parametrize("args,pattern", [
    (["--stages={tmp}/missing", "--prompt", "x"], "does not exist"),
    (["--stages={wd}/sr", "--prompt", "x"], "super-resolution stage"),
    (["--stages={wd}/base,{wd}/base", "--prompt", "x"], "only the first stage"),
    (["--stages={wd}/base", "--prompts-file", "{tmp}/nope.txt"],
     "--prompts-file"),
    (["--stages={wd}/base", "--prompt", "x", "--config.sampler=euler"],
     "config.sampler='euler' is invalid; choose one of ancestral"),
    (["--stages={wd}/base", "--prompt", "x", "--config.steps=3"],
     "unknown config field"),
    (["--stages={wd}/base", "--prompt", "x", "--config.kernels=tpu"],
     "kernels='tpu' is invalid"),
    (["--stages={wd}/base"], "no prompts"),
])
def test_sample_bad_input_is_one_line_exit_2(workdir, tmp_path, args, pattern):
  args = [a.format(tmp=tmp_path, wd=workdir) for a in args]
  _one_line_error(_run("imagen_jax.sample", args), pattern)


@pytest.mark.parametrize("module,args", [
    ("imagen_jax.sample", ["--stages={tmp}/missing", "--prompt", "x"]),
    ("imagen_jax.export", ["--workdir={tmp}/missing", "--out={tmp}/out"]),
    ("imagen_jax.convert", ["--src={tmp}", "--out={tmp}/out"]),
])
def test_error_is_the_only_line_a_user_sees(tmp_path, module, args):
  """Nothing (TensorFlow's start-up logging included) precedes the error
  line in a user's environment, which does not quiet TensorFlow."""
  env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
  proc = subprocess.run(
      [sys.executable, "-m", module, *[a.format(tmp=tmp_path) for a in args]],
      cwd=helpers.ROOT, capture_output=True, text=True, timeout=300,
      stdin=subprocess.DEVNULL, env=env)
  assert proc.returncode == 2, proc.stderr[-2000:]
  lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
  assert len(lines) == 1, proc.stderr[-2000:]


def test_sample_stage_chain_mismatch(workdir, tmp_path):
  """An SR stage whose low-res size does not match the base's output."""
  bad = tmp_path / "bad_sr"
  proc = _run("imagen_jax.export", [f"--workdir={workdir}/sr", f"--out={bad}"])
  assert proc.returncode == 0, proc.stderr[-2000:]
  cfg = json.loads((bad / "stage.json").read_text())
  cfg["lowres_resolution"] = 16
  cfg["resolution"] = 64
  (bad / "stage.json").write_text(json.dumps(cfg))
  _one_line_error(_run("imagen_jax.sample", [f"--stages={workdir}/base,{bad}",
                                             "--prompt", "x"]),
                  "chain mismatch")
