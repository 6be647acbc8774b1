"""The demo, the eval CLI and a deepfloyd_if conversion on gs://.

Like ``test_gcs.py``, against fake-gcs-server on localhost
(``tests/gcs_server.py``), with the CLIs in subprocesses whose environment
points tensorstore, google-cloud-storage and gcsfs at the server and whose
current directory is an empty one:

  - ``imagen-demo --workdir=gs://...`` (the quick variant) end to end, then
    again (it must resume: nothing retrains), then ``imagen-eval`` on that
    workdir with ``--out=gs://...``; one module fixture runs the three, so
    the demo trains once;
  - a tiny IF stage in deepfloyd_if's own layout (``config.yml`` +
    ``pytorch_model.bin``) and a T5 directory in a bucket, converted by
    ``imagen-convert`` from the bucket to the bucket and loaded by
    ``Cascade.load`` from there.

Run as a script, this file is the deepfloyd subprocess's driver.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from tests import gcs_server
from tests import helpers

DEMO_BUCKET = "imagen-demo"
DEMO_RUN = f"gs://{DEMO_BUCKET}/run"
EVAL_OUT = f"gs://{DEMO_BUCKET}/evalout"


def _cli(module: str, args: list[str], cwd, env) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd,
                        env=env, stdout=subprocess.PIPE,
                        stderr=subprocess.STDOUT, text=True, timeout=900,
                        stdin=subprocess.DEVNULL)


def _checkpoint_objects(server, stage: str) -> dict[str, str]:
  """Name -> generation of each object under one demo stage's checkpoints/
  (a rewritten object gets a new generation)."""
  return {o["name"]: o["generation"]
          for o in server.objects(DEMO_BUCKET, f"run/{stage}/checkpoints/")}


@pytest.fixture(scope="module")
def demo_story(tmp_path_factory):
  """The quick demo on a gs:// workdir, run twice, then imagen-eval on it."""
  server, why = gcs_server.start()
  if server is None:
    pytest.skip(why)
  try:
    server.create_bucket(DEMO_BUCKET)
    cwd = tmp_path_factory.mktemp("demo_empty_cwd")
    # The rendered dataset stays local: rendering into a gs:// data_dir goes
    # through TF's own GCS client and is covered by test_gcs.py.
    data_dir = str(tmp_path_factory.mktemp("demo_tfds"))
    env = gcs_server.subprocess_env(server)
    demo_args = [f"--workdir={DEMO_RUN}",
                 f"--config={helpers.ROOT}/configs/demo.py:quick",
                 f"--config.data.data_dir={data_dir}"]
    first = _cli("imagen_jax.demo", demo_args, cwd, env)
    assert first.returncode == 0, first.stdout[-3000:]
    report = json.loads(server.read(DEMO_BUCKET, "run/report.json"))
    trained = {s: _checkpoint_objects(server, s) for s in ("base", "sr")}
    again = _cli("imagen_jax.demo", demo_args, cwd, env)
    assert again.returncode == 0, again.stdout[-3000:]
    evaluated = _cli("imagen_jax.eval", [
        f"--workdir={DEMO_RUN}", f"--out={EVAL_OUT}", "--per_category=1",
        "--num_steps=2"], cwd, env)
    assert evaluated.returncode == 0, evaluated.stdout[-3000:]
    yield dict(server=server, cwd=cwd, report=report, trained=trained,
               again=again.stdout, eval=evaluated.stdout)
  finally:
    server.stop()


def test_demo_on_a_gs_workdir_writes_everything_to_the_bucket(demo_story):
  server, report = demo_story["server"], demo_story["report"]
  names = server.list(DEMO_BUCKET, "run/")
  for name in ("run/report.json", "run/demo_config.json", "run/eval/grid.png",
               "run/eval/report.json", "run/embeddings/manifest.json",
               "run/base/config.json", "run/sr/config.json",
               "run/base/text_encoder.json"):
    assert name in names, name
  for stage, steps in (("base", 30), ("sr", 20)):
    assert f"run/{stage}/checkpoints/{steps}/commit_success.txt" in names
    assert any(n.startswith(f"run/{stage}/") and "tfevents" in n
               for n in names)
  assert report["grid"] == f"{DEMO_RUN}/eval/grid.png"
  assert len(report["prompts"]) == report["shapes"]["n"] == 8
  samples = [n for n in names if n.startswith("run/eval/samples/")]
  assert len(samples) == 8
  assert [s["path"] for s in report["stages"]] == [f"{DEMO_RUN}/base",
                                                  f"{DEMO_RUN}/sr"]
  assert os.listdir(demo_story["cwd"]) == []


def test_demo_on_a_gs_workdir_resumes_without_retraining(demo_story):
  out, server = demo_story["again"], demo_story["server"]
  assert "is complete" in out
  assert "step 30 -> 30" in out and "step 20 -> 20" in out
  # The second run wrote no checkpoint and rewrote none.
  for stage, before in demo_story["trained"].items():
    assert _checkpoint_objects(server, stage) == before, stage
  # The evaluation ran again on the same checkpoints: the same images.
  again = json.loads(server.read(DEMO_BUCKET, "run/report.json"))
  assert ([p["scores"] for p in again["prompts"]]
          == [p["scores"] for p in demo_story["report"]["prompts"]])
  assert os.listdir(demo_story["cwd"]) == []


def test_eval_cli_writes_its_report_grid_and_samples_to_gs(demo_story):
  server = demo_story["server"]
  names = server.list(DEMO_BUCKET, "evalout/")
  assert "evalout/report.json" in names and "evalout/grid.png" in names
  rep = json.loads(server.read(DEMO_BUCKET, "evalout/report.json"))
  assert rep["shapes"]["n"] == 4
  assert [s["num_steps"] for s in rep["settings"]["stages"]] == [2, 2]
  assert rep["grid"] == f"{EVAL_OUT}/grid.png"
  # Sample paths in the report are relative to the report's directory.
  for p in rep["prompts"]:
    assert f"evalout/{p['image']}" in names, p["image"]
  assert len([n for n in names if n.startswith("evalout/samples/")]) == 4
  grid = server.read(DEMO_BUCKET, "evalout/grid.png")
  assert grid.startswith(b"\x89PNG\r\n\x1a\n")
  assert f"report: {EVAL_OUT}/report.json" in demo_story["eval"]
  assert os.listdir(demo_story["cwd"]) == []


DF_BUCKET = "imagen-deepfloyd"
DF_SRC = f"gs://{DF_BUCKET}/IF-I-orig"
DF_T5 = f"gs://{DF_BUCKET}/t5/text_encoder"
DF_EXPORT = f"gs://{DF_BUCKET}/exports/if_1"


def _deepfloyd_driver(local_root: str) -> None:
  """imagen-convert of the deepfloyd_if layout from the bucket to the bucket,
  and of the same files from local disk to local disk; the bucket's export
  loads through Cascade (its T5 from the bucket too) and samples."""
  sys.path.insert(0, helpers.ROOT)
  import jax  # pylint: disable=g-import-not-at-top
  from imagen_jax import cascade as cascade_lib  # pylint: disable=g-import-not-at-top
  from imagen_jax import convert  # pylint: disable=g-import-not-at-top
  from imagen_jax import parallel  # pylint: disable=g-import-not-at-top

  local_out = os.path.join(local_root, "export")
  codes = [
      convert.main(["--src", DF_SRC, "--out", DF_EXPORT,
                    "--text_encoder", DF_T5]),
      convert.main(["--src", os.path.join(local_root, "IF-I-orig"),
                    "--out", local_out, "--text_encoder",
                    os.path.join(local_root, "t5", "text_encoder")])]
  casc = cascade_lib.Cascade.load([DF_EXPORT])
  mesh = parallel.make_mesh((1, 1, 1), jax.devices()[:1])
  local = cascade_lib.load_stage(local_out, mesh)
  got = jax.tree_util.tree_leaves_with_path(
      jax.device_get(casc.stages[0].params))
  ref = dict(jax.tree_util.tree_leaves_with_path(jax.device_get(local.params)))
  same = len(got) == len(ref) and all(
      np.array_equal(np.asarray(v), np.asarray(ref[k])) for k, v in got)
  settings = cascade_lib.StageSettings.from_config(casc.stages[0].config.sample)
  settings = type(settings)(**dict(vars(settings),
                                   timesteps="steps:999,500,0"))
  images = casc.sample(["a red circle"], settings=[settings], num_samples=2)
  print("RESULT " + json.dumps({
      "codes": codes, "params_equal": bool(same), "leaves": len(got),
      "t5": casc.text_encoder.spec["checkpoint"],
      "vocab": casc.text_encoder.spec["vocab"],
      "shape": list(images[0].shape), "dtype": str(images[0].dtype)}),
        flush=True)


@pytest.fixture(scope="module")
def deepfloyd_story(tmp_path_factory):
  """A tiny deepfloyd_if stage and T5 in the bucket, converted there."""
  server, why = gcs_server.start()
  if server is None:
    pytest.skip(why)
  try:
    import transformers  # pylint: disable=g-import-not-at-top
    from imagen_jax.text import vocab as vocab_lib  # pylint: disable=g-import-not-at-top
    from tests import test_if_deepfloyd  # pylint: disable=g-import-not-at-top
    from tests.test_if_convert import T5_KW  # pylint: disable=g-import-not-at-top
    root = tmp_path_factory.mktemp("deepfloyd_gs")
    test_if_deepfloyd.write_deepfloyd_dir(str(root / "IF-I-orig"), sr=False)
    t5 = transformers.T5EncoderModel(transformers.T5Config(**T5_KW)).eval()
    t5.save_pretrained(str(root / "t5" / "text_encoder"))
    (root / "t5" / "tokenizer").mkdir()
    shutil.copy(vocab_lib.default_vocab_path(),
                str(root / "t5" / "tokenizer" / "spiece.model"))
    server.create_bucket(DF_BUCKET)
    uploaded = {d: server.upload_dir(str(root / d), DF_BUCKET, d)
                for d in ("IF-I-orig", "t5")}
    cwd = tmp_path_factory.mktemp("deepfloyd_empty_cwd")
    proc = subprocess.run(
        [sys.executable, os.path.abspath(__file__), "DEEPFLOYD", str(root)],
        cwd=cwd, env=gcs_server.subprocess_env(server), stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, timeout=900)
    out = proc.stdout.decode(errors="replace")
    assert proc.returncode == 0, out[-3000:]
    result = json.loads(next(l for l in out.splitlines()
                             if l.startswith("RESULT "))[len("RESULT "):])
    yield dict(server=server, cwd=cwd, result=result, uploaded=uploaded)
  finally:
    server.stop()


def test_convert_reads_a_deepfloyd_dir_from_gs_and_writes_to_gs(
    deepfloyd_story):
  server, result = deepfloyd_story["server"], deepfloyd_story["result"]
  assert result["codes"] == [0, 0]
  # The source really is in the bucket, in deepfloyd_if's layout.
  src = server.list(DF_BUCKET, "IF-I-orig/")
  assert sorted(src) == ["IF-I-orig/config.yml", "IF-I-orig/pytorch_model.bin"]
  assert len(server.list(DF_BUCKET, "t5/")) == deepfloyd_story["uploaded"]["t5"]
  names = server.list(DF_BUCKET, "exports/if_1/")
  assert "exports/if_1/stage.json" in names
  assert "exports/if_1/text_encoder.json" in names
  assert any(n.startswith("exports/if_1/params/") for n in names)
  stage = json.loads(server.read(DF_BUCKET, "exports/if_1/stage.json"))
  assert stage["converted_from"]["layout"] == "deepfloyd_if"
  assert stage["converted_from"]["src"] == DF_SRC
  spec = json.loads(server.read(DF_BUCKET, "exports/if_1/text_encoder.json"))
  assert spec["checkpoint"] == DF_T5
  assert os.listdir(deepfloyd_story["cwd"]) == []


def test_the_gs_deepfloyd_export_equals_the_local_one_and_samples(
    deepfloyd_story):
  result = deepfloyd_story["result"]
  # Every converted tensor bitwise equal to a conversion from local disk.
  assert result["leaves"] > 0 and result["params_equal"]
  # Cascade.load built the T5 the export records, from the bucket.
  assert result["t5"] == DF_T5
  assert result["vocab"].startswith(f"gs://{DF_BUCKET}/t5/")
  assert result["shape"] == [2, 16, 16, 3] and result["dtype"] == "uint8"
  assert os.listdir(deepfloyd_story["cwd"]) == []


if __name__ == "__main__":
  if sys.argv[1] == "DEEPFLOYD":
    _deepfloyd_driver(sys.argv[2])
