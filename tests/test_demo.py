"""The embedded default main job (quick variant) and imagen-eval."""

import json
import os
import subprocess
import sys

from tests import demo_fixture
from tests import helpers


def _run(args, timeout=600):
  return subprocess.run([sys.executable, "-m", *args], cwd=helpers.ROOT,
                        capture_output=True, text=True, timeout=timeout,
                        stdin=subprocess.DEVNULL)


def test_quick_demo_report_and_resume(tmp_path_factory):
  workdir = demo_fixture.quick_demo_workdir(tmp_path_factory)
  report = json.load(open(os.path.join(workdir, "report.json")))
  for key in ("all_correct", "color", "shape", "count", "position"):
    assert 0.0 <= report["shapes"][key] <= 1.0
  assert set(report["by_category"]) == {"single", "count", "relation", "holdout"}
  assert report["by_category"]["holdout"]["n"] == 2
  assert len(report["prompts"]) == report["shapes"]["n"] == 8
  assert all(not p["seen_in_training"] for p in report["prompts"]
             if p["category"] == "holdout")
  assert os.path.isfile(report["grid"])
  assert report["text_encoder"]["pretrained"] is False
  # Stage diagnostics: every row, on the same suite; the ground truth scores
  # perfectly, and the cascade row is the report's own score.
  diag = report["diagnostics"]
  assert set(diag) == {"ceiling", "base_resolution_ceiling", "sr_only",
                       "base_only", "cascade"}
  assert diag["ceiling"]["all_correct"] == 1.0
  assert diag["cascade"]["all_correct"] == report["shapes"]["all_correct"]
  for row in diag.values():
    assert row["n"] == 8 and 0.0 <= row["all_correct"] <= 1.0
  # Re-running resumes: embeddings and both stages are complete, only the
  # evaluation runs again, and gives the same images (fixed seed).
  proc = _run(["imagen_jax.demo", "--config=configs/demo.py:quick",
               f"--workdir={workdir}", f"--config.data.data_dir={os.path.dirname(workdir)}/tfds"])
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "is complete" in proc.stdout
  assert "step 30 -> 30" in proc.stdout and "step 20 -> 20" in proc.stdout
  again = json.load(open(os.path.join(workdir, "report.json")))
  assert [p["scores"] for p in again["prompts"]] == [p["scores"] for p in report["prompts"]]
  assert again["timings"]["total_s"] < report["timings"]["total_s"]


def test_eval_cli_and_bad_flags(tmp_path_factory, tmp_path):
  workdir = demo_fixture.quick_demo_workdir(tmp_path_factory)
  proc = _run(["imagen_jax.eval", f"--workdir={workdir}", f"--out={tmp_path}/ev",
               "--per_category=1", "--num_steps=2", "--threshold=none,static",
               "--suite_seed=77"])
  assert proc.returncode == 0, proc.stderr[-3000:]
  rep = json.load(open(tmp_path / "ev" / "report.json"))
  assert rep["shapes"]["n"] == 4
  assert [s["num_steps"] for s in rep["settings"]["stages"]] == [2, 2]
  assert [s["threshold"] for s in rep["settings"]["stages"]] == ["none", "static"]
  default = json.load(open(os.path.join(workdir, "report.json")))
  # another suite: its relation prompt (1,080 possible) is not the default's
  assert rep["prompts"][2]["category"] == "relation"
  assert rep["prompts"][2]["prompt"] not in [p["prompt"] for p in default["prompts"]]
  assert "shapes alignment" in proc.stdout
  assert "stage diagnostics" in proc.stdout and "sr_only" in proc.stdout
  proc = _run(["imagen_jax.eval", f"--workdir={workdir}", f"--out={tmp_path}/ev2",
               "--threshold=soft"])
  assert proc.returncode == 2
  assert "choose one of dynamic, static, none" in proc.stderr.strip().splitlines()[-1]
  proc = _run(["imagen_jax.eval", f"--stages={tmp_path}/missing"])
  assert proc.returncode == 2
  assert proc.stderr.strip().splitlines()[-1].startswith("imagen-eval:")
  assert "does not exist" in proc.stderr
