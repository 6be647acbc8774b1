"""Small-file I/O that works on local paths and gs:// (through tf.io.gfile).

Big arrays go through orbax/tensorstore; this is for configs, manifests and
vocabularies, so that workdirs, checkpoints and vocabularies may live in a
bucket as on pods.
"""

from __future__ import annotations

import json
import os
from typing import Any


def _gfile():
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  return tf.io.gfile


def is_remote(path: str) -> bool:
  return "://" in str(path)


def exists(path: str) -> bool:
  return _gfile().exists(path) if is_remote(path) else os.path.exists(path)


def isdir(path: str) -> bool:
  return _gfile().isdir(path) if is_remote(path) else os.path.isdir(path)


def isfile(path: str) -> bool:
  return exists(path) and not isdir(path)


def makedirs(path: str) -> None:
  if is_remote(path):
    _gfile().makedirs(path)
  else:
    os.makedirs(path, exist_ok=True)


def read_bytes(path: str) -> bytes:
  if is_remote(path):
    with _gfile().GFile(path, "rb") as f:
      return f.read()
  with open(path, "rb") as f:
    return f.read()


def read_json(path: str) -> Any:
  return json.loads(read_bytes(path).decode("utf-8"))


def write_json(path: str, data: Any) -> None:
  """Writes JSON atomically (temporary file, then rename)."""
  text = json.dumps(data, indent=1, sort_keys=True)
  tmp = path + ".tmp"
  if is_remote(path):
    with _gfile().GFile(tmp, "w") as f:
      f.write(text)
    _gfile().rename(tmp, path, overwrite=True)
  else:
    with open(tmp, "w") as f:
      f.write(text)
    os.replace(tmp, path)


def open_file(path: str, mode: str = "rb"):
  """A file object for a local or remote path."""
  if is_remote(path):
    return _gfile().GFile(path, mode)
  return open(path, mode)
