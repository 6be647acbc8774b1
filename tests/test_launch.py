"""The launch scripts' --dry-run output."""

import os
import subprocess

from tests import helpers

LAUNCH = os.path.join(helpers.ROOT, "launch")


def _run(script, *args):
  return subprocess.run([os.path.join(LAUNCH, script), *args], capture_output=True,
                        text=True, timeout=60)


def test_local_dry_run():
  res = _run("local.sh", "--dry-run", "--cpu-devices=8", "--", "imagen-train",
             "--config=configs/tiny.py", "--workdir=/tmp/t")
  assert res.returncode == 0, res.stderr
  assert "xla_force_host_platform_device_count=8" in res.stdout
  assert "imagen-train --config=configs/tiny.py --workdir=/tmp/t" in res.stdout


def test_tpu_pod_dry_run_runs_on_all_workers():
  res = _run("tpu_pod.sh", "--tpu=imagen", "--zone=us-central2-b", "--create",
             "--accelerator=v4-512", "--dry-run", "--", "imagen-train",
             "--config=configs/base64.py", "--workdir=gs://bucket/base64")
  assert res.returncode == 0, res.stderr
  lines = res.stdout.strip().splitlines()
  assert lines[0].startswith("gcloud compute tpus tpu-vm create imagen")
  assert "--accelerator-type=v4-512" in lines[0]
  assert "scp --recurse" in lines[1]
  assert all("--worker=all" in ln for ln in lines[1:])
  assert "jax\\[tpu\\]" in lines[2] or "jax[tpu]" in lines[2]
  assert "imagen-train" in lines[3] and "gs://bucket/base64" in lines[3]
  res = _run("tpu_pod.sh", "--zone=z", "--", "x")
  assert res.returncode == 2 and "--tpu=NAME" in res.stderr


def test_gpu_slurm_dry_run():
  res = _run("gpu_slurm.sh", "--nodes=4", "--gpus-per-node=8", "--dry-run", "--",
             "imagen-train", "--config=configs/sr256.py", "--workdir=/shared/sr")
  assert res.returncode == 0, res.stderr
  out = res.stdout
  assert "#SBATCH --nodes=4" in out and "#SBATCH --ntasks-per-node=8" in out
  assert "srun --gpus-per-task=1" in out and "imagen-train --config=configs/sr256.py" in out
  assert "sbatch" in out
  per_node = _run("gpu_slurm.sh", "--nodes=2", "--per-node", "--dry-run", "--", "x")
  assert "#SBATCH --ntasks-per-node=1" in per_node.stdout
  assert "--gpus-per-task=8" in per_node.stdout
