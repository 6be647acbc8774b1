"""seqio Tasks for caption data: one registered Task per caption source.

Every Task yields examples with the same keys, whatever the source:

  id         string, unique within the source (tfds id, file path, key)
  caption    string, the raw caption (UTF-8; invalid bytes replaced by U+FFFD)
  image      string, the *encoded* image bytes ("" when the source has none)
  text       int32 token ids: SentencePiece, trimmed to max_length - 1 with
             EOS appended; an empty caption stays empty (the null text)
  untrimmed_length  int32 tokens the caption would take untrimmed (incl. EOS),
             so the embed job can count and report truncated captions

Sources: any tfds dataset with an image and a caption feature (e.g.
``coco_captions``: image "image", caption "captions/text", one example per
caption), TFRecord files of tf.train.Example (encoded image + caption), a
folder of images with same-named .txt captions, and webdataset-style tar
shards (jpg/png + txt, as img2dataset writes them); the last two are read by
``imagen_jax.data.readers``.
"""

from __future__ import annotations

import functools
import operator
import re
import struct
from typing import Iterator, Optional

import seqio
import tensorflow as tf
import tensorflow_datasets as tfds

from imagen_jax import fileio
from imagen_jax.data import readers
from imagen_jax.text import vocab as vocab_lib

# Builtin getters rather than lambdas: autograph cannot read the source of
# several lambdas on one line and warns.
_ID, _CAPTION, _IMAGE = (operator.itemgetter(k) for k in ("id", "caption", "image"))


def _clean_text(s: tf.Tensor) -> tf.Tensor:
  s = tf.strings.unicode_transcode(s, "UTF-8", "UTF-8", errors="replace")
  return tf.strings.strip(s)


def _count_length(ds: tf.data.Dataset) -> tf.data.Dataset:
  def fn(ex):
    n = tf.size(ex["text"])
    ex["untrimmed_length"] = tf.cast(tf.where(n > 0, n + 1, 0), tf.int32)
    return ex
  return ds.map(fn, num_parallel_calls=tf.data.AUTOTUNE)


def _append_eos_unless_empty(ds: tf.data.Dataset, sequence_length,
                             output_features) -> tf.data.Dataset:
  """Trims to max_length - 1, then appends EOS; empty captions stay empty."""
  eos = output_features["text"].vocabulary.eos_id
  max_len = sequence_length["text"] if sequence_length else None

  def fn(ex):
    toks = ex["text"]
    if max_len is not None:
      toks = toks[:max_len - 1]
    with_eos = tf.concat([toks, tf.constant([eos], toks.dtype)], 0)
    ex["text"] = tf.cond(tf.size(toks) > 0, lambda: with_eos, lambda: toks)
    return ex
  return ds.map(fn, num_parallel_calls=tf.data.AUTOTUNE)


def _normalize(ds: tf.data.Dataset, *, id_fn, caption_fn, image_fn
               ) -> tf.data.Dataset:
  def fn(ex):
    caption = _clean_text(caption_fn(ex))
    return {"id": id_fn(ex), "caption": caption, "text": caption,
            "image": image_fn(ex)}
  return ds.map(fn, num_parallel_calls=tf.data.AUTOTUNE)


def _get_path(ex, key: str):
  """ex["a/b"] if such a flat key exists (tfds has "image/id"), else ex["a"]["b"]."""
  if key in ex:
    return ex[key]
  for part in key.split("/"):
    ex = ex[part]
  return ex


def _preprocessors(id_fn, caption_fn, image_fn):
  return [
      functools.partial(_normalize, id_fn=id_fn, caption_fn=caption_fn,
                        image_fn=image_fn),
      seqio.preprocessors.tokenize,
      _count_length,
      _append_eos_unless_empty,
  ]


def _output_features(vocab_path: str):
  vocab = vocab_lib.load_vocabulary(vocab_path)
  # EOS is handled by our own preprocessor (empty captions get none).
  return {"text": seqio.Feature(vocab, add_eos=False, dtype=tf.int32)}


def _register(name: str, source, preprocessors, vocab_path: str) -> seqio.Task:
  if name in seqio.TaskRegistry.names():
    seqio.TaskRegistry.remove(name)
  return seqio.TaskRegistry.add(name, source=source,
                                preprocessors=preprocessors,
                                output_features=_output_features(vocab_path))


# --- tfds -----------------------------------------------------------------------

def _fingerprint(image: tf.Tensor, caption: tf.Tensor) -> tf.Tensor:
  """A content id (64-bit hash, hex) for sources without an id feature."""
  h = tf.strings.to_hash_bucket_fast(tf.strings.join([image, caption], "\x00"),
                                     2**62)
  return tf.strings.join(["h", tf.strings.as_string(h)])


def _tfds_rename(ds: tf.data.Dataset, *, image_key: str, caption_key: str,
                 id_key: str) -> tf.data.Dataset:
  """Picks image/caption/id; one example per caption for caption lists."""
  def pick(ex):
    out = {"image": _get_path(ex, image_key),
           "caption": _get_path(ex, caption_key)}
    out["id"] = (tf.strings.as_string(_get_path(ex, id_key))
                 if id_key and _get_path(ex, id_key).dtype != tf.string
                 else _get_path(ex, id_key) if id_key else tf.constant(""))
    return out
  ds = ds.map(pick, num_parallel_calls=tf.data.AUTOTUNE)
  if ds.element_spec["caption"].shape.rank == 0:
    return ds

  def split(ex):
    n = tf.shape(ex["caption"])[0]
    base = tf.where(tf.strings.length(ex["id"]) > 0, ex["id"],
                    _fingerprint(ex["image"], tf.constant("")))
    ids = tf.strings.join([tf.repeat(base, n), tf.strings.as_string(tf.range(n))],
                          "#")
    return tf.data.Dataset.from_tensor_slices(
        {"image": tf.repeat(ex["image"][None], n), "caption": ex["caption"],
         "id": ids})
  return ds.flat_map(split)


def register_tfds_task(name: str, *, tfds_name: str, vocab_path: str,
                       image_key: str = "image", caption_key: str = "caption",
                       id_key: str = "", data_dir: Optional[str] = None,
                       builder_kwargs: Optional[dict] = None) -> seqio.Task:
  """A Task over a tfds dataset with an image and a caption feature.

  Args:
    name: Task name to register.
    tfds_name: e.g. "coco_captions:2017" or "imagen_shapes".
    vocab_path: SentencePiece model.
    image_key: image feature (kept encoded: its decoding is skipped).
    caption_key: caption feature, "/"-separated for nested features; a
      sequence of captions gives one example per caption.
    id_key: feature used as id; without one, a hash of image and caption.
    data_dir: tfds data dir.
    builder_kwargs: passed to ``tfds.builder`` (e.g. a BuilderConfig).

  Returns:
    The registered ``seqio.Task``.
  """
  decoders = {image_key: tfds.decode.SkipDecoding()}
  builder_kwargs = builder_kwargs or {}
  if ":" not in tfds_name:  # seqio wants a pinned version: take the builder's
    version = tfds.builder(tfds_name, data_dir=data_dir or None,
                           **builder_kwargs).version
    tfds_name = f"{tfds_name}:{version}"
  source = seqio.TfdsDataSource(tfds_name, tfds_data_dir=data_dir or None,
                                decoders=decoders,
                                tfds_builder_kwargs=builder_kwargs or None)

  def id_fn(ex):
    return tf.where(tf.strings.length(ex["id"]) > 0, ex["id"],
                    _fingerprint(ex["image"], ex["caption"]))

  pre = [functools.partial(_tfds_rename, image_key=image_key,
                           caption_key=caption_key, id_key=id_key)]
  pre += _preprocessors(id_fn, _CAPTION, _IMAGE)
  return _register(name, source, pre, vocab_path)


# --- TFRecord -------------------------------------------------------------------

def register_tfrecord_task(name: str, *, file_pattern: str, vocab_path: str,
                           image_key: str = "image", caption_key: str = "caption",
                           id_key: str = "id") -> seqio.Task:
  """A Task over TFRecord files of tf.train.Example (encoded image + caption).

  Args:
    name: Task name.
    file_pattern: glob of TFRecord files, or "split:pattern,split:pattern".
    vocab_path: SentencePiece model.
    image_key, caption_key, id_key: feature names (id optional: missing ids
      become "<file>:<index>").

  Returns:
    The registered ``seqio.Task``.
  """
  splits = _split_patterns(file_pattern)
  desc = {image_key: tf.io.FixedLenFeature([], tf.string, default_value=""),
          caption_key: tf.io.FixedLenFeature([], tf.string, default_value="")}
  if id_key:
    desc[id_key] = tf.io.FixedLenFeature([], tf.string, default_value="")

  def dataset_fn(split, shuffle_files, seed=None):
    del shuffle_files, seed  # deterministic order: the embed job resumes by position
    files = fileio.glob(splits[split])
    if not files:
      raise FileNotFoundError(f"No TFRecord files match {splits[split]!r}.")

    def per_file(i, path):
      ds = _tfrecord_dataset(path, remote=fileio.is_remote(files[0])).map(
          lambda r: tf.io.parse_single_example(r, desc))
      return ds.enumerate().map(lambda j, ex: {
          **ex, "_auto_id": tf.strings.join(
              [tf.strings.as_string(i), tf.strings.as_string(j)], ":")})
    return tf.data.Dataset.from_tensor_slices(
        (tf.range(len(files)), files)).flat_map(per_file)

  source = seqio.FunctionDataSource(dataset_fn, splits=list(splits))

  def id_fn(ex):
    if not id_key:
      return ex["_auto_id"]
    return tf.where(tf.strings.length(ex[id_key]) > 0, ex[id_key], ex["_auto_id"])

  pre = _preprocessors(id_fn, operator.itemgetter(caption_key),
                       operator.itemgetter(image_key))
  return _register(name, source, pre, vocab_path)


def _tfrecord_dataset(path, remote: bool) -> tf.data.Dataset:
  """Records of one TFRecord file; URLs are read through ``fileio``."""
  if not remote:
    return tf.data.TFRecordDataset(path)

  def gen(p):
    with fileio.open_file(p.decode(), "rb") as f:
      yield from read_tfrecords(f)
  return tf.data.Dataset.from_generator(
      gen, args=(path,), output_signature=tf.TensorSpec([], tf.string))


def read_tfrecords(fileobj) -> Iterator[bytes]:
  """The records of a TFRecord stream (length-prefixed, CRC-framed)."""
  while True:
    header = fileobj.read(12)  # uint64 length, uint32 masked CRC of it
    if not header:
      return
    if len(header) < 12:
      raise ValueError("truncated TFRecord header")
    (length,) = struct.unpack("<Q", header[:8])
    data = fileobj.read(length)
    if len(data) < length or len(fileobj.read(4)) < 4:
      raise ValueError("truncated TFRecord")
    yield data


def _split_patterns(pattern: str) -> dict[str, str]:
  """"split:glob,split:glob" -> {split: glob}; a plain glob or URL is "train"."""
  parts = pattern.split(",")
  if all(re.fullmatch(r"\w+:(?!//).+", p) for p in parts) and not \
      fileio.exists(parts[0].split(":", 1)[0]):
    return dict(p.split(":", 1) for p in parts)
  return {"train": pattern}


# --- image folder ---------------------------------------------------------------

def register_folder_task(name: str, *, folder: str, vocab_path: str
                         ) -> seqio.Task:
  """A Task over a folder of images with same-named .txt captions.

  An image without a .txt gets the empty caption (the null text).
  """
  def dataset_fn(split, shuffle_files, seed=None):
    del split, shuffle_files, seed
    sig = {k: tf.TensorSpec([], tf.string) for k in ("id", "caption", "image")}
    return tf.data.Dataset.from_generator(readers.folder_reader(folder),
                                          output_signature=sig)

  source = seqio.FunctionDataSource(dataset_fn, splits=["train"])
  pre = _preprocessors(_ID, _CAPTION, _IMAGE)
  return _register(name, source, pre, vocab_path)


# --- webdataset tar shards ------------------------------------------------------

def register_webdataset_task(name: str, *, file_pattern: str, vocab_path: str
                             ) -> seqio.Task:
  """A Task over webdataset tar shards (``key.jpg`` + ``key.txt`` members)."""
  splits = _split_patterns(file_pattern)

  def dataset_fn(split, shuffle_files, seed=None):
    del shuffle_files, seed
    files = fileio.glob(splits[split])
    if not files:
      raise FileNotFoundError(f"No tar shards match {splits[split]!r}.")

    sig = {k: tf.TensorSpec([], tf.string) for k in ("id", "caption", "image")}
    return tf.data.Dataset.from_generator(readers.webdataset_reader(files),
                                          output_signature=sig)

  source = seqio.FunctionDataSource(dataset_fn, splits=list(splits))
  pre = _preprocessors(_ID, _CAPTION, _IMAGE)
  return _register(name, source, pre, vocab_path)


def register_from_config(name: str, data, vocab_path: str) -> seqio.Task:
  """Registers the Task a ``config.data`` section describes.

  Args:
    name: Task name.
    data: ConfigDict with ``source`` in {tfds, tfrecord, folder, webdataset,
      shapes, digits} and that source's fields.
    vocab_path: SentencePiece model.

  Returns:
    The registered Task.
  """
  src = data.source
  if src == "tfds":
    return register_tfds_task(name, tfds_name=data.name, vocab_path=vocab_path,
                              image_key=data.image_key,
                              caption_key=data.caption_key, id_key=data.id_key,
                              data_dir=data.data_dir or None)
  if src in ("shapes", "digits"):
    from imagen_jax.data import builtin  # pylint: disable=g-import-not-at-top
    tfds_name, kwargs = builtin.prepare(data)
    return register_tfds_task(name, tfds_name=tfds_name, vocab_path=vocab_path,
                              image_key="image", caption_key="caption",
                              id_key="id", data_dir=builtin.data_dir(data),
                              builder_kwargs=kwargs)
  if src == "tfrecord":
    return register_tfrecord_task(name, file_pattern=data.files,
                                  vocab_path=vocab_path,
                                  image_key=data.image_key,
                                  caption_key=data.caption_key,
                                  id_key=data.id_key)
  if src == "folder":
    return register_folder_task(name, folder=data.folder, vocab_path=vocab_path)
  if src == "webdataset":
    return register_webdataset_task(name, file_pattern=data.files,
                                    vocab_path=vocab_path)
  raise ValueError(f"Unknown data.source {src!r}; choose one of tfds, shapes, "
                   "digits, tfrecord, folder, webdataset.")
