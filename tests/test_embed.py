"""seqio caption Tasks, the embedding store and the resumable embed job."""

import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time

import numpy as np
import pytest
import seqio
import tensorflow as tf
import tensorflow_datasets as tfds
from PIL import Image

from imagen_jax import embed
from imagen_jax.text import store as store_lib
from imagen_jax.text import tasks
from imagen_jax.text.encoder import TextEncoder
from tests import helpers

CAPTIONS = ["a red circle", "two blue squares above a green triangle", "",
            "a handwritten digit seven", "word " * 30, "a small cyan square"]


def _png(seed, size=12):
  rs = np.random.RandomState(seed)
  buf = io.BytesIO()
  Image.fromarray(rs.randint(0, 255, (size, size, 3), np.uint8)).save(buf, "PNG")
  return buf.getvalue()


def _tfrecords(path, n, per_file=50):
  files = []
  for f in range(0, n, per_file):
    name = os.path.join(path, f"data-{f // per_file:03d}.tfrecord")
    with tf.io.TFRecordWriter(name) as w:
      for i in range(f, min(n, f + per_file)):
        feat = {"image": tf.train.Feature(bytes_list=tf.train.BytesList(value=[_png(i)])),
                "caption": tf.train.Feature(bytes_list=tf.train.BytesList(
                    value=[CAPTIONS[i % len(CAPTIONS)].encode()])),
                "id": tf.train.Feature(bytes_list=tf.train.BytesList(value=[f"ex{i:05d}".encode()]))}
        w.write(tf.train.Example(features=tf.train.Features(feature=feat)).SerializeToString())
    files.append(name)
  return os.path.join(path, "data-*.tfrecord")


def _config(tmp_path, source="tfrecord", files="", batch=8, shard=16):
  config = helpers.load_config("base64", "tiny")
  config.data.source = source
  config.data.files = files
  config.data.image_key = "image"
  config.data.caption_key = "caption"
  config.data.id_key = "id"
  config.embed.batch_size = batch
  config.embed.shard_size = shard
  config.embed.mesh_shape = (1, -1, 1)
  return config


class TinyCaptions(tfds.core.GeneratorBasedBuilder):
  """coco_captions' layout in miniature: image, a list of captions, image/id."""
  VERSION = tfds.core.Version("1.0.0")

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        "image": tfds.features.Image(shape=(12, 12, 3)),
        "captions": tfds.features.Sequence({"text": tfds.features.Text()}),
        "image/id": np.int64}))

  def _split_generators(self, dl_manager):
    return {"train": self._generate_examples()}

  def _generate_examples(self):
    for i in range(5):
      img = np.asarray(Image.open(io.BytesIO(_png(i))))
      yield i, {"image": img, "image/id": 100 + i,
                "captions": {"text": [CAPTIONS[i], CAPTIONS[(i + 1) % 6]]}}


def test_tfds_task_end_to_end(tmp_path):
  data_dir = str(tmp_path / "tfds")
  TinyCaptions(data_dir=data_dir).download_and_prepare()
  task = tasks.register_tfds_task("test_tiny_captions", tfds_name="tiny_captions",
                                  vocab_path="default", image_key="image",
                                  caption_key="captions/text", id_key="image/id",
                                  data_dir=data_dir)
  exs = list(task.get_dataset(sequence_length={"text": 8}, split="train",
                              shuffle=False, try_in_mem_cache=False).as_numpy_iterator())
  assert len(exs) == 10  # one example per caption
  vocab = task.output_features["text"].vocabulary
  for ex in exs:
    assert ex["image"][:4] == b"\x89PNG"  # kept encoded
    if ex["caption"]:
      assert ex["text"][-1] == vocab.eos_id and len(ex["text"]) <= 8
    else:
      assert ex["text"].size == 0
  assert sorted(ex["id"] for ex in exs) == sorted(
      f"{100 + i}#{j}".encode() for i in range(5) for j in range(2))
  halves = [list(task.get_dataset(sequence_length={"text": 8}, split="train",
                                  shuffle=False, try_in_mem_cache=False,
                                  shard_info=seqio.ShardInfo(i, 2)).as_numpy_iterator())
            for i in range(2)]
  assert sorted(e["id"] for h in halves for e in h) == sorted(e["id"] for e in exs)


def test_folder_and_webdataset_tasks(tmp_path):
  folder = tmp_path / "imgs"
  folder.mkdir()
  tar_path = tmp_path / "shard-000.tar"
  with tarfile.open(tar_path, "w") as tar:
    for i, cap in enumerate(CAPTIONS):
      (folder / f"{i:03d}.png").write_bytes(_png(i))
      if i != 2:  # image without caption -> null text
        (folder / f"{i:03d}.txt").write_text(cap)
      for name, data in ((f"{i:05d}.png", _png(i)), (f"{i:05d}.txt", cap.encode())):
        info = tarfile.TarInfo(name)
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
  for task in (tasks.register_folder_task("t_folder", folder=str(folder), vocab_path="default"),
               tasks.register_webdataset_task("t_wds", file_pattern=str(tmp_path / "*.tar"),
                                              vocab_path="default")):
    exs = list(task.get_dataset(sequence_length={"text": 16}, split="train",
                                shuffle=False, try_in_mem_cache=False).as_numpy_iterator())
    assert [e["caption"].decode() for e in exs] == [c.strip() for c in CAPTIONS]
    assert exs[2]["text"].size == 0 and exs[2]["untrimmed_length"] == 0
    assert exs[4]["untrimmed_length"] > 16 and len(exs[4]["text"]) == 16
    assert all(e["image"][:4] == b"\x89PNG" for e in exs)


def test_store_round_trip_and_encoder_check(tmp_path):
  files = _tfrecords(str(tmp_path), 40, per_file=20)
  config = _config(tmp_path, files=files)
  manifest = embed.run_embed(config, str(tmp_path / "w"), progress=False)
  assert manifest["total"] == 40
  assert manifest["truncated"] == len([i for i in range(40) if i % 6 == 4])
  assert manifest["empty_captions"] == len([i for i in range(40) if i % 6 == 2])
  store = store_lib.EmbeddingStore(embed.store_path(config, str(tmp_path / "w")))
  recs = store.get_many([0, 13, 39])
  assert [r["id"] for r in recs] == ["ex00000", "ex00013", "ex00039"]
  enc = TextEncoder.from_spec(store.text_encoder)
  ref, mask = enc.encode([r["caption"] for r in recs])
  emb, m = store.padded_text(recs)
  np.testing.assert_array_equal(m, np.asarray(mask))
  # bfloat16 storage: ~3 significant digits.
  np.testing.assert_allclose(emb, np.asarray(ref), atol=0.02 * float(np.abs(ref).max()))
  assert recs[1]["image"] == _png(13)
  # The store refuses a config whose T5 differs.
  other = dict(store.text_encoder, seed=5)
  with pytest.raises(ValueError, match="Text encoder mismatch.*seed"):
    store.check_text_encoder(other)
  # Bytes per caption vs a padded float32 store.
  padded = store.max_length * store.d_model * 4
  per = np.mean([2 * r["length"] * store.d_model for r in store.get_many(range(40))])
  assert per < padded / 3


def _run_embed_subprocess(config_args, workdir, extra=()):
  cmd = [sys.executable, "-m", "imagen_jax.embed",
         f"--config={helpers.ROOT}/configs/base64.py:tiny", f"--workdir={workdir}"]
  return subprocess.Popen(cmd + config_args + list(extra), cwd=helpers.ROOT,
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _args(files, batch=8, shard=16):
  return ["--config.data.source=tfrecord", f"--config.data.files={files}",
          "--config.data.id_key=id", "--config.data.caption_key=caption",
          f"--config.embed.batch_size={batch}", f"--config.embed.shard_size={shard}"]


def _tree_bytes(path):
  out = {}
  for root, _, files in os.walk(path):
    for f in files:
      rel = os.path.relpath(os.path.join(root, f), path)
      if rel == "manifest.json":
        with open(os.path.join(root, f)) as fh:
          m = json.load(fh)
        m.pop("created")
        out[rel] = json.dumps(m, sort_keys=True).encode()
      else:
        with open(os.path.join(root, f), "rb") as fh:
          out[rel] = fh.read()
  return out


def test_resumed_writer_discards_its_unfinished_temporary_files(tmp_path):
  """A kill between a temporary write and its rename leaves the temporary
  file: a shard's (".tmp") or a sides file's (".tmp<pid>"). The process's
  next writer removes its own, never another process's."""
  shards = tmp_path / "store" / "shards"
  shards.mkdir(parents=True)
  own = ["000-00003.tmp", "000-00003.sides.npy.tmp4242"]
  other = ["001-00000.tmp", "001-00000.sides.npy.tmp77"]
  kept = ["000-00000.array_record", "000-00000.sides.npy"]
  for name in own + other + kept:
    (shards / name).write_bytes(b"x")
  store_lib.StoreWriter(str(tmp_path / "store"), process_index=0)
  assert sorted(os.listdir(shards)) == sorted(other + kept)


def test_kill_and_resume_is_byte_identical(tmp_path):
  files = _tfrecords(str(tmp_path), 400, per_file=100)
  args = _args(files)
  ref = _run_embed_subprocess(args, str(tmp_path / "ref"))
  assert ref.wait(timeout=600) == 0, ref.stderr.read().decode()[-2000:]
  # Kill -9 twice at different points, then let it finish.
  work = tmp_path / "killed"
  for min_shards in (3, 9):
    proc = _run_embed_subprocess(args, str(work))
    deadline = time.time() + 300
    shards = work / "embeddings" / "shards"
    while time.time() < deadline:
      done = list(shards.glob("*.array_record")) if shards.exists() else []
      if len(done) >= min_shards or proc.poll() is not None:
        break
      time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
  assert not store_lib.is_complete(str(work / "embeddings"))
  proc = _run_embed_subprocess(args, str(work))
  assert proc.wait(timeout=600) == 0, proc.stderr.read().decode()[-2000:]
  a, b = _tree_bytes(str(tmp_path / "ref" / "embeddings")), _tree_bytes(str(work / "embeddings"))
  assert sorted(a) == sorted(b)
  for k in a:
    assert a[k] == b[k], k


def test_two_processes_cover_every_caption_once(tmp_path):
  files = _tfrecords(str(tmp_path), 90, per_file=30)
  args = _args(files)
  work = str(tmp_path / "two")
  procs = [_run_embed_subprocess(args, work, [f"--process_index={i}", "--process_count=2"])
           for i in range(2)]
  for p in procs:
    assert p.wait(timeout=600) == 0, p.stderr.read().decode()[-2000:]
  store = store_lib.EmbeddingStore(os.path.join(work, "embeddings"))
  ids = [r["id"] for r in store.get_many(range(len(store)))]
  assert len(ids) == 90 and sorted(ids) == [f"ex{i:05d}" for i in range(90)]
  assert store.manifest["processes"] == 2


def test_embed_bad_input(tmp_path):
  config = _config(tmp_path, files=str(tmp_path / "nothing-*.tfrecord"))
  with pytest.raises(FileNotFoundError, match="No TFRecord files match"):
    embed.run_embed(config, str(tmp_path / "w"), progress=False)
  config = _config(tmp_path, files="x", batch=8, shard=12)
  with pytest.raises(ValueError, match="shard_size \\(12\\) must be a multiple"):
    embed.run_embed(config, str(tmp_path / "w"), progress=False)
  with pytest.raises(FileNotFoundError, match="No finished embedding store"):
    store_lib.EmbeddingStore(str(tmp_path / "nope"))
