"""Image-caption readers over files: an image folder, webdataset tar shards.

Each reader yields examples ``{"id", "caption", "image"}`` of bytes (the
caption raw, the image still encoded): the keys every caption Task starts
from (``text/tasks.py`` wraps the readers as seqio Tasks). Paths go through
``fileio``, so they may be local or remote (gs://...).
"""

from __future__ import annotations

import os
import tarfile
from typing import Callable, Iterator, Sequence

from imagen_jax import fileio

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")

Reader = Callable[[], Iterator[dict]]


def folder_examples(folder: str) -> list[tuple[str, str]]:
  """(image path, caption path) pairs under ``folder``, sorted by path."""
  if not fileio.isdir(folder):
    raise FileNotFoundError(f"Image folder {folder!r} does not exist.")
  pairs = []
  for img in fileio.walk_files(folder):
    if img.lower().endswith(IMAGE_EXTENSIONS):
      pairs.append((img, os.path.splitext(img)[0] + ".txt"))
  return sorted(pairs)


def folder_reader(folder: str) -> Reader:
  """A reader over a folder of images with same-named .txt captions.

  The folder is listed now (a missing one fails here, not mid-stream); an
  image without a .txt gets the empty caption (the null text). Ids are the
  paths relative to ``folder``.
  """
  pairs = folder_examples(folder)
  prefix = len(folder.rstrip("/")) + 1

  def read():
    for img, txt in pairs:
      cap = fileio.read_bytes(txt) if fileio.isfile(txt) else b""
      yield {"id": img[prefix:], "caption": cap, "image": fileio.read_bytes(img)}
  return read


def webdataset_examples(fileobj) -> list[dict]:
  """Groups a tar's members by key (path without extension): image + txt."""
  groups: dict[str, dict] = {}
  order = []
  with tarfile.open(fileobj=fileobj, mode="r|*") as tar:
    for member in tar:
      if not member.isfile():
        continue
      base, ext = os.path.splitext(member.name)
      ext = ext.lower()
      data = tar.extractfile(member).read()
      if base not in groups:
        groups[base] = {}
        order.append(base)
      if ext in IMAGE_EXTENSIONS:
        groups[base]["image"] = data
      elif ext == ".txt":
        groups[base]["caption"] = data
  return [{"id": k, "image": groups[k].get("image", b""),
           "caption": groups[k].get("caption", b"")} for k in order
          if "image" in groups[k]]


def webdataset_reader(files: Sequence[str]) -> Reader:
  """A reader over webdataset tar shards (``key.jpg`` + ``key.txt`` members,
  as img2dataset writes them); ids are ``shard name/key``."""
  def read():
    for path in files:
      with fileio.open_file(path, "rb") as f:
        for ex in webdataset_examples(f):
          ex["id"] = f"{os.path.basename(path)}/{ex['id']}"
          yield ex
  return read
