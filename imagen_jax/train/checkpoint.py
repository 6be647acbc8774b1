"""Orbax checkpoints of the train state and the data position.

Layout: ``WORKDIR/checkpoints/<step>/{state,meta}``. ``state`` is the whole
``TrainState`` (params, optimizer state, EMA, counters); ``meta`` is JSON with
the data position. Both are written as one orbax checkpoint, to a temporary
directory that is renamed when complete, so a step directory exists only if
everything in it was written (a job killed mid-save leaves nothing that
restore would read). Restores take a target with shardings, so a checkpoint
saved on one mesh restores onto any other.
"""

from __future__ import annotations

import os
from typing import Any, Optional

import jax
import orbax.checkpoint as ocp

from imagen_jax.train.state import TrainState, abstract_with_shardings


class Checkpointer:
  """Saves and restores train states in ``workdir/checkpoints``."""

  def __init__(self, workdir: str, *, max_to_keep: int = 3, keep_period: int = 0,
               async_save: bool = True):
    self.directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep or None, keep_period=keep_period or None,
        enable_async_checkpointing=async_save, cleanup_tmp_directories=True,
        create=True)
    self.manager = ocp.CheckpointManager(self.directory, options=options,
                                         item_names=("state", "meta"))

  def latest_step(self) -> Optional[int]:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self.manager.all_steps())

  def save(self, step: int, state: TrainState, meta: dict, *,
           force: bool = True) -> bool:
    """Starts saving (asynchronously unless disabled); True if a save began.

    The call returns once the arrays are copied off the devices, so the
    caller may donate ``state`` to the next step right away.
    """
    return self.manager.save(
        int(step), args=ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            meta=ocp.args.JsonSave(meta)), force=force)

  def restore(self, step: int, abstract: TrainState, shardings: TrainState
              ) -> tuple[TrainState, dict]:
    """Restores ``step`` onto the given shardings (any mesh)."""
    target = abstract_with_shardings(abstract, shardings)
    out = self.manager.restore(int(step), args=ocp.args.Composite(
        state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()))
    return out.state, out.meta

  def wait(self) -> None:
    """Blocks until any in-flight save is committed."""
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
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
  path = os.path.abspath(path)
  target = abstract_with_shardings(abstract_params, shardings)
  if os.path.isdir(os.path.join(path, "params")) and os.path.isfile(
      os.path.join(path, "stage.json")):
    return ocp.StandardCheckpointer().restore(os.path.join(path, "params"), target)
  step_dir = path
  ckpts = os.path.join(path, "checkpoints")
  if os.path.isdir(ckpts):
    steps = sorted(int(d) for d in os.listdir(ckpts) if d.isdigit())
    if not steps:
      raise FileNotFoundError(f"init_from {path!r} has no committed checkpoint.")
    step_dir = os.path.join(ckpts, str(steps[-1]))
  state_dir = os.path.join(step_dir, "state")
  if not os.path.isdir(state_dir):
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
