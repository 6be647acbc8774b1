"""Orbax checkpoints of the train state and the data position.

Layout: ``WORKDIR/checkpoints/<step>/{state,meta}``. ``meta`` is JSON with
the data position, the state's checksum and the packing record; ``state``
holds the ``TrainState`` (params, optimizer state, EMA, counters). Both are
written as one orbax checkpoint, to a temporary directory that is renamed
when complete, so a step directory exists only if everything in it was
written (a job killed mid-save leaves nothing that restore would read).
Restores take a target with shardings, so a checkpoint saved on one mesh
restores onto any other.

Small leaves are packed. Orbax and tensorstore spend a fixed cost per
array on a save whatever its size, and a U-Net's train state is mostly
small arrays (biases, norm scales, their optimizer moments), so a small
state's save time was that per-array cost times the array count (more with
every small array split into shards on a mesh; benchmarks/RESULTS.md,
"Checkpoint saves"). Leaves of at most
``PACK_LEAF_BYTES`` are copied to the host and concatenated into one flat
buffer per dtype (``state/packed/<dtype>``); larger leaves are saved as
arrays in the state's own nesting (``state/large/...``) with their
shardings. ``meta["packed"]`` records where each packed leaf lies, so a
restore (whole, or only the params for ``init_from``) needs no other
description of the layout. Checkpoints written before packing (no
``meta["packed"]``) restore as before.

Async saves and the step loop: orbax's own async save blocks its caller
while it copies every array to the host. In a single-process job we hand
the save to a background thread instead where the device has room for an
on-device copy of the large leaves (a snapshot that the next, donating step
cannot overwrite): the loop dispatches that copy, copies the small leaves to
the host, and goes on; the thread checksums, writes and waits for the
commit. Whether the copy fits is decided once per run from the compiled
sizes (``snapshot_fits``, ``config.checkpoint_snapshot``); where it does not
(a 2B-param stage on one 80 GB device), orbax's own path copies the large
leaves to the host while the loop waits, and the commit still happens in
the background. Multi-process jobs keep orbax's path on the main thread: its
barriers there are device collectives, which must not interleave with the
train step's collectives from another thread.
"""

from __future__ import annotations

import collections
import concurrent.futures
import functools
import logging
import os
import time
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from imagen_jax import fileio
from imagen_jax.train.state import TrainState, abstract_with_shardings


# Leaves up to this size are packed into one host buffer per dtype. Above
# it, orbax's fixed cost per array is small beside the array's own write,
# and a host copy on the loop's thread would no longer be short.
PACK_LEAF_BYTES = 1 << 20

# The snapshot's policy (``config.checkpoint_snapshot``).
SNAPSHOT_MODES = ("auto", "always", "never")

# The fraction of a device's memory a step and a snapshot may use together:
# the allocator needs room for fragmentation, and XLA's figures leave out
# the runtime's own buffers.
SNAPSHOT_HEADROOM = 0.9

# Per-save timings kept by a Checkpointer (for benchmarks and logs).
TIMINGS_KEPT = 100


def _nbytes(leaf) -> int:
  size = int(np.prod(leaf.shape, dtype=np.int64))
  return size * np.dtype(leaf.dtype).itemsize


def _words(x: Any, xp: Any = jnp) -> Any:
  """The bits of an array as flat uint32 words (one per element).

  Args:
    x: the array.
    xp: ``jnp`` (on its device) or ``np`` (on the host): the same words.

  Returns:
    uint32 ``[x.size]``.
  """
  x = xp.ravel(x)
  if x.dtype == np.bool_:
    return x.astype(xp.uint32)

  def bitcast(v, t):
    return jax.lax.bitcast_convert_type(v, t) if xp is jnp else v.view(t)

  bits = {1: np.uint8, 2: np.uint16, 4: np.uint32}.get(x.dtype.itemsize)
  if bits is None:  # 64-bit values: fold both halves
    halves = bitcast(x, np.uint32).reshape((-1, 2))  # [N, 2]
    return halves[:, 0] ^ (halves[:, 1] * np.uint32(0x9E3779B1))
  return bitcast(x, bits).astype(xp.uint32)


def _sums(words: Any, pos: Any, xp: Any = jnp) -> Any:
  """Wrapping sums of words and of words times positions: uint32 ``[2]``."""
  return xp.stack([xp.sum(words, dtype=xp.uint32),
                   xp.sum(words * pos, dtype=xp.uint32)])


@functools.partial(jax.jit, static_argnums=2)
def _shard_sums(shard: jax.Array, starts: jax.Array,
                global_shape: tuple) -> jax.Array:
  """``_sums`` of one shard of a leaf, on its device.

  Args:
    shard: one shard of a leaf.
    starts: uint32 ``[ndim]``, where the shard begins in the leaf.
    global_shape: the leaf's shape (positions are its flat, 1-based ones).

  Returns:
    uint32 ``[2]``.
  """
  pos = jnp.ones(shard.shape, jnp.uint32)
  stride = 1
  for d in range(len(global_shape) - 1, -1, -1):
    index = jax.lax.broadcasted_iota(jnp.uint32, shard.shape, d) + starts[d]
    pos = pos + index * jnp.uint32(stride % (1 << 32))
    stride *= global_shape[d]
  return _sums(_words(shard), jnp.ravel(pos))


def _host_sums(leaf: np.ndarray) -> np.ndarray:
  """``_sums`` of a whole leaf on the host."""
  with np.errstate(over="ignore"):
    words = _words(np.asarray(leaf), np)
    pos = np.arange(1, words.shape[0] + 1, dtype=np.uint32)
    return _sums(words, pos, np)


def _on_host(leaf: Any) -> bool:
  """Whether ``fingerprint`` sums a leaf on the host.

  Small leaves are copied to the host and summed there: a device program
  per leaf would be compiled once per shape and per device (shards are
  summed where they live), thousands of compiles for a sharded state.
  """
  if not isinstance(leaf, jax.Array):
    return True
  return leaf.is_fully_addressable and _nbytes(leaf) <= PACK_LEAF_BYTES


def _shard_inputs(leaf: jax.Array) -> list:
  """(shard, starts, global shape) of one replica of each addressable shard.

  Every program then runs on one device without collectives. Collectives
  here would interleave with the train step's from another thread, and
  XLA:CPU deadlocks on many small collective programs in flight.
  """
  out = []
  for shard in leaf.addressable_shards:
    if shard.replica_id == 0:
      starts = [s.start or 0 for s in shard.index]
      out.append((shard.data, np.asarray(starts, np.uint32).reshape(
          (leaf.ndim,)), tuple(leaf.shape)))
  return out


def _warm_fingerprint(leaves: list) -> None:
  """Compiles ``fingerprint``'s device programs for these leaves' types.

  Ahead-of-time compiles fill the same cache as a call and need no device
  memory: the first save's checksum then runs at full speed.

  Args:
    leaves: ShapeDtypeStructs with shardings (host leaves need no compile).
  """
  seen = set()
  for leaf in leaves:
    if _nbytes(leaf) <= PACK_LEAF_BYTES:
      continue
    shard_shape = leaf.sharding.shard_shape(leaf.shape)
    for d in leaf.sharding.addressable_devices:
      key = (shard_shape, leaf.dtype, d, leaf.shape)
      if key not in seen:
        seen.add(key)
        _shard_sums.lower(
            jax.ShapeDtypeStruct(shard_shape, leaf.dtype,
                                 sharding=jax.sharding.SingleDeviceSharding(d)),
            jax.ShapeDtypeStruct((len(leaf.shape),), jnp.uint32),
            tuple(leaf.shape)).compile()


def fingerprint(tree: Any) -> np.ndarray:
  """A checksum of every bit of a pytree of arrays: uint32 ``[2]``.

  Per leaf, the wrapping sums of its words and of its words times their
  (flat, 1-based) positions; leaves combined with odd weights. Integer sums
  do not depend on the order of reduction, so the value is the same on any
  mesh and sharding, on the host or on a device. Stored with each
  checkpoint and compared on restore: orbax checksums its array indexes but
  not the chunk data, so a corrupted byte would otherwise restore as a wrong
  parameter.

  Small leaves are summed on the host (``_on_host``), large ones shard by
  shard on their devices and combined on the host: a single program over the
  whole train state (hundreds of leaves) takes XLA minutes to compile. In a
  multi-process job the partial sums are also summed over processes.
  """
  leaves = jax.tree_util.tree_leaves(tree)
  host_idx = [i for i, x in enumerate(leaves) if _on_host(x)]
  per_leaf = [None] * len(leaves)
  for i, x in zip(host_idx, jax.device_get([leaves[i] for i in host_idx])):
    per_leaf[i] = _host_sums(x).astype(np.uint64)
  device = {i: [_shard_sums(*part) for part in _shard_inputs(x)]
            for i, x in enumerate(leaves) if per_leaf[i] is None}
  partial = {i: np.sum(np.asarray(p, np.uint64).reshape(-1, 2), 0)
             for i, p in jax.device_get(device).items()}
  if jax.process_count() > 1 and partial:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    order = sorted(partial)
    summed = np.sum(multihost_utils.process_allgather(
        np.stack([partial[i] for i in order])), 0)
    partial = dict(zip(order, summed))
  for i, pair in partial.items():
    per_leaf[i] = pair
  total = np.zeros((2,), np.uint64)
  for i, pair in enumerate(per_leaf):
    total = (total + (pair % np.uint64(1 << 32)) * np.uint64(2 * i + 1)
             ) % np.uint64(1 << 32)
  return total.astype(np.uint32)


def checkpoint_dir(workdir: str) -> str:
  """Where a run's checkpoints live (a URL stays a URL)."""
  return fileio.join(fileio.abspath(workdir), "checkpoints")


def committed_steps(directory: str) -> list[int]:
  """Steps whose save committed in a checkpoint directory, ascending.

  The one definition of "a step that restore may read": orbax's finalized
  step directories (renamed from their temporary name on a local disk;
  holding ``commit_success.txt`` on an object store). A save killed midway
  leaves nothing listed here.
  """
  if not fileio.isdir(directory):
    return []
  return sorted(ocp.utils.checkpoint_steps(directory))


def latest_step(workdir: str) -> Optional[int]:
  """The newest committed step of a training workdir, or None."""
  steps = committed_steps(checkpoint_dir(workdir))
  return steps[-1] if steps else None


def _path_keys(path) -> tuple:
  """A key path as strings: the nesting a leaf is saved under."""
  out = []
  for k in path:
    if isinstance(k, jax.tree_util.DictKey):
      out.append(str(k.key))
    elif isinstance(k, jax.tree_util.GetAttrKey):
      out.append(k.name)
    elif isinstance(k, jax.tree_util.SequenceKey):
      out.append(str(k.idx))
    elif isinstance(k, jax.tree_util.FlattenedIndexKey):
      out.append(str(k.key))
    else:
      out.append(str(k))
  return tuple(out)


def _nest(items) -> dict:
  """Nested dicts from (keys, value) pairs."""
  out: dict = {}
  for keys, value in items:
    node = out
    for k in keys[:-1]:
      node = node.setdefault(k, {})
    node[keys[-1]] = value
  return out


def _lookup(nested: dict, keys: tuple) -> Any:
  for k in keys:
    nested = nested[k]
  return nested


def _split(tree: Any) -> tuple[list, list, list]:
  """(keys of every leaf, indexes of the packed ones, of the large ones)."""
  flat, _ = jax.tree_util.tree_flatten_with_path(tree)
  keys = [_path_keys(path) for path, _ in flat]
  small = [i for i, (_, x) in enumerate(flat) if _nbytes(x) <= PACK_LEAF_BYTES]
  large = [i for i, (_, x) in enumerate(flat) if _nbytes(x) > PACK_LEAF_BYTES]
  return keys, small, large


def _to_host(leaves: list) -> list:
  """Host (numpy) copies of arrays; a multi-process array is gathered."""
  if all(getattr(x, "is_fully_addressable", True) for x in leaves):
    return [np.asarray(x) for x in jax.device_get(leaves)]
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return [np.asarray(x) for x in
          multihost_utils.process_allgather(leaves, tiled=True)]


def _pack(keys: list, host: list) -> tuple[dict, list]:
  """Host leaves -> ({dtype: flat buffer}, their packing record)."""
  parts: dict = {}
  sizes: dict = {}
  record = []
  for k, x in zip(keys, host):
    dtype = np.dtype(x.dtype).name
    record.append({"path": list(k), "dtype": dtype, "shape": list(x.shape),
                   "offset": sizes.get(dtype, 0)})
    parts.setdefault(dtype, []).append(np.ravel(x))
    sizes[dtype] = sizes.get(dtype, 0) + x.size
  return {d: np.concatenate(p) for d, p in parts.items()}, record


def _read_state(state_dir: str, record: list, target: Any,
                prefix: tuple = ()) -> Any:
  """Reads a packed ``state`` item (or part of it) onto a target's shardings.

  Args:
    state_dir: the step's ``state`` directory.
    record: ``meta["packed"]`` of the step.
    target: ShapeDtypeStructs with shardings, shaped like the saved state or
      like its subtree at ``prefix``.
    prefix: the keys of ``target``'s root within the saved state.

  Returns:
    ``target``'s tree of arrays.
  """
  flat, treedef = jax.tree_util.tree_flatten_with_path(target)
  packed_at = {tuple(e["path"]): e for e in record}
  wanted, args = [], []
  dtypes = set()
  for path, t in flat:
    keys = prefix + _path_keys(path)
    entry = packed_at.get(keys)
    if entry is None:
      wanted.append((("large",) + keys, t))
      args.append((("large",) + keys, ocp.ArrayRestoreArgs(
          sharding=t.sharding, global_shape=t.shape, dtype=t.dtype)))
    else:
      dtypes.add(entry["dtype"])
  for d in sorted(dtypes):
    wanted.append((("packed", d), np.zeros((0,), d)))
    args.append((("packed", d), ocp.RestoreArgs(restore_type=np.ndarray)))
  restored = ocp.PyTreeCheckpointer().restore(
      state_dir, args=ocp.args.PyTreeRestore(
          item=_nest(wanted), restore_args=_nest(args), partial_restore=True))
  leaves = []
  for path, t in flat:
    keys = prefix + _path_keys(path)
    entry = packed_at.get(keys)
    if entry is None:
      leaves.append(_lookup(restored, ("large",) + keys))
      continue
    shape = tuple(entry["shape"])
    if shape != tuple(t.shape) or entry["dtype"] != np.dtype(t.dtype).name:
      raise ValueError(
          f"{'/'.join(keys)} was saved as {entry['dtype']}{list(shape)}, the "
          f"target is {np.dtype(t.dtype).name}{list(t.shape)}")
    size = int(np.prod(shape, dtype=np.int64))
    buf = restored["packed"][entry["dtype"]]
    host = buf[entry["offset"]:entry["offset"] + size].reshape(shape)
    leaves.append(jax.make_array_from_callback(
        shape, t.sharding, lambda index, h=host: h[index]))
  return jax.tree_util.tree_unflatten(treedef, leaves)


class StructureMismatch(ValueError):
  """A committed step holds a state of another structure than the target.

  Not damage: every step of the run would read the same, so restore stops
  with this one-line error instead of falling back to an older step.
  """


def _saved_leaves(state_dir: str, record: list) -> dict:
  """{keys: (dtype, shape)} of every leaf a packed step holds (no array data).

  Packed leaves come from ``record``; the large ones from orbax's metadata.
  """
  saved = {tuple(e["path"]): (e["dtype"], tuple(e["shape"])) for e in record}
  item = ocp.PyTreeCheckpointer().metadata(state_dir)
  tree = getattr(item, "item_metadata", item)
  tree = getattr(tree, "tree", tree)

  def walk(node, keys):
    if isinstance(node, dict):
      for k, v in node.items():
        walk(v, keys + (str(k),))
    elif isinstance(node, (list, tuple)):
      for i, v in enumerate(node):
        walk(v, keys + (str(i),))
    else:
      saved[keys] = (np.dtype(node.dtype).name, tuple(node.shape))
  walk(dict(tree).get("large", {}), ())
  return saved


def _describe(dtype_shape: tuple) -> str:
  dtype, shape = dtype_shape
  return f"{dtype}{list(shape)}"


def check_structure(state_dir: str, record: list, target: Any, where: str
                    ) -> None:
  """Raises ``StructureMismatch`` unless a step holds ``target``'s leaves.

  Args:
    state_dir: the step's ``state`` directory.
    record: ``meta["packed"]`` of the step.
    target: ShapeDtypeStructs shaped like the whole saved state.
    where: the step, for the message (e.g. "step 4 of gs://b/run").

  Raises:
    StructureMismatch: one line naming the first difference and the count.
  """
  saved = _saved_leaves(state_dir, record)
  want = {_path_keys(path): (np.dtype(t.dtype).name, tuple(t.shape))
          for path, t in jax.tree_util.tree_flatten_with_path(target)[0]}
  diffs = []
  for keys in sorted(set(saved) | set(want)):
    name = "/".join(keys)
    if keys not in want:
      diffs.append(f"{name} is in the checkpoint only")
    elif keys not in saved:
      diffs.append(f"{name} is not in the checkpoint")
    elif saved[keys] != want[keys]:
      diffs.append(f"{name} was saved as {_describe(saved[keys])}, the config "
                   f"builds {_describe(want[keys])}")
  if diffs:
    more = f" ({len(diffs)} arrays differ)" if len(diffs) > 1 else ""
    raise StructureMismatch(
        f"{where} holds a train state of another structure than this config "
        f"builds: {diffs[0]}{more}; resume with the config the run was "
        "trained with (model, optimizer) or use a new --workdir.")


def _available_host_bytes() -> int:
  try:
    import psutil  # pylint: disable=g-import-not-at-top
    return int(psutil.virtual_memory().available)
  except ImportError:
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def snapshot_fits(copy_bytes: int, step_bytes: Optional[int],
                  device: Optional[jax.Device] = None) -> tuple[bool, str]:
  """Whether a snapshot of ``copy_bytes`` per device fits beside the step.

  Args:
    copy_bytes: the snapshot's size on one device (its compiled output).
    step_bytes: the train step's compiled peak on one device (arguments +
      temporaries + outputs - aliased); None: the device's peak so far.
    device: the device to check (default: the first local one).

  Returns:
    (fits, the figures in words, for the log).
  """
  device = device or jax.local_devices()[0]
  try:
    stats = device.memory_stats() or {}
  except Exception:  # pylint: disable=broad-except
    stats = {}
  limit = stats.get("bytes_limit")
  if limit:
    step = step_bytes if step_bytes is not None else stats.get(
        "peak_bytes_in_use", 0)
    need = int(step) + int(copy_bytes)
    return need <= SNAPSHOT_HEADROOM * limit, (
        f"step {step / 2**30:.2f} GiB + copy {copy_bytes / 2**30:.2f} GiB of "
        f"{limit / 2**30:.2f} GiB on {device.device_kind}")
  # Host devices (CPU): every local device's copy lives in host memory.
  need = int(copy_bytes) * jax.local_device_count()
  avail = _available_host_bytes()
  return need <= SNAPSHOT_HEADROOM * avail, (
      f"copies {need / 2**30:.2f} GiB of {avail / 2**30:.2f} GiB host "
      "memory available")


class Checkpointer:
  """Saves and restores train states in ``workdir/checkpoints``.

  Attributes:
    timings: the last ``TIMINGS_KEPT`` saves of this process, each
      ``{"step", "blocked_s", "commit_s", "snapshot"}``: how long ``save``
      held its caller, and the time from the ``save`` call to the commit
      (None until known, and in multi-process jobs, whose commits orbax
      waits for on the main thread).
  """

  def __init__(self, workdir: str, *, max_to_keep: int = 3, keep_period: int = 0,
               async_save: bool = True, snapshot: str = "auto"):
    """Opens (creating) ``workdir/checkpoints``.

    Args:
      workdir: the run's directory (local path or URL).
      max_to_keep: newest steps kept.
      keep_period: also keep every N-th step (0: off).
      async_save: write in the background.
      snapshot: "auto" (an on-device copy where ``snapshot_fits``), "always"
        or "never" (orbax's own async path); see the module docstring.
    """
    if snapshot not in SNAPSHOT_MODES:
      raise ValueError(f"snapshot={snapshot!r}: use one of {SNAPSHOT_MODES}")
    self.directory = checkpoint_dir(workdir)
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep or None, keep_period=keep_period or None,
        enable_async_checkpointing=async_save, cleanup_tmp_directories=True,
        create=True)
    self.manager = ocp.CheckpointManager(self.directory, options=options,
                                         item_names=("state", "meta"))
    self._snapshot_mode = snapshot
    self._handoff = None
    if async_save and jax.process_count() == 1:
      self._handoff = concurrent.futures.ThreadPoolExecutor(
          max_workers=1, thread_name_prefix="imagen-checkpoint")
    self._pending: Optional[concurrent.futures.Future] = None
    # One jitted copy of the large leaves: a single dispatch, whatever the
    # number of arrays; outputs keep the inputs' shardings.
    self._snapshot = jax.jit(
        lambda tree: jax.tree_util.tree_map(jnp.copy, tree))
    # Resolves to the compiled snapshot, or None where saves take orbax's
    # path (no room, "never", nothing large, no background thread).
    self._snapshot_choice: Optional[concurrent.futures.Future] = None
    self._warm: Optional[concurrent.futures.Future] = None
    # Bounded: a run may save thousands of times.
    self.timings: collections.deque = collections.deque(maxlen=TIMINGS_KEPT)

  def prepare(self, state: TrainState, step_bytes: Optional[int] = None
              ) -> None:
    """Chooses the save path for ``state`` and compiles it in the background.

    Called once the train state and the compiled step exist, so the first
    periodic save neither stalls the loop for a compile nor runs one beside
    the steps.

    Args:
      state: the train state (its types and shardings are used, not values).
      step_bytes: the train step's compiled peak per device, for
        ``snapshot_fits`` (None: the device's peak so far).
    """
    if self._handoff is None or self._snapshot_choice is not None:
      return
    _, small, large = _split(state)
    leaves = jax.tree_util.tree_leaves(state)
    abstract = [jax.ShapeDtypeStruct(leaves[i].shape, leaves[i].dtype,
                                     sharding=leaves[i].sharding)
                for i in large]
    self._snapshot_choice = self._handoff.submit(self._choose, abstract,
                                                 step_bytes)
    self._warm = self._handoff.submit(_warm_fingerprint, abstract)

  def _choose(self, abstract: list, step_bytes: Optional[int]):
    """The compiled snapshot of the large leaves, or None (orbax's path)."""
    if self._snapshot_mode == "never" or not abstract:
      return None
    compiled = self._snapshot.lower(abstract).compile()
    if self._snapshot_mode == "always":
      return compiled
    analysis = compiled.memory_analysis()
    copy = (analysis.output_size_in_bytes if analysis is not None else
            sum(_nbytes(jax.ShapeDtypeStruct(
                a.sharding.shard_shape(a.shape), a.dtype)) for a in abstract))
    fits, why = snapshot_fits(copy, step_bytes)
    logging.info("checkpoint saves %s: %s",
                 "snapshot on the device" if fits else
                 "through orbax's host copy (no room for a snapshot)", why)
    return compiled if fits else None

  def uses_snapshot(self) -> bool:
    """Whether saves take an on-device snapshot (waits for ``prepare``)."""
    return (self._snapshot_choice is not None and
            self._snapshot_choice.result() is not None)

  def latest_step(self) -> Optional[int]:
    steps = self.all_steps()
    return steps[-1] if steps else None

  def all_steps(self) -> list[int]:
    """Committed steps, ascending (``committed_steps``)."""
    self._join_handoff()
    self.manager.wait_until_finished()
    return committed_steps(self.directory)

  def save(self, step: int, state: TrainState, meta: dict, *,
           force: bool = True) -> bool:
    """Starts saving (asynchronously unless disabled); True if a save began.

    The caller may donate ``state`` to the next step as soon as this
    returns. With the background hand-off (single process) the return value
    is True once the save is queued; an error in it is raised by the next
    ``save``/``wait``.
    """
    t0 = time.perf_counter()
    timing = {"step": int(step), "blocked_s": None, "commit_s": None,
              "snapshot": False}
    self.timings.append(timing)
    self._join_handoff()   # at most one save in flight
    if self._handoff is not None and self._snapshot_choice is None:
      self.prepare(state)
    compiled = (self._snapshot_choice.result()
                if self._snapshot_choice is not None else None)
    keys, small, large = _split(state)
    leaves = jax.tree_util.tree_leaves(state)
    # The host copy waits for the step that produced ``state``; the packed
    # leaves are small, so the copy itself is short.
    host = _to_host([leaves[i] for i in small])
    if self._handoff is not None and (compiled is not None or not large):
      # Nothing the next step may overwrite is left for the thread to read:
      # the small leaves are on the host, the large ones (if any) copied.
      timing["snapshot"] = compiled is not None
      copies = compiled([leaves[i] for i in large]) if large else []
      self._pending = self._handoff.submit(
          self._write, step, keys, small, large, host, copies, meta, force,
          t0, timing)
      timing["blocked_s"] = time.perf_counter() - t0
      return True
    result = self._orbax_save(step, keys, small, large, host,
                              [leaves[i] for i in large], meta, force)
    timing["blocked_s"] = time.perf_counter() - t0
    if self._handoff is not None:
      self._pending = self._handoff.submit(self._commit, t0, timing)
    return result

  def _write(self, step, keys, small, large, host, copies, meta, force, t0,
             timing) -> bool:
    """The hand-off thread's save, up to its commit."""
    result = self._orbax_save(step, keys, small, large, host, copies, meta,
                              force)
    self._commit(t0, timing)
    return result

  def _commit(self, t0: float, timing: dict) -> None:
    self.manager.wait_until_finished()
    timing["commit_s"] = time.perf_counter() - t0

  def _orbax_save(self, step, keys, small, large, host, arrays, meta,
                  force) -> bool:
    """Checksums and saves: packed host leaves + large arrays (+ meta)."""
    order = {i: x for i, x in zip(small, host)}
    order.update(zip(large, arrays))
    checksum = fingerprint([order[i] for i in range(len(keys))])
    buffers, record = _pack([keys[i] for i in small], host)
    item = {}
    if buffers:
      item["packed"] = buffers
    if large:
      item["large"] = _nest([(keys[i], x) for i, x in zip(large, arrays)])
    meta = dict(meta, fingerprint=[int(v) for v in checksum], packed=record)
    return self.manager.save(
        int(step), args=ocp.args.Composite(
            state=ocp.args.StandardSave(item),
            meta=ocp.args.JsonSave(meta)), force=force)

  def _join_handoff(self) -> None:
    """Waits until a handed-off save has committed (re-raises its error)."""
    pending, self._pending = self._pending, None
    if pending is not None:
      pending.result()

  def restore(self, step: int, abstract: TrainState, shardings: TrainState
              ) -> tuple[TrainState, dict]:
    """Restores ``step`` onto the given shardings (any mesh)."""
    self._join_handoff()
    self.manager.wait_until_finished()
    target = abstract_with_shardings(abstract, shardings)
    step_dir = fileio.join(self.directory, str(int(step)))
    meta = ocp.Checkpointer(ocp.JsonCheckpointHandler()).restore(
        fileio.join(step_dir, "meta"))
    if "packed" in meta:
      check_structure(fileio.join(step_dir, "state"), meta["packed"], target,
                      f"checkpoint step {step} in {self.directory}")
      state = _read_state(fileio.join(step_dir, "state"), meta["packed"],
                          target)
    else:  # written before packing
      state = self.manager.restore(int(step), args=ocp.args.Composite(
          state=ocp.args.StandardRestore(target))).state
    expected = meta.get("fingerprint")
    if expected is not None:
      got = [int(v) for v in jax.device_get(fingerprint(state))]
      if got != list(expected):
        raise ValueError(f"step {step} reads back with checksum {got}, "
                         f"saved with {expected}: its array data is damaged")
    return state, meta

  def restore_latest(self, abstract: TrainState, shardings: TrainState
                     ) -> Optional[tuple[int, TrainState, dict]]:
    """Restores the newest committed step that reads back whole.

    A step that reads back but holds another structure than ``abstract``
    (the config changed the model or the optimizer) raises
    ``StructureMismatch``: that is the config's fault, and no step is moved.
    A step whose files were damaged after their commit (a truncated or
    corrupted array file, a disk that lost a write) is skipped with one
    warning line naming it and the step used instead. Nothing is deleted:
    the damaged step is moved aside to ``<step>.damaged`` (which orbax does
    not list), so the resumed run can save that step number again.

    Returns:
      (step, state, meta), or None when no committed step reads back.
    """
    steps = self.all_steps()
    for i in range(len(steps) - 1, -1, -1):
      try:
        state, meta = self.restore(steps[i], abstract, shardings)
      except StructureMismatch:
        # A config error, not damage: an older step would not fit either.
        raise
      except Exception as e:  # pylint: disable=broad-except
        # Any failure to read a step is a damaged step: orbax, tensorstore
        # and the JSON reader raise many types.
        fallback = steps[i - 1] if i else None
        first_line = (str(e).strip().splitlines() or [type(e).__name__])[0]
        damaged = fileio.join(self.directory, str(steps[i]))
        aside = self._move_aside(damaged)
        logging.warning(
            "checkpoint step %d in %s cannot be read (%s: %s); resuming from "
            "%s instead; the damaged step was moved to %s.", steps[i],
            self.directory, type(e).__name__, first_line[:200],
            f"step {fallback}" if fallback is not None else "scratch", aside)
        continue
      return steps[i], state, meta
    return None

  def _move_aside(self, step_dir: str) -> str:
    """Renames a damaged step directory to a free ``<step>.damaged[N]`` name."""
    n = 0
    while fileio.exists(f"{step_dir}.damaged{n or ''}"):
      n += 1
    aside = f"{step_dir}.damaged{n or ''}"
    if jax.process_index() == 0:
      fileio.rename(step_dir, aside)
    # Orbax's manager lists its steps when created: make it list them again.
    self.manager.reload()
    return aside

  def wait(self) -> None:
    """Blocks until in-flight saves (and prepare's compiles) are done."""
    for future in (self._snapshot_choice, self._warm):
      if future is not None:
        future.result()
    self._join_handoff()
    self.manager.wait_until_finished()

  def close(self) -> None:
    try:
      self.wait()
    finally:
      if self._handoff is not None:
        self._handoff.shutdown(wait=True)
      self.manager.close()


def restore_params(path: str, abstract_params: Any, shardings: Any,
                   use_ema: bool = True) -> Any:
  """Params of another run or export, onto ``shardings`` (``config.init_from``).

  Args:
    path: a training workdir (its latest checkpoint), one step directory of
      it, or an export directory (see ``imagen_jax.cascade.export_stage``).
    abstract_params: the params' ShapeDtypeStructs.
    shardings: their shardings.
    use_ema: take the EMA params of a training checkpoint.

  Returns:
    The params.
  """
  path = fileio.abspath(path)
  target = abstract_with_shardings(abstract_params, shardings)
  if fileio.isfile(fileio.join(path, "stage.json")) and fileio.isdir(
      fileio.join(path, "params")):
    return ocp.StandardCheckpointer().restore(fileio.join(path, "params"),
                                              target)
  step_dir = path
  ckpts = checkpoint_dir(path)
  if fileio.isdir(ckpts):
    steps = committed_steps(ckpts)
    if not steps:
      raise FileNotFoundError(f"init_from {path!r} has no committed checkpoint.")
    step_dir = fileio.join(ckpts, str(steps[-1]))
  state_dir = fileio.join(step_dir, "state")
  if not fileio.isdir(state_dir):
    raise FileNotFoundError(
        f"init_from {path!r} is neither a training workdir, a checkpoint step "
        "directory, nor an export (no params/ + stage.json).")
  key = "ema_params" if use_ema else "params"
  meta_dir = fileio.join(step_dir, "meta")
  if fileio.isdir(meta_dir):
    meta = ocp.Checkpointer(ocp.JsonCheckpointHandler()).restore(meta_dir)
    if "packed" in meta:
      return _read_state(state_dir, meta["packed"], target, prefix=(key,))
  restored = ocp.PyTreeCheckpointer().restore(
      state_dir, args=ocp.args.PyTreeRestore(
          item={key: target},
          restore_args={key: jax.tree_util.tree_map(
              lambda t: ocp.ArrayRestoreArgs(sharding=t.sharding), target)},
          partial_restore=True))
  return restored[key]
