"""Orbax checkpoints of the train state and the data position.

Layout: ``WORKDIR/checkpoints/<step>/{state,meta}``. ``state`` is the whole
``TrainState`` (params, optimizer state, EMA, counters); ``meta`` is JSON with
the data position. Both are written as one orbax checkpoint, to a temporary
directory that is renamed when complete, so a step directory exists only if
everything in it was written (a job killed mid-save leaves nothing that
restore would read). Restores take a target with shardings, so a checkpoint
saved on one mesh restores onto any other.

Async saves and the step loop: orbax's own async save still blocks its
caller while it copies every array to the host and does per-array Python
bookkeeping (~1,800 arrays for a U-Net's params + EMA + optimizer state):
10-30% of the whole save on a small model. In a single-process job we hand
the save to a background thread instead: the loop only dispatches one jitted
on-device copy of the state (a snapshot that the next, donating step cannot
overwrite) and goes on; the thread runs orbax's save on the snapshot, and
the snapshot's device memory is freed once orbax has copied it to the host.
At most one snapshot exists at a time. Multi-process jobs keep orbax's path
on the main thread: its barriers there are device collectives, which must
not interleave with the train step's collectives from another thread.
"""

from __future__ import annotations

import concurrent.futures
import logging
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from imagen_jax import fileio
from imagen_jax.train.state import TrainState, abstract_with_shardings


def _words(x: jax.Array) -> jax.Array:
  """The bits of an array as uint32 words (one per element)."""
  x = jnp.ravel(x)
  if x.dtype == jnp.bool_:
    return x.astype(jnp.uint32)
  bits = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}.get(x.dtype.itemsize)
  if bits is None:  # 64-bit values: fold both halves
    halves = jax.lax.bitcast_convert_type(x, jnp.uint32)  # [N, 2]
    return halves[:, 0] ^ (halves[:, 1] * jnp.uint32(0x9E3779B1))
  return jax.lax.bitcast_convert_type(x, bits).astype(jnp.uint32)


@jax.jit
def _leaf_sums(leaf: jax.Array) -> jax.Array:
  """Wrapping sums of a leaf's words and of its words times positions."""
  w = _words(leaf)  # [N]
  pos = jnp.arange(1, w.shape[0] + 1, dtype=jnp.uint32)
  return jnp.stack([jnp.sum(w, dtype=jnp.uint32),
                    jnp.sum(w * pos, dtype=jnp.uint32)])


def fingerprint(tree: Any) -> np.ndarray:
  """A checksum of every bit of a pytree of arrays: uint32 ``[2]``.

  Per leaf, the wrapping sums of its words and of its words times their
  positions; leaves combined with odd weights. Integer sums do not depend
  on the order of reduction, so the value is the same on any mesh and
  sharding. Stored with each checkpoint and compared on restore: orbax
  checksums its array indexes but not the chunk data, so a corrupted byte
  would otherwise restore as a wrong parameter.

  One small program per leaf shape, combined on the host: a single program
  over the whole train state (hundreds of leaves) takes XLA minutes to
  compile, which would run in the save thread beside training (and in the
  foreground on restore).
  """
  sums = [_leaf_sums(jnp.asarray(leaf))
          for leaf in jax.tree_util.tree_leaves(tree)]
  total = np.zeros((2,), np.uint64)
  for i, pair in enumerate(jax.device_get(sums)):
    total = (total + np.asarray(pair, np.uint64) * np.uint64(2 * i + 1)
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


class Checkpointer:
  """Saves and restores train states in ``workdir/checkpoints``."""

  def __init__(self, workdir: str, *, max_to_keep: int = 3, keep_period: int = 0,
               async_save: bool = True):
    self.directory = checkpoint_dir(workdir)
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep or None, keep_period=keep_period or None,
        enable_async_checkpointing=async_save, cleanup_tmp_directories=True,
        create=True)
    self.manager = ocp.CheckpointManager(self.directory, options=options,
                                         item_names=("state", "meta"))
    self._handoff = None
    if async_save and jax.process_count() == 1:
      self._handoff = concurrent.futures.ThreadPoolExecutor(
          max_workers=1, thread_name_prefix="imagen-checkpoint")
    self._pending: Optional[concurrent.futures.Future] = None
    # One jitted copy of the whole state: a single dispatch, whatever the
    # number of arrays; outputs keep the inputs' shardings.
    self._snapshot = jax.jit(
        lambda tree: jax.tree_util.tree_map(jnp.copy, tree))
    self._compiled_snapshot: Optional[concurrent.futures.Future] = None

  def prepare(self, state: TrainState) -> None:
    """Compiles the snapshot copy for ``state`` in the background.

    Called once the train state exists, so the first periodic save does not
    stall the loop for a compile (~2 s on a 2-core CPU for a small U-Net).
    """
    if self._handoff is None or self._compiled_snapshot is not None:
      return
    abstract = jax.tree_util.tree_map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding,
                                       weak_type=x.weak_type), state)
    self._compiled_snapshot = self._handoff.submit(
        lambda: self._snapshot.lower(abstract).compile())

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
    if self._handoff is None:
      return self._orbax_save(step, state, meta, force)
    self._join_handoff()   # at most one snapshot alive
    snapshot = None
    if self._compiled_snapshot is not None:
      try:
        snapshot = self._compiled_snapshot.result()(state)
      except (TypeError, ValueError):  # state's signature changed: jit it
        pass
    if snapshot is None:
      snapshot = self._snapshot(state)
    self._pending = self._handoff.submit(self._orbax_save, step, snapshot,
                                         meta, force)
    return True

  def _orbax_save(self, step, state, meta, force) -> bool:
    meta = dict(meta, fingerprint=[
        int(v) for v in jax.device_get(fingerprint(state))])
    return self.manager.save(
        int(step), args=ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            meta=ocp.args.JsonSave(meta)), force=force)

  def _join_handoff(self) -> None:
    """Waits until a handed-off save has been passed to orbax (re-raises)."""
    pending, self._pending = self._pending, None
    if pending is not None:
      pending.result()

  def restore(self, step: int, abstract: TrainState, shardings: TrainState
              ) -> tuple[TrainState, dict]:
    """Restores ``step`` onto the given shardings (any mesh)."""
    self._join_handoff()
    target = abstract_with_shardings(abstract, shardings)
    out = self.manager.restore(int(step), args=ocp.args.Composite(
        state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()))
    expected = out.meta.get("fingerprint")
    if expected is not None:
      got = [int(v) for v in jax.device_get(fingerprint(out.state))]
      if got != list(expected):
        raise ValueError(f"step {step} reads back with checksum {got}, "
                         f"saved with {expected}: its array data is damaged")
    return out.state, out.meta

  def restore_latest(self, abstract: TrainState, shardings: TrainState
                     ) -> Optional[tuple[int, TrainState, dict]]:
    """Restores the newest committed step that reads back whole.

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
    """Blocks until in-flight saves (and prepare's compile) are done."""
    if self._compiled_snapshot is not None:
      self._compiled_snapshot.result()
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
  restored = ocp.PyTreeCheckpointer().restore(
      state_dir, args=ocp.args.PyTreeRestore(
          item={key: target},
          restore_args={key: jax.tree_util.tree_map(
              lambda t: ocp.ArrayRestoreArgs(sharding=t.sharding), target)},
          partial_restore=True))
  return restored[key]
