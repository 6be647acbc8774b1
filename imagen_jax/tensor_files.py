"""Tensors in checkpoint files, read one at a time (no framework needed).

A converter maps a checkpoint's tensor names and shapes before it reads any
data, then reads each tensor when it is written out, so host memory holds
one tensor at a time rather than the whole state dict. Two formats:

* safetensors: an 8-byte little-endian header length, a JSON header (name ->
  dtype, shape, byte range) and the raw data.
* a PyTorch ``torch.save`` zip (``pytorch_model.bin``): ``<root>/data.pkl``
  pickles the state dict with each tensor as a reference to a storage file
  ``<root>/data/<key>`` holding raw little-endian values. The pickle is read
  with an unpickler that only builds tensor references (no torch, and no
  other callable the file may name), and each tensor's bytes are read from
  the zip member when asked for.

Reads go through ``np.fromfile`` at an offset rather than a memory map, so
the file's pages count as page cache, not as the process's resident memory.
A URL (``gs://...``) is read through ``fileio``: headers and zip directories
by small reads, each tensor by one ranged request when asked for.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pickle
import struct
import zipfile
from typing import Optional

import numpy as np

from imagen_jax import fileio


class TensorFileError(ValueError):
  """A checkpoint file we cannot read (the message names the file)."""


def _bfloat16():
  import ml_dtypes  # pylint: disable=g-import-not-at-top
  return np.dtype(ml_dtypes.bfloat16)


# safetensors dtype names -> numpy dtypes (bfloat16 through ml_dtypes, which
# jax installs).
_SAFETENSORS_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": None,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8,
    "U8": np.uint8, "BOOL": np.bool_,
}


@dataclasses.dataclass(frozen=True)
class TensorRef:
  """Where one tensor's values lie in a file; ``read()`` loads them.

  Attributes:
    path: the file.
    offset: byte offset of the tensor's first stored element.
    dtype: stored dtype.
    shape: the tensor's shape.
    strides: element strides over the stored values (None: contiguous).
    name: the tensor's name in the checkpoint (for messages).
  """
  path: str
  offset: int
  dtype: np.dtype
  shape: tuple[int, ...]
  strides: Optional[tuple[int, ...]] = None
  name: str = ""

  @property
  def extent(self) -> int:
    """Number of stored elements the tensor spans."""
    if not self.shape or 0 in self.shape:
      return int(math.prod(self.shape))
    if self.strides is None:
      return int(math.prod(self.shape))
    return 1 + sum((n - 1) * s for n, s in zip(self.shape, self.strides))

  def read(self) -> np.ndarray:
    """The tensor's values, in a fresh contiguous array.

    Returns:
      An array of ``shape`` and the stored ``dtype``.
    """
    count = self.extent
    if fileio.is_remote(self.path):
      # Read-only (a view of the downloaded bytes, not a second copy).
      flat = np.frombuffer(fileio.read_range(
          self.path, self.offset, count * self.dtype.itemsize), self.dtype)
    else:
      flat = np.fromfile(self.path, dtype=self.dtype, count=count,
                         offset=self.offset)
    if flat.size != count:
      raise TensorFileError(
          f"{os.path.basename(self.path)}: tensor {self.name!r} runs past "
          "the end of the file; the file is truncated.")
    if self.strides is None:
      return flat.reshape(self.shape)
    item = flat.dtype.itemsize
    view = np.lib.stride_tricks.as_strided(
        flat, self.shape, tuple(s * item for s in self.strides))
    return np.ascontiguousarray(view)


def read_safetensors(path: str) -> dict[str, TensorRef]:
  """The tensors of a safetensors file, by name, without reading their data.

  Args:
    path: a ``.safetensors`` file.

  Returns:
    Name -> ``TensorRef``, in the file's order.

  Raises:
    TensorFileError: not a safetensors file, or a dtype numpy cannot hold.
  """
  name = os.path.basename(path)
  size = fileio.size(path)
  head = fileio.read_range(path, 0, 8)
  if len(head) != 8:
    raise TensorFileError(f"{name} is not a safetensors file (too short).")
  (length,) = struct.unpack("<Q", head)
  if length > size - 8:
    raise TensorFileError(f"{name} is not a safetensors file (its header "
                          "length exceeds the file).")
  try:
    header = json.loads(fileio.read_range(path, 8, length))
  except ValueError as e:
    raise TensorFileError(f"{name} is not a safetensors file ({e}).") from e
  base = 8 + length
  out = {}
  for key, entry in header.items():
    if key == "__metadata__":
      continue
    dtype_name = entry.get("dtype")
    if dtype_name not in _SAFETENSORS_DTYPES:
      raise TensorFileError(f"{name}: tensor {key!r} has dtype {dtype_name!r},"
                            " which we do not read.")
    dtype = np.dtype(_SAFETENSORS_DTYPES[dtype_name] or _bfloat16())
    shape = tuple(int(n) for n in entry["shape"])
    begin, end = (int(v) for v in entry["data_offsets"])
    if end - begin != math.prod(shape) * dtype.itemsize or base + end > size:
      raise TensorFileError(f"{name}: tensor {key!r}'s byte range does not "
                            "match its shape, or runs past the file's end.")
    out[key] = TensorRef(path, base + begin, dtype, shape, None, key)
  return out


# torch storage classes (as pickled by torch.save) -> numpy dtypes.
_TORCH_STORAGES = {
    "DoubleStorage": np.float64, "FloatStorage": np.float32,
    "HalfStorage": np.float16, "BFloat16Storage": None,
    "LongStorage": np.int64, "IntStorage": np.int32, "ShortStorage": np.int16,
    "CharStorage": np.int8, "ByteStorage": np.uint8, "BoolStorage": np.bool_,
}


@dataclasses.dataclass(frozen=True)
class _StorageType:
  dtype: np.dtype


@dataclasses.dataclass(frozen=True)
class _Storage:
  member: str
  dtype: np.dtype
  numel: int


def _rebuild_tensor(storage, storage_offset, size, stride, *unused):
  """Stands in for torch._utils._rebuild_tensor_v2: a reference, no data."""
  del unused  # requires_grad, backward hooks, metadata: nothing to convert
  if not isinstance(storage, _Storage):
    raise pickle.UnpicklingError("a tensor without a storage")
  return (storage, int(storage_offset), tuple(int(n) for n in size),
          tuple(int(s) for s in stride))


def _rebuild_parameter(data, *unused):
  del unused
  return data


class _RestrictedUnpickler(pickle.Unpickler):
  """Builds a state dict of tensor references; refuses every other global.

  A pickle can name any importable callable; this one resolves only the
  few a ``torch.save`` of a state dict uses, to harmless stand-ins.
  """

  def __init__(self, file, storages: dict[str, int], root: str):
    super().__init__(file)
    self._storages = storages
    self._root = root

  def find_class(self, module, name):
    if module == "collections" and name == "OrderedDict":
      return dict
    if module == "torch._utils" and name == "_rebuild_tensor_v2":
      return _rebuild_tensor
    if module == "torch._utils" and name == "_rebuild_parameter":
      return _rebuild_parameter
    if module == "torch" and name in _TORCH_STORAGES:
      return _StorageType(np.dtype(_TORCH_STORAGES[name] or _bfloat16()))
    raise pickle.UnpicklingError(f"it names {module}.{name}, which a state "
                                 "dict of plain tensors does not")

  def persistent_load(self, pid):
    if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"
            and isinstance(pid[1], _StorageType)):
      raise pickle.UnpicklingError(f"unknown persistent id {pid!r:.80}")
    _, storage_type, key, _, numel = pid
    member = f"{self._root}/data/{key}"
    if member not in self._storages:
      raise pickle.UnpicklingError(f"storage {key!r} is missing")
    return _Storage(member, storage_type.dtype, int(numel))


def _member_data_offset(f, info: zipfile.ZipInfo) -> int:
  """Byte offset of an uncompressed member's data in the zip file."""
  f.seek(info.header_offset)
  head = f.read(30)
  if len(head) != 30 or head[:4] != b"PK\x03\x04":
    raise TensorFileError(f"bad zip local header for {info.filename}")
  name_len, extra_len = struct.unpack("<HH", head[26:30])
  return info.header_offset + 30 + name_len + extra_len


def read_torch_zip(path: str) -> dict[str, TensorRef]:
  """The tensors of a ``torch.save`` state dict, by name, without their data.

  Args:
    path: e.g. ``pytorch_model.bin`` (torch's zip format, torch >= 1.6).

  Returns:
    Name -> ``TensorRef`` (storage offset and strides resolved), in the
    pickle's order.

  Raises:
    TensorFileError: not a torch zip checkpoint, a pickle that builds
      anything but a flat dict of tensors, or a tensor outside its storage.
  """
  with fileio.open_file(path, "rb") as f:
    return _read_torch_zip(f, path)


def _read_torch_zip(f, path: str) -> dict[str, TensorRef]:
  """``read_torch_zip`` over an open file ``f`` of ``path``."""
  name = os.path.basename(path)
  if not zipfile.is_zipfile(f):
    raise TensorFileError(
        f"{name} is not a torch zip checkpoint (torch.save's format since "
        "torch 1.6); re-save it with a recent torch.")
  with zipfile.ZipFile(f) as zf:
    pickles = [n for n in zf.namelist() if n.endswith("/data.pkl")
               and n.count("/") == 1]
    if len(pickles) != 1:
      raise TensorFileError(f"{name} is a zip but not a torch checkpoint "
                            "(no <root>/data.pkl).")
    root = pickles[0].rsplit("/", 1)[0]
    order = f"{root}/byteorder"
    if order in zf.namelist() and zf.read(order).strip() != b"little":
      raise TensorFileError(f"{name} stores big-endian tensors; not read.")
    infos = {i.filename: i for i in zf.infolist()
             if i.filename.startswith(f"{root}/data/")}
    try:
      with zf.open(pickles[0]) as pf:
        state = _RestrictedUnpickler(pf, infos, root).load()
    except (pickle.UnpicklingError, EOFError, AttributeError, TypeError,
            ValueError) as e:
      raise TensorFileError(f"{name}: data.pkl is not a plain state dict "
                            f"({e}).") from None
  if not isinstance(state, dict):
    raise TensorFileError(f"{name}: data.pkl holds a {type(state).__name__},"
                          " not a state dict.")
  out = {}
  offsets = {}
  for key, value in state.items():
    if not (isinstance(key, str) and isinstance(value, tuple)):
      raise TensorFileError(f"{name}: entry {key!r} is not a tensor.")
    storage, first, shape, strides = value
    info = infos[storage.member]
    if info.compress_type != zipfile.ZIP_STORED:
      raise TensorFileError(f"{name}: storage {info.filename} is "
                            "compressed; torch writes them stored.")
    if info.file_size != storage.numel * storage.dtype.itemsize:
      raise TensorFileError(f"{name}: storage {info.filename} holds "
                            f"{info.file_size} bytes, not {storage.numel} "
                            f"{storage.dtype} values.")
    if storage.member not in offsets:
      offsets[storage.member] = _member_data_offset(f, info)
    ref = TensorRef(path,
                    offsets[storage.member] + first * storage.dtype.itemsize,
                    storage.dtype, shape, strides, key)
    contiguous = all(
        s == int(math.prod(shape[i + 1:])) for i, (n, s) in
        enumerate(zip(shape, strides)) if n > 1)
    if contiguous:
      ref = dataclasses.replace(ref, strides=None)
    if first < 0 or first + ref.extent > storage.numel:
      raise TensorFileError(f"{name}: tensor {key!r} lies outside its "
                            "storage.")
    out[key] = ref
  return out
