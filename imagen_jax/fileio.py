"""The one file layer: every path the project reads or writes may be local or a URL.

Local paths go to the OS; URLs (``gs://bucket/dir``, or any other fsspec
protocol) go to fsspec, which reaches Cloud Storage through gcsfs. Big arrays
go through orbax/tensorstore, which take the same URLs themselves; this layer
is for everything else: configs, manifests, vocabularies, T5 checkpoints,
sample grids, TensorBoard events, embedding-store shards, dataset files.

Object stores have no directories and no rename: an object appears whole
when its upload completes, so writes to a URL go straight to their name (no
temporary file), ``makedirs`` does nothing that needs undoing, and
``rename`` is copy-then-delete. Libraries that only open local files
(array_record, sentencepiece) get a local copy (``local_copy``) or write to a
local temporary file that is uploaded (``upload``).

A URL is never passed through ``os.path.abspath``: ``abspath`` here leaves
URLs alone.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import shutil
import tempfile
import threading
from typing import Any, Iterator


def is_remote(path: str) -> bool:
  """True for a URL (``gs://...``), False for a local path."""
  return "://" in str(path)


def abspath(path: str) -> str:
  """An absolute local path, or the URL unchanged."""
  return str(path) if is_remote(path) else os.path.abspath(path)


def join(path: str, *parts: str) -> str:
  """``os.path.join`` that keeps a URL's scheme intact."""
  return os.path.join(str(path), *parts)


def _protocol(path: str) -> str:
  return str(path).split("://", 1)[0]


@functools.lru_cache(maxsize=None)
def _filesystem(protocol: str):
  """The fsspec filesystem of a protocol (one per process)."""
  if protocol in ("gs", "gcs") and os.environ.get("STORAGE_EMULATOR_HOST"):
    # gcsfs otherwise probes a gRPC endpoint (hierarchical-namespace
    # buckets) on every call, which a local GCS server never answers.
    os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
  import fsspec  # pylint: disable=g-import-not-at-top
  # Listings are not cached: other processes (other hosts, a restarted job)
  # write to the same bucket.
  return fsspec.filesystem(protocol, use_listings_cache=False,
                           skip_instance_cache=True)


def _fs(path: str):
  return _filesystem(_protocol(path))


def exists(path: str) -> bool:
  """True if a file or directory is at ``path``."""
  if is_remote(path):
    return _fs(path).exists(path)
  return os.path.exists(path)


def isdir(path: str) -> bool:
  """True if ``path`` is a directory (for a URL: a prefix with objects)."""
  if is_remote(path):
    return _fs(path).isdir(path)
  return os.path.isdir(path)


def isfile(path: str) -> bool:
  """True if ``path`` is a file (an object, for a URL)."""
  if is_remote(path):
    return _fs(path).isfile(path)
  return os.path.isfile(path)


def listdir(path: str) -> list[str]:
  """Names (not paths) of the entries of a directory, sorted; [] if absent."""
  if is_remote(path):
    fs = _fs(path)
    if not fs.isdir(path):
      return []
    names = {p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(path, detail=False)}
    names.discard("")
    return sorted(names)
  if not os.path.isdir(path):
    return []
  return sorted(os.listdir(path))


def glob(pattern: str) -> list[str]:
  """Paths matching a glob pattern, sorted (URLs keep their scheme)."""
  if is_remote(pattern):
    proto = _protocol(pattern)
    out = []
    for p in _fs(pattern).glob(pattern):
      out.append(p if is_remote(p) else f"{proto}://{p}")
    return sorted(out)
  import glob as glob_lib  # pylint: disable=g-import-not-at-top
  return sorted(glob_lib.glob(pattern))


def walk_files(path: str) -> list[str]:
  """Paths of every file under a directory, recursively, sorted.

  Each path starts with ``path`` as given (a URL keeps its scheme).
  """
  if is_remote(path):
    proto = _protocol(path)
    base = path.rstrip("/")
    prefix = base.split("://", 1)[1]
    out = []
    for p in _fs(path).find(base):
      p = p.split("://", 1)[-1]
      if p.startswith(prefix + "/"):
        out.append(f"{proto}://{p}")
    return sorted(out)
  out = []
  for root, _, files in os.walk(path):
    out.extend(os.path.join(root, f) for f in files)
  return sorted(out)


def makedirs(path: str) -> None:
  """Creates a directory and its parents (nothing to do on an object store)."""
  if is_remote(path):
    _fs(path).makedirs(path, exist_ok=True)
  else:
    os.makedirs(path, exist_ok=True)


def remove(path: str) -> None:
  """Deletes one file."""
  if is_remote(path):
    _fs(path).rm_file(path)
  else:
    os.remove(path)


def rename(src: str, dst: str) -> None:
  """Moves a file or a directory tree to a new name on the same storage.

  A file replaces ``dst``; a directory must not exist at ``dst``. On an
  object store this is copy then delete.
  """
  if is_remote(src) != is_remote(dst):
    raise ValueError(f"Cannot rename between {src!r} and {dst!r}.")
  if is_remote(src):
    fs = _fs(src)
    if fs.isdir(src):
      fs.copy(src.rstrip("/") + "/", dst.rstrip("/") + "/", recursive=True)
      fs.rm(src, recursive=True)
    else:
      fs.copy(src, dst)
      fs.rm_file(src)
  else:
    os.replace(src, dst)


def size(path: str) -> int:
  """Size of a file in bytes."""
  if is_remote(path):
    return int(_fs(path).size(path))
  return os.path.getsize(path)


def open_file(path: str, mode: str = "rb"):
  """A file object for a local path or a URL."""
  if is_remote(path):
    return _fs(path).open(path, mode)
  return open(path, mode)


def read_bytes(path: str) -> bytes:
  """The whole content of a file."""
  if is_remote(path):
    return _fs(path).cat_file(path)
  with open(path, "rb") as f:
    return f.read()


def read_text(path: str) -> str:
  return read_bytes(path).decode("utf-8")


def write_bytes(path: str, data: bytes) -> None:
  """Writes a whole file atomically: readers see the old or the new content.

  Locally through a temporary file and a rename; an object store's upload is
  atomic by itself.
  """
  if is_remote(path):
    _fs(path).pipe_file(path, bytes(data))
    return
  tmp = f"{path}.tmp{os.getpid()}"
  with open(tmp, "wb") as f:
    f.write(data)
  os.replace(tmp, path)


def read_json(path: str) -> Any:
  return json.loads(read_text(path))


def write_json(path: str, data: Any) -> None:
  """Writes JSON atomically (see ``write_bytes``)."""
  write_bytes(path, json.dumps(data, indent=1, sort_keys=True).encode("utf-8"))


def upload(local_path: str, path: str) -> None:
  """Copies a local file to ``path`` (local or URL), atomically."""
  if is_remote(path):
    _fs(path).put_file(local_path, path)
  else:
    tmp = f"{path}.tmp{os.getpid()}"
    shutil.copyfile(local_path, tmp)
    os.replace(tmp, path)


def download(path: str, local_path: str) -> None:
  """Copies ``path`` (local or URL) to a local file."""
  if is_remote(path):
    _fs(path).get_file(path, local_path)
  else:
    shutil.copyfile(path, local_path)


@contextlib.contextmanager
def local_copy(path: str) -> Iterator[str]:
  """A local path with the content of ``path``: itself when local.

  For libraries that open files by name (sentencepiece, array_record). The
  copy lives in the system's temporary directory and is deleted on exit.
  """
  if not is_remote(path):
    yield path
    return
  with tempfile.TemporaryDirectory(prefix="imagen_jax_") as tmp:
    local = os.path.join(tmp, os.path.basename(path.rstrip("/")) or "file")
    download(path, local)
    yield local


_CACHE_DIR: list[str] = []
_CACHE_LOCK = threading.Lock()


def cached_local_copy(path: str) -> str:
  """A local path with the content of ``path``, kept until the process exits.

  For libraries that open a file by name long after being handed it
  (seqio's vocabularies, array_record readers). Local paths are returned
  unchanged; each URL is downloaded once per process into one temporary
  directory that is deleted at exit.
  """
  if not is_remote(path):
    return path
  with _CACHE_LOCK:  # readers on several threads may ask for the same file
    return _cached_local_copy_locked(path)


def _cached_local_copy_locked(path: str) -> str:
  if not _CACHE_DIR:
    import atexit  # pylint: disable=g-import-not-at-top
    _CACHE_DIR.append(tempfile.mkdtemp(prefix="imagen_jax_cache_"))
    atexit.register(shutil.rmtree, _CACHE_DIR[0], True)
  import hashlib  # pylint: disable=g-import-not-at-top
  key = hashlib.sha256(path.encode("utf-8")).hexdigest()[:16]
  local = os.path.join(_CACHE_DIR[0], f"{key}-{os.path.basename(path)}")
  if not os.path.exists(local):
    download(path, local + ".part")
    os.replace(local + ".part", local)
  return local


def read_range(path: str, offset: int, nbytes: int) -> bytes:
  """``nbytes`` bytes of a file from ``offset`` (fewer at its end).

  A URL is read with one ranged request and no read-ahead cache, so a
  large range is held once.
  """
  if is_remote(path):
    return _fs(path).cat_file(path, start=offset, end=offset + nbytes)
  with open(path, "rb") as f:
    f.seek(offset)
    return f.read(nbytes)
