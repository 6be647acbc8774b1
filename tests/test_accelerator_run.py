"""benchmarks/accelerator_run.sh's parts that no accelerator has run yet.

A lent GPU is rare and its time short: the kernel A/B and the IF-I-XL row
must work on the first call there. SMOKE=1 runs the same parts, the same
scripts and workers, on tiny stand-ins on this machine; the figures are not
looked at, only that every row was measured.
"""

import os
import subprocess
import sys

import pytest

from tests import helpers


def _run_part(part, tmp_path):
  env = dict(os.environ, SMOKE="1", PYTHON=sys.executable,
             JAX_COMPILATION_CACHE_DIR=str(tmp_path / "cache"))
  out = tmp_path / "out"
  proc = subprocess.run(
      ["bash", os.path.join(helpers.ROOT, "benchmarks", "accelerator_run.sh"),
       part, str(out)], cwd=helpers.ROOT, env=env, capture_output=True,
      text=True, timeout=600, check=False)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  return proc.stdout, out


def test_kernels_part_times_every_implementation(tmp_path):
  stdout, out = _run_part("kernels", tmp_path)
  table = (out / "kernels_tiny_bfloat16_b2.txt").read_text()
  for impl in ("reference", "xla_cpu", "cudnn"):
    assert f"kernels={impl}" in table, table[-2000:]
  assert "per round: median" in stdout


@pytest.mark.parametrize("bad_kernels", [False, True])
def test_if_part_times_ours_per_kernel_and_diffusers(tmp_path, bad_kernels,
                                                     monkeypatch):
  if bad_kernels:
    # A row that fails makes the part fail, after the other rows.
    monkeypatch.setenv("IF_KERNELS", "nope")
    with pytest.raises(AssertionError, match="1 IF row"):
      _run_part("if", tmp_path)
    return
  _, out = _run_part("if", tmp_path)
  table = (out / "if_sample_speed.txt").read_text()
  rows = [line for line in table.splitlines() if line.startswith("| ")]
  assert any("kernels=cudnn" in r for r in rows), table[-2000:]
  assert any("kernels=reference" in r for r in rows), table[-2000:]
  assert any("diffusers IFPipeline" in r for r in rows), table[-2000:]
