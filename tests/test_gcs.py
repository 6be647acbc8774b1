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

The tests then read the bucket through the server's JSON API.

A second fixture puts a tiny DeepFloyd IF directory (diffusers layout, fp16
shards) in another bucket; a subprocess runs ``imagen-convert`` from the
bucket to the bucket and loads the export through ``Cascade`` (its T5 and
vocabulary read from the bucket too), with JAX's compilation cache in the
bucket. A third puts caption sources in a bucket (a tfds data_dir prepared
by tfds, TFRecord files, webdataset shards, and the built-in shapes
rendered into a gs:// data_dir) and embeds each into a store in the
bucket; tfds reads through TF's own GCS client, which reaches the server
through ``gcs_server.TfProxy``. A run then trains from the tfds store into
the bucket, and another starts from it with a gs:// ``init_from``. A fourth writes a t5x checkpoint to
a bucket and reads it back with a vocabulary from the bucket, and reads
torch zip and safetensors weight files from the bucket.

Run as a script, this file is the subprocesses' driver.
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


IF_BUCKET = "imagen-if"
IF_SRC = f"gs://{IF_BUCKET}/IF-I-tiny"
IF_EXPORT = f"gs://{IF_BUCKET}/exports/if_1"
IF_XLA_CACHE = f"gs://{IF_BUCKET}/xla-cache"


def _if_driver(local_src: str, local_out: str) -> None:
  """imagen-convert from the bucket to the bucket, and from local to local;
  both exports load through Cascade, the bucket's one samples from text."""
  sys.path.insert(0, helpers.ROOT)
  import jax  # pylint: disable=g-import-not-at-top
  from imagen_jax import cascade as cascade_lib  # pylint: disable=g-import-not-at-top
  from imagen_jax import convert  # pylint: disable=g-import-not-at-top
  from imagen_jax import parallel  # pylint: disable=g-import-not-at-top

  codes = [convert.main(["--src", IF_SRC, "--out", IF_EXPORT,
                         "--variant", "fp16"]),
           convert.main(["--src", local_src, "--out", local_out,
                         "--variant", "fp16"])]
  casc = cascade_lib.Cascade.load([IF_EXPORT])
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
      "shape": list(images[0].shape), "dtype": str(images[0].dtype)}),
        flush=True)


@pytest.fixture(scope="module")
def if_story(tmp_path_factory):
  """A tiny IF directory in the bucket, converted by a subprocess."""
  server, why = gcs_server.start()
  if server is None:
    pytest.skip(why)
  try:
    from tests import test_if_convert  # pylint: disable=g-import-not-at-top
    root = tmp_path_factory.mktemp("if_gs")
    local_src = str(root / "IF-I-tiny")
    test_if_convert._write_if_dir(local_src)  # pylint: disable=protected-access
    server.create_bucket(IF_BUCKET)
    uploaded = server.upload_dir(local_src, IF_BUCKET, "IF-I-tiny")
    cwd = tmp_path_factory.mktemp("if_empty_cwd")
    # The CLIs' persistent compilation cache, in the bucket too.
    env = dict(gcs_server.subprocess_env(server),
               JAX_COMPILATION_CACHE_DIR=IF_XLA_CACHE)
    proc = subprocess.run(
        [sys.executable, os.path.abspath(__file__), "IF", local_src,
         str(root / "local_export")], cwd=cwd, env=env,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=1200)
    out = proc.stdout.decode(errors="replace")
    assert proc.returncode == 0, out[-3000:]
    result = json.loads(next(l for l in out.splitlines()
                             if l.startswith("RESULT "))[len("RESULT "):])
    yield dict(server=server, cwd=cwd, result=result, uploaded=uploaded,
               local_src=local_src)
  finally:
    server.stop()


def test_convert_reads_an_if_dir_from_gs_and_writes_an_export_to_gs(if_story):
  server, result = if_story["server"], if_story["result"]
  assert result["codes"] == [0, 0]
  # The source really is in the bucket: fp16 shards with their index.
  src = server.list(IF_BUCKET, "IF-I-tiny/")
  assert len(src) == if_story["uploaded"]
  assert "IF-I-tiny/unet/diffusion_pytorch_model.safetensors.index.fp16.json" \
      in src
  assert sum(".fp16" in n and n.endswith(".safetensors") for n in src) > 1
  names = server.list(IF_BUCKET, "exports/if_1/")
  assert "exports/if_1/stage.json" in names
  assert "exports/if_1/text_encoder.json" in names
  assert any(n.startswith("exports/if_1/params/") for n in names)
  stage = json.loads(server.read(IF_BUCKET, "exports/if_1/stage.json"))
  assert stage["converted_from"]["src"] == IF_SRC
  spec = json.loads(server.read(IF_BUCKET, "exports/if_1/text_encoder.json"))
  assert spec["checkpoint"] == f"{IF_SRC}/text_encoder"
  assert spec["vocab"] == f"{IF_SRC}/tokenizer/spiece.model"


def test_the_gs_export_equals_the_local_one_and_samples_from_text(if_story):
  result = if_story["result"]
  # Every converted tensor bitwise equal to a conversion from local disk.
  assert result["leaves"] > 0 and result["params_equal"]
  # Cascade.load built the T5 the export records, from the bucket.
  assert result["t5"] == f"{IF_SRC}/text_encoder"
  assert result["shape"] == [2, 16, 16, 3] and result["dtype"] == "uint8"
  assert os.listdir(if_story["cwd"]) == []


def test_a_gs_compilation_cache_dir_is_written_in_the_bucket(if_story):
  names = if_story["server"].list(IF_BUCKET, "xla-cache/")
  assert names, "no compiled program was cached in the bucket"
  assert os.listdir(if_story["cwd"]) == []


TFDS_BUCKET = "imagen-sources"
TFDS_NAME = "gcs_test_captions"
TFDS_COLOURS = ("red", "green", "blue", "yellow")


def _sources_build(root: str) -> None:
  """A tiny caption dataset under a local ``root``: a tfds data_dir
  (``tfds/``, prepared by tfds's own builder machinery), a TFRecord file
  (``records/``) and a webdataset tar shard (``wds/``)."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  class GcsTestCaptions(tfds.core.GeneratorBasedBuilder):
    """Coloured squares with captions."""
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
      image = tfds.features.Image(shape=(16, 16, 3), encoding_format="png")
      return tfds.core.DatasetInfo(
          builder=self, features=tfds.features.FeaturesDict({
              "image": image, "caption": tfds.features.Text(),
              "id": tfds.features.Text()}))

    def _split_generators(self, dl_manager):
      del dl_manager
      return {"train": self._generate_examples()}

    def _generate_examples(self):
      for i in range(N_IMAGES // 2):
        colour = TFDS_COLOURS[i % 4]
        img = np.full((16, 16, 3), 240, np.uint8)
        img[4:12, 4:12] = {"red": (220, 30, 30), "green": (30, 200, 30),
                           "blue": (30, 30, 220),
                           "yellow": (230, 220, 30)}[colour]
        yield f"ex{i}", {"image": img, "caption": f"a {colour} square {i}",
                         "id": f"ex{i}"}

  assert GcsTestCaptions.name == TFDS_NAME
  GcsTestCaptions(data_dir=os.path.join(root, "tfds")).download_and_prepare()
  # The same examples as a TFRecord file and a webdataset tar shard.
  import io as io_lib  # pylint: disable=g-import-not-at-top
  import tarfile  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from PIL import Image  # pylint: disable=g-import-not-at-top
  os.makedirs(os.path.join(root, "records"))
  os.makedirs(os.path.join(root, "wds"))
  builder = GcsTestCaptions(data_dir=os.path.join(root, "tfds"))
  records = os.path.join(root, "records", "train-00000.tfrecord")
  shard = os.path.join(root, "wds", "shard-00000.tar")
  with tf.io.TFRecordWriter(records) as rec, tarfile.open(shard, "w") as tar:
    for key, ex in builder._generate_examples():  # pylint: disable=protected-access
      buf = io_lib.BytesIO()
      Image.fromarray(ex["image"]).save(buf, format="PNG")
      feats = {"image": buf.getvalue(), "caption": ex["caption"].encode(),
               "id": ex["id"].encode()}
      rec.write(tf.train.Example(features=tf.train.Features(feature={
          k: tf.train.Feature(bytes_list=tf.train.BytesList(value=[v]))
          for k, v in feats.items()})).SerializeToString())
      for ext, data in (("png", feats["image"]), ("txt", feats["caption"])):
        info = tarfile.TarInfo(f"{key}.{ext}")
        info.size = len(data)
        tar.addfile(info, io_lib.BytesIO(data))


def _sources_driver() -> None:
  """imagen-embed from each source in the bucket into a store in the bucket:
  a tfds data_dir (tfds reads it through TF's own GCS client), TFRecord
  files and webdataset shards."""
  sys.path.insert(0, helpers.ROOT)
  from imagen_jax import embed  # pylint: disable=g-import-not-at-top
  from imagen_jax.text import store as store_lib  # pylint: disable=g-import-not-at-top

  results = {}
  for source in ("tfds", "tfrecord", "webdataset", "shapes"):
    config = helpers.load_config("tiny")
    config.data.source = source
    config.data.name = TFDS_NAME
    config.data.data_dir = f"gs://{TFDS_BUCKET}/tfds"
    if source == "shapes":
      # The built-in dataset is rendered by tfds into the bucket, then read
      # from there.
      config.data.data_dir = f"gs://{TFDS_BUCKET}/builtin"
      config.data.num_examples = N_IMAGES // 2
      config.data.num_test = 2
      config.data.render_resolution = 16
    config.data.files = {
        "tfrecord": f"gs://{TFDS_BUCKET}/records/*.tfrecord",
        "webdataset": f"gs://{TFDS_BUCKET}/wds/*.tar"}.get(source, "")
    config.data.image_key = "image"
    config.data.caption_key = "caption"
    config.data.id_key = "id"
    config.data.store = f"gs://{TFDS_BUCKET}/run/{source}"
    config.embed.batch_size = 4
    config.embed.shard_size = 4
    config.embed.mesh_shape = (1, 1, 1)
    embed.run_embed(config, f"gs://{TFDS_BUCKET}/run", progress=False)
    store = store_lib.EmbeddingStore(config.data.store)
    records = store.get_many(range(len(store)))
    results[source] = {"ids": sorted(r["id"] for r in records),
                       "captions": sorted(r["caption"] for r in records),
                       "sides": [int(x) for x in store.sides]}
  # A run trained from the tfds store, then a run that starts from it with
  # ``init_from`` on gs:// (learning rate 0: its params stay the ones read).
  import jax  # pylint: disable=g-import-not-at-top
  from imagen_jax.train import loop  # pylint: disable=g-import-not-at-top

  def train_config(**overrides):
    return helpers.tiny_train_config(**{
        "data.source": "tfds", "data.store": f"gs://{TFDS_BUCKET}/run/tfds",
        "batch_size": 4, "total_steps": 2, "checkpoint_every": 2,
        "log_every": 1, "sample_every": 0, **overrides})
  first = loop.train(train_config(), f"gs://{TFDS_BUCKET}/first",
                     progress=False)
  second = loop.train(
      train_config(**{"init_from": f"gs://{TFDS_BUCKET}/first",
                      "total_steps": 1, "optimizer.learning_rate": 0.0}),
      f"gs://{TFDS_BUCKET}/second", progress=False)
  a = jax.tree_util.tree_leaves(jax.device_get(first["state"].ema_params))
  b = jax.tree_util.tree_leaves(jax.device_get(second["state"].params))
  results["init_from"] = len(a) == len(b) and all(
      np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(a, b))
  print("RESULT " + json.dumps(results), flush=True)


@pytest.fixture(scope="module")
def sources_story(tmp_path_factory):
  """Caption sources built locally, copied into the bucket, embedded from
  there by a subprocess whose TF reaches the server through ``TfProxy``."""
  server, why = gcs_server.start()
  if server is None:
    pytest.skip(why)
  proxy = None
  try:
    proxy, why = gcs_server.start_tf_proxy(server)
    if proxy is None:
      pytest.skip(why)
    root = tmp_path_factory.mktemp("sources_gs")
    env = gcs_server.subprocess_env(server)
    build = subprocess.run(
        [sys.executable, os.path.abspath(__file__), "SOURCES_BUILD",
         str(root)], env=env, cwd=root, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, timeout=900)
    assert build.returncode == 0, build.stdout.decode(errors="replace")[-3000:]
    server.create_bucket(TFDS_BUCKET)
    uploaded = {d: server.upload_dir(str(root / d), TFDS_BUCKET, d)
                for d in ("tfds", "records", "wds")}
    cwd = tmp_path_factory.mktemp("sources_empty_cwd")
    proc = subprocess.run(
        [sys.executable, os.path.abspath(__file__), "SOURCES"], cwd=cwd,
        env=dict(env, **proxy.env()), stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, timeout=1200)
    out = proc.stdout.decode(errors="replace")
    assert proc.returncode == 0, out[-3000:]
    result = json.loads(next(l for l in out.splitlines()
                             if l.startswith("RESULT "))[len("RESULT "):])
    yield dict(server=server, cwd=cwd, result=result, uploaded=uploaded)
  finally:
    if proxy is not None:
      proxy.stop()
    server.stop()


@pytest.mark.parametrize("source", ["tfds", "tfrecord", "webdataset"])
def test_caption_sources_in_the_bucket_are_read_and_embedded(sources_story,
                                                            source):
  server, result = sources_story["server"], sources_story["result"][source]
  folder = {"tfds": "tfds", "tfrecord": "records", "webdataset": "wds"}[source]
  data = server.list(TFDS_BUCKET, f"{folder}/")
  assert data and len(data) == sources_story["uploaded"][folder]
  n = N_IMAGES // 2
  # webdataset ids are "<shard>/<key>"; the others carry the id feature.
  prefix = "shard-00000.tar/" if source == "webdataset" else ""
  assert result["ids"] == sorted(f"{prefix}ex{i}" for i in range(n))
  assert result["captions"] == sorted(
      f"a {TFDS_COLOURS[i % 4]} square {i}" for i in range(n))
  assert result["sides"] == [16] * n
  assert f"run/{source}/manifest.json" in server.list(TFDS_BUCKET,
                                                      f"run/{source}/")
  assert os.listdir(sources_story["cwd"]) == []


def test_init_from_a_gs_workdir(sources_story):
  # The second run's params are the first run's EMA params, read from the
  # bucket (and its learning rate 0 keeps them).
  assert sources_story["result"]["init_from"] is True
  names = sources_story["server"].list(TFDS_BUCKET, "second/")
  assert "second/config.json" in names


def test_a_builtin_dataset_renders_into_a_gs_data_dir(sources_story):
  server, result = sources_story["server"], sources_story["result"]["shapes"]
  rendered = server.list(TFDS_BUCKET, "builtin/imagen_builtin/")
  assert any(n.endswith("dataset_info.json") for n in rendered), rendered
  assert any(".tfrecord" in n for n in rendered), rendered
  n = N_IMAGES // 2
  assert result["ids"] == sorted(f"train/{i}" for i in range(n))
  assert len(result["captions"]) == n and all(result["captions"])
  assert result["sides"] == [16] * n
  assert os.listdir(sources_story["cwd"]) == []


T5X_BUCKET = "imagen-t5x"
T5X_CKPT = f"gs://{T5X_BUCKET}/t5x/checkpoint_1000"
T5X_VOCAB = f"gs://{T5X_BUCKET}/vocab/spiece.model"


def _t5x_driver(local_weights: str) -> None:
  """A t5x checkpoint written to the bucket (tensorstore's gcs driver and
  fileio) and read back with a vocabulary from the bucket; torch zip and
  safetensors weight files read from the bucket tensor by tensor."""
  sys.path.insert(0, helpers.ROOT)
  import jax  # pylint: disable=g-import-not-at-top
  from imagen_jax import tensor_files  # pylint: disable=g-import-not-at-top
  from imagen_jax.text import t5_checkpoints  # pylint: disable=g-import-not-at-top
  from imagen_jax.text.encoder import TextEncoder  # pylint: disable=g-import-not-at-top

  enc = TextEncoder.random("tiny", seed=3, max_length=16)
  t5_checkpoints.save_t5x(jax.device_get(enc.params), T5X_CKPT, step=1000)
  restored = TextEncoder.from_t5x(T5X_CKPT, "tiny", T5X_VOCAB, max_length=16)
  a = jax.tree_util.tree_leaves(jax.device_get(enc.params))
  b = jax.tree_util.tree_leaves(jax.device_get(restored.params))
  texts = ["a red circle to the left of a blue square", ""]
  diff = float(np.max(np.abs(np.asarray(restored.encode(texts)[0]) -
                             np.asarray(enc.encode(texts)[0]))))
  files_equal = {}
  for name, read in (("state.bin", tensor_files.read_torch_zip),
                     ("x.safetensors", tensor_files.read_safetensors)):
    remote = read(f"gs://{T5X_BUCKET}/weights/{name}")
    local = read(os.path.join(local_weights, name))
    files_equal[name] = list(remote) == list(local) and all(
        remote[k].read().dtype == local[k].read().dtype and np.array_equal(
            remote[k].read(), local[k].read()) for k in local)
  print("RESULT " + json.dumps({
      "params_equal": len(a) == len(b) and all(
          np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(a, b)),
      "encode_diff": diff, "spec": restored.spec,
      "files_equal": files_equal}), flush=True)


def _write_weight_files(directory: str) -> None:
  """A torch.save zip (with views and strides) and a safetensors file."""
  import collections  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  from safetensors.torch import save_file  # pylint: disable=g-import-not-at-top
  torch.manual_seed(0)
  base = torch.randn(6, 8)
  torch.save(collections.OrderedDict(
      half=torch.randn(3, 4, dtype=torch.float16), rows=base[2:],
      transposed=base.t(), bf16=torch.randn(2, 3).bfloat16()),
             os.path.join(directory, "state.bin"))
  save_file({"a": torch.randn(4, 3), "b": torch.randn(7).bfloat16(),
             "c": torch.randn(2, 2).half()},
            os.path.join(directory, "x.safetensors"))


@pytest.fixture(scope="module")
def t5x_story(tmp_path_factory):
  server, why = gcs_server.start()
  if server is None:
    pytest.skip(why)
  try:
    sys.path.insert(0, helpers.ROOT)
    from imagen_jax.text import vocab as vocab_lib  # pylint: disable=g-import-not-at-top
    server.create_bucket(T5X_BUCKET)
    with open(vocab_lib.default_vocab_path(), "rb") as f:
      server.upload(T5X_BUCKET, "vocab/spiece.model", f.read())
    weights = tmp_path_factory.mktemp("t5x_weights")
    _write_weight_files(str(weights))
    server.upload_dir(str(weights), T5X_BUCKET, "weights")
    cwd = tmp_path_factory.mktemp("t5x_empty_cwd")
    proc = subprocess.run(
        [sys.executable, os.path.abspath(__file__), "T5X", str(weights)],
        cwd=cwd,
        env=gcs_server.subprocess_env(server), stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        timeout=900)
    out = proc.stdout.decode(errors="replace")
    assert proc.returncode == 0, out[-3000:]
    result = json.loads(next(l for l in out.splitlines()
                             if l.startswith("RESULT "))[len("RESULT "):])
    yield dict(server=server, cwd=cwd, result=result)
  finally:
    server.stop()


def test_a_t5x_checkpoint_and_vocab_in_the_bucket(t5x_story):
  server, result = t5x_story["server"], t5x_story["result"]
  names = server.list(T5X_BUCKET, "t5x/checkpoint_1000/")
  assert "t5x/checkpoint_1000/checkpoint" in names
  assert any(n.startswith("t5x/checkpoint_1000/target.encoder.layers_0."
                          "attention.query.kernel/") for n in names)
  assert result["params_equal"] and result["encode_diff"] < 1e-6
  assert result["spec"]["checkpoint"] == T5X_CKPT
  assert result["spec"]["vocab"] == T5X_VOCAB
  # Weight files in the bucket read like local ones, tensor by tensor.
  assert result["files_equal"] == {"state.bin": True, "x.safetensors": True}
  assert os.listdir(t5x_story["cwd"]) == []


def _upload_images(server) -> None:
  """16x16 PNGs of coloured squares with .txt captions, into the bucket."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
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
    server.upload(BUCKET, f"images/{i:02d}.png", buf.getvalue())
    server.upload(BUCKET, f"images/{i:02d}.txt", f"a {name} square".encode())


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
    env = gcs_server.subprocess_env(server)
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
  if sys.argv[1] == "IF":
    _if_driver(sys.argv[2], sys.argv[3])
  elif sys.argv[1] == "SOURCES_BUILD":
    _sources_build(sys.argv[2])
  elif sys.argv[1] == "SOURCES":
    _sources_driver()
  elif sys.argv[1] == "T5X":
    _t5x_driver(sys.argv[2])
  else:
    _driver(sys.argv[1], sys.argv[2])
