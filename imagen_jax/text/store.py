"""The embedding store: training-ready records of (image, caption, T5 embedding).

Layout of a store directory::

  shards/PPP-KKKKK.array_record   records of process PPP's K-th shard
  shards/PPP-KKKKK.sides.npy      shorter image side of each record (0: no or
                                  broken image), for size filtering at train time
  sides.npy                       all of them, in global index order
  done-PPP.json                   process PPP finished: its shard and example counts
  index.json                      shard files in global order with record counts
  manifest.json                   totals, truncation counts, the text encoder spec

A record is a msgpack map with keys, in this order: ``id`` (str), ``caption``
(str), ``image`` (encoded bytes, b"" when the source had none), ``length``
(tokens incl. EOS, 0 for the null text), ``untrimmed`` (tokens the caption
would have taken untrimmed) and ``emb`` (bfloat16 little-endian bytes of the
``[length, d_model]`` embeddings: padding is never stored).

Shards are written under a temporary name and renamed when complete (on an
object store: written locally and uploaded, an object appearing whole), so a
killed writer leaves only whole shards behind; the writer resumes after them.
The store may be a gs:// URL; a reader then copies each shard it reads to
the local temporary directory once (array_record reads local files only).
"""

from __future__ import annotations

import io
import os
import tempfile
import time
from typing import Iterable, Optional, Sequence

import ml_dtypes
import msgpack
import numpy as np

from imagen_jax import fileio
from imagen_jax.text.encoder import check_same_encoder

FORMAT = "imagen_jax.embeddings/1"
_BF16 = np.dtype(ml_dtypes.bfloat16)


def _ar():
  from array_record.python import array_record_module  # pylint: disable=g-import-not-at-top
  return array_record_module


def encode_record(id_: str, caption: str, image: bytes, emb: np.ndarray,
                  untrimmed: int) -> bytes:
  """Serialises one example; ``emb`` is ``[length, D]`` (cast to bfloat16)."""
  emb = np.ascontiguousarray(np.asarray(emb, np.float32).astype(_BF16))
  return msgpack.packb({"id": id_, "caption": caption, "image": bytes(image),
                        "length": int(emb.shape[0]), "untrimmed": int(untrimmed),
                        "emb": emb.astype(_BF16.newbyteorder("<")).tobytes()},
                       use_bin_type=True)


def decode_record(data: bytes, d_model: int) -> dict:
  """Inverse of ``encode_record``: ``emb`` comes back as float32 ``[length, D]``."""
  rec = msgpack.unpackb(data, raw=False)
  emb = np.frombuffer(rec["emb"], _BF16.newbyteorder("<")).astype(np.float32)
  rec["emb"] = emb.reshape(rec["length"], d_model)
  return rec


def _npy_bytes(arr: np.ndarray) -> bytes:
  buf = io.BytesIO()
  np.save(buf, arr)
  return buf.getvalue()


def _load_npy(path: str) -> np.ndarray:
  return np.load(io.BytesIO(fileio.read_bytes(path)))


def _write_records(path: str, records: Sequence[bytes]) -> None:
  writer = _ar().ArrayRecordWriter(path, "group_size:1")
  for rec in records:
    writer.write(rec)
  writer.close()


def shard_name(process: int, k: int) -> str:
  return f"shards/{process:03d}-{k:05d}.array_record"


class StoreWriter:
  """Writes one process's shards of a store, resumably."""

  def __init__(self, path: str, process_index: int = 0):
    self.path = path
    self.process_index = process_index
    fileio.makedirs(fileio.join(path, "shards"))
    # A temporary file is a shard (".tmp") or a sides file (".tmp<pid>",
    # fileio.write_bytes) a killed writer did not finish: discard it.
    for tmp in fileio.glob(fileio.join(path, "shards",
                                       f"{process_index:03d}-*.tmp*")):
      fileio.remove(tmp)

  def completed_shards(self) -> int:
    """How many shards (0..k-1, contiguous) this process already finished."""
    k = 0
    while fileio.isfile(fileio.join(self.path,
                                    shard_name(self.process_index, k))):
      k += 1
    return k

  def write_shard(self, k: int, records: Sequence[bytes],
                  sides: Sequence[int]) -> None:
    """Writes shard ``k`` atomically (temporary name, then rename).

    The sides file goes first: a shard file exists only with its sides.
    """
    final = fileio.join(self.path, shard_name(self.process_index, k))
    fileio.write_bytes(final[:-len(".array_record")] + ".sides.npy",
                       _npy_bytes(np.asarray(sides, np.uint32)))
    if fileio.is_remote(final):
      with tempfile.TemporaryDirectory(prefix="imagen_jax_shard_") as tmp_dir:
        tmp = os.path.join(tmp_dir, "shard.array_record")
        _write_records(tmp, records)
        fileio.upload(tmp, final)
      return
    tmp = final[:-len(".array_record")] + ".tmp"
    _write_records(tmp, records)
    os.replace(tmp, final)

  def shard_stats(self, max_length: int) -> dict:
    """Counts over all of this process's shards (exact on resumed runs too)."""
    stats = {"examples": 0, "truncated": 0, "empty": 0}
    for k in range(self.completed_shards()):
      reader = _ar().ArrayRecordReader(fileio.cached_local_copy(
          fileio.join(self.path, shard_name(self.process_index, k))))
      for data in reader.read_all():
        rec = msgpack.unpackb(data, raw=False)
        stats["examples"] += 1
        stats["empty"] += int(rec["length"] == 0)
        stats["truncated"] += int(rec["untrimmed"] > max_length)
      reader.close()
    return stats

  def mark_done(self, stats: dict) -> None:
    """Records that this process has written everything it will write."""
    data = dict(stats, process=self.process_index,
                shards=self.completed_shards())
    fileio.write_json(
        fileio.join(self.path, f"done-{self.process_index:03d}.json"), data)


def finalize(path: str, num_processes: int, *, text_encoder: dict,
             d_model: int, max_length: int, task: str, wait_s: float = 3600.0
             ) -> dict:
  """Writes index.json and manifest.json once every process is done.

  Args:
    path: store directory.
    num_processes: processes that write shards.
    text_encoder: the encoder spec.
    d_model: embedding width.
    max_length: token limit the captions were trimmed to.
    task: name of the caption Task.
    wait_s: how long to wait for the other processes' done files.

  Returns:
    The manifest.
  """
  deadline = time.time() + wait_s
  done_files = [fileio.join(path, f"done-{p:03d}.json")
                for p in range(num_processes)]
  while not all(fileio.isfile(f) for f in done_files):
    if time.time() > deadline:
      missing = [f for f in done_files if not fileio.isfile(f)]
      raise TimeoutError(f"Embedding store {path}: processes still running "
                         f"after {wait_s:.0f}s (missing {missing[0]}).")
    time.sleep(0.5)
  dones = [fileio.read_json(f) for f in done_files]
  shards, sides = [], []
  for p, done in enumerate(dones):
    for k in range(done["shards"]):
      reader = _ar().ArrayRecordReader(fileio.cached_local_copy(
          fileio.join(path, shard_name(p, k))))
      shards.append({"file": shard_name(p, k), "count": int(reader.num_records())})
      reader.close()
      sides.append(_load_npy(fileio.join(
          path, shard_name(p, k)[:-len(".array_record")] + ".sides.npy")))
  total = sum(s["count"] for s in shards)
  sides_all = np.concatenate(sides) if sides else np.zeros((0,), np.uint32)
  fileio.write_bytes(fileio.join(path, "sides.npy"), _npy_bytes(sides_all))
  index = {"format": FORMAT, "d_model": int(d_model),
           "max_length": int(max_length), "total": total, "shards": shards}
  manifest = {
      "format": FORMAT, "total": total, "task": task,
      "truncated": sum(d.get("truncated", 0) for d in dones),
      "empty_captions": sum(d.get("empty", 0) for d in dones),
      "without_image": int((sides_all == 0).sum()),
      "processes": num_processes, "text_encoder": text_encoder,
      "d_model": int(d_model), "max_length": int(max_length),
      "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
  }
  for name, data in (("index.json", index), ("manifest.json", manifest)):
    fileio.write_json(fileio.join(path, name), data)
  return manifest


def is_complete(path: str) -> bool:
  """True when a finished store (with index and manifest) is at ``path``."""
  return all(fileio.isfile(fileio.join(path, f))
             for f in ("index.json", "manifest.json"))


class EmbeddingStore:
  """Random-access reader of a finished store.

  Global example i is the i-th record in index order. Reads are
  deterministic, so a reader resumes exactly from any position.
  """

  def __init__(self, path: str):
    if not is_complete(path):
      raise FileNotFoundError(
          f"No finished embedding store at {path!r} (index.json/manifest.json "
          "missing); run `imagen-embed` for this config first.")
    self.path = path
    self.index = fileio.read_json(fileio.join(path, "index.json"))
    self.manifest = fileio.read_json(fileio.join(path, "manifest.json"))
    if self.index.get("format") != FORMAT:
      raise ValueError(f"{path!r} is a {self.index.get('format')!r} store; this "
                       f"reader reads {FORMAT}.")
    self.d_model = int(self.index["d_model"])
    self.max_length = int(self.index["max_length"])
    counts = np.array([s["count"] for s in self.index["shards"]], np.int64)
    self._starts = np.concatenate([[0], np.cumsum(counts)])
    self._readers: dict[int, object] = {}
    self.sides = _load_npy(fileio.join(path, "sides.npy"))

  def __len__(self) -> int:
    return int(self._starts[-1])

  @property
  def text_encoder(self) -> dict:
    return self.manifest["text_encoder"]

  def check_text_encoder(self, spec: dict, what: str = "the training config"
                         ) -> None:
    """Refuses (one line) a config whose text encoder differs from the store's."""
    check_same_encoder(self.text_encoder, spec, what)

  def _reader(self, shard: int):
    if shard not in self._readers:
      self._readers[shard] = _ar().ArrayRecordReader(fileio.cached_local_copy(
          fileio.join(self.path, self.index["shards"][shard]["file"])))
    return self._readers[shard]

  def get_many(self, indices: Iterable[int]) -> list[dict]:
    """Decoded records for global indices, in the order given."""
    indices = np.asarray(list(indices), np.int64)
    if len(indices) and (indices.min() < 0 or indices.max() >= len(self)):
      raise IndexError(f"store index out of range [0, {len(self)})")
    shards = np.searchsorted(self._starts, indices, side="right") - 1
    out: list[Optional[dict]] = [None] * len(indices)
    for shard in np.unique(shards):
      where = np.nonzero(shards == shard)[0]
      local = (indices[where] - self._starts[shard]).tolist()
      for pos, data in zip(where, self._reader(int(shard)).read(local)):
        out[pos] = decode_record(data, self.d_model)
    return out  # type: ignore[return-value]

  def padded_text(self, records: Sequence[dict], max_length: Optional[int] = None
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Embeddings padded to ``max_length``: (``[B, L, D]`` float32, ``[B, L]`` bool)."""
    length = max_length or self.max_length
    emb = np.zeros((len(records), length, self.d_model), np.float32)
    mask = np.zeros((len(records), length), bool)
    for i, rec in enumerate(records):
      n = min(rec["length"], length)
      emb[i, :n] = rec["emb"][:n]
      mask[i, :n] = True
    return emb, mask

  def close(self) -> None:
    for r in self._readers.values():
      r.close()
    self._readers.clear()
