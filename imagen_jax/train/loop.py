"""The training loop of one stage: setup, resume, steps, logging, checkpoints.

``train(config, workdir)`` is what ``imagen-train`` runs. It resumes from the
latest committed checkpoint in ``workdir``; otherwise starts from
``config.init_from`` (another run's EMA params, or an export); otherwise from
scratch. SIGTERM (preemption) saves the current step, waits for the save and
exits with ``PREEMPTED_EXIT_CODE``; a restart continues with no step lost and
repeats the uninterrupted run exactly (same losses, bitwise-equal params).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import time
from typing import Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from imagen_jax import build
from imagen_jax import config_defaults
from imagen_jax import fileio
from imagen_jax.cli import NONFINITE_EXIT_CODE, PREEMPTED_EXIT_CODE
from imagen_jax import host_malloc
from imagen_jax import images as images_lib
from imagen_jax import parallel
from imagen_jax.data import pipeline
from imagen_jax.data import sources
from imagen_jax.stage import SampleInputs, Stage, StageSettings
from imagen_jax.train import checkpoint as ckpt_lib
from imagen_jax.train import metrics as metrics_lib
from imagen_jax.train import optim
from imagen_jax.train import state as state_lib
from imagen_jax.train.step import make_train_step

# Config fields that fix the shapes of a run's params: a workdir refuses a
# config that changes them.
SHAPE_KEYS = ("model", "resolution", "lowres_resolution")


class ConfigError(ValueError):
  """A user error in the config or flags (reported in one line, exit code 2)."""


class NonFiniteError(RuntimeError):
  """Training produced too many non-finite steps in a row."""


class Preempted(Exception):
  """SIGTERM received; the state was saved."""


def run_as_cli(prog: str, fn, *args, **kwargs) -> int:
  """Runs a training job for a CLI: its errors become exit codes.

  ConfigError -> one line, 2; NonFiniteError -> one line, 3; Preempted ->
  a line saying the state was saved, 75 (run the same command again).
  """
  from imagen_jax import cli  # pylint: disable=g-import-not-at-top
  try:
    fn(*args, **kwargs)
  except ConfigError as e:
    cli.fail(prog, str(e))
  except Preempted as e:
    print(f"{prog}: preempted at step {e}; state saved, run the same command "
          "again to continue.", file=sys.stderr)
    return PREEMPTED_EXIT_CODE
  except NonFiniteError as e:
    cli.fail(prog, str(e), NONFINITE_EXIT_CODE)
  return 0


def validate(config: ml_collections.ConfigDict, num_devices: int) -> tuple:
  """Checks the config against itself and the devices; returns the mesh shape."""
  # With mesh.dcn_shape (multi-slice / multi-host), mesh.shape is each
  # slice's shape and the global mesh is their product, axis by axis.
  dcn = tuple(int(d) for d in config.mesh.dcn_shape)
  slices = int(np.prod(dcn))
  if len(dcn) != 3 or slices < 1 or num_devices % slices:
    raise ConfigError(f"mesh.dcn_shape={dcn} does not split the {num_devices} "
                      "devices into equal slices; give 3 sizes whose product "
                      f"divides {num_devices}.")
  try:
    mesh_shape = parallel.resolve_mesh_shape(config.mesh.shape,
                                             num_devices // slices)
  except ValueError as e:
    raise ConfigError(str(e)) from None
  global_shape = tuple(m * d for m, d in zip(mesh_shape, dcn))
  data_par = global_shape[0] * global_shape[1]
  accum = int(config.optimizer.grad_accum)
  if int(config.batch_size) % (data_par * accum):
    raise ConfigError(
        f"batch_size {config.batch_size} is not divisible by the {data_par} "
        f"data-parallel devices (mesh {global_shape}) x grad_accum {accum}; "
        f"use a multiple of {data_par * accum}.")
  if int(config.batch_size) % jax.process_count():
    raise ConfigError(f"batch_size {config.batch_size} is not divisible by "
                      f"the {jax.process_count()} processes.")
  if config.lowres_resolution and int(config.resolution) % int(config.lowres_resolution):
    raise ConfigError(f"resolution {config.resolution} is not a multiple of "
                      f"lowres_resolution {config.lowres_resolution}.")
  if bool(config.lowres_resolution) != bool(config.model.lowres_cond):
    raise ConfigError("lowres_resolution and model.lowres_cond disagree: an SR "
                      "stage needs both, a base stage neither.")
  return mesh_shape


def _config_json(config) -> dict:
  return json.loads(config.to_json_best_effort())


def _shape_section(config_json: dict, key: str):
  """``config_json[key]``; for ``model``, with the fields a workdir predates
  at their declared defaults (what ``build.unet_kwargs`` builds them with)."""
  section = config_json.get(key)
  if key != "model" or not isinstance(section, dict):
    return section
  defaults = json.loads(json.dumps(
      {name: spec.default for name, spec in config_defaults.MODEL.items()}))
  return {**defaults, **section}


def check_workdir_config(workdir: str, config, write: bool = True) -> None:
  """Refuses a config whose param shapes differ from the workdir's run.

  Args:
    workdir: the run directory (created if absent).
    config: the config about to run.
    write: write it as ``config.json`` now. ``train`` writes it only once
      the checkpoint restored (``write_workdir_config``), so a config that
      the checkpoint refuses never replaces the one the run was trained
      with.
  """
  path = os.path.join(workdir, "config.json")
  new = _config_json(config)
  if fileio.isfile(path):
    old = fileio.read_json(path)
    for key in SHAPE_KEYS:
      if _shape_section(old, key) != _shape_section(new, key):
        raise ConfigError(
            f"{workdir} holds a run with a different {key} "
            f"({json.dumps(old.get(key))[:120]}...); use a new --workdir or "
            f"the original config.")
    old_text, new_text = old.get("text", {}), new.get("text", {})
    for key in ("t5", "source", "checkpoint", "vocab", "max_length", "seed"):
      if old_text.get(key) != new_text.get(key):
        raise ConfigError(f"{workdir} was trained with text.{key}="
                          f"{old_text.get(key)!r}, the config says "
                          f"{new_text.get(key)!r}; use a new --workdir.")
  if jax.process_index() == 0:
    fileio.makedirs(workdir)
  if write:
    write_workdir_config(workdir, config)


def write_workdir_config(workdir: str, config) -> None:
  """Writes the run's ``config.json`` (process 0)."""
  _write_json(os.path.join(workdir, "config.json"), _config_json(config))


def _global_batch(local: dict, mesh) -> dict:
  return {k: jax.make_array_from_process_local_data(
      parallel.batch_sharding(mesh, v.ndim), v) for k, v in local.items()}


class _SigtermFlag:
  """Turns SIGTERM into a flag the loop checks between steps."""

  def __init__(self):
    self.raised = False
    self._old = None

  def __enter__(self):
    try:
      self._old = signal.signal(signal.SIGTERM, self._handler)
    except ValueError:  # not the main thread
      self._old = None
    return self

  def _handler(self, signum, frame):
    del signum, frame
    self.raised = True

  def __exit__(self, *exc):
    if self._old is not None:
      signal.signal(signal.SIGTERM, self._old)


def _text_encoder_spec(config, source) -> Optional[dict]:
  store = getattr(source, "store", None)
  if store is not None:
    return store.text_encoder
  return getattr(source, "text_encoder_spec", None)


def _write_json(path: str, data) -> None:
  if jax.process_index() == 0:
    fileio.write_json(path, data)


def train(config: ml_collections.ConfigDict, workdir: str, *,
          progress: bool = True, stop_at: Optional[int] = None) -> dict:
  """Trains one stage; returns a summary (final step, last metrics).

  Args:
    config: full experiment config.
    workdir: run directory (checkpoints, config.json, TensorBoard, samples).
    progress: print progress lines.
    stop_at: stop (after a checkpoint) once this step is reached, before
      total_steps; for tests and staged runs.

  Returns:
    {"step": last step, "metrics": last logged metrics, "losses": the mean
    loss of each log window of this invocation (one per ``log_every`` steps,
    and one for a last, shorter window), "state": the final train state}.

  Raises:
    ConfigError: bad config (caller reports it in one line, exit code 2).
    NonFiniteError: too many non-finite steps in a row.
    Preempted: SIGTERM arrived; the state was saved.
  """
  devices = jax.devices()
  if int(config.mesh.num_devices):
    if jax.process_count() > 1:
      raise ConfigError("mesh.num_devices is for single-process runs; a "
                        "multi-process run uses every device.")
    if int(config.mesh.num_devices) > len(devices):
      raise ConfigError(f"mesh.num_devices={config.mesh.num_devices} but only "
                        f"{len(devices)} devices are present.")
    devices = devices[:int(config.mesh.num_devices)]
  mesh_shape = validate(config, len(devices))
  try:
    mesh = parallel.make_mesh(mesh_shape, devices,
                              dcn_shape=tuple(config.mesh.dcn_shape)
                              if int(np.prod(config.mesh.dcn_shape)) > 1 else None)
  except ValueError as e:
    raise ConfigError(str(e)) from None
  check_workdir_config(workdir, config, write=False)
  # First, while nothing else runs: on CPU the peak is a matmul measured now,
  # and the checkpointer's background compile of its snapshot copy or the
  # prefetch threads would share the cores with it, measuring a low peak and
  # so logging an MFU near 100%.
  peak, peak_src = metrics_lib.peak_flops_per_device(float(config.peak_flops))
  # The host allocator moves CPU step times (host_malloc.py), so a log that
  # reports speed says which one ran.
  logging.info("peak %.4g FLOP/s per device (%s); host malloc: %s", peak,
               peak_src, host_malloc.loaded_allocator())
  stage = Stage.from_config(config)
  total = int(config.total_steps)
  tx, lr_schedule = optim.make_optimizer(config.optimizer, total)
  inputs = build.unet_inputs(config, 1, 4)
  abstract, shardings = state_lib.state_shardings(stage.unet, inputs, tx, mesh)

  encode_fn = None
  spec = None
  if config.data.source == "synthetic":
    from imagen_jax.text import encoder as encoder_lib  # pylint: disable=g-import-not-at-top
    enc = encoder_lib.from_config(config.text)
    encode_fn, spec = enc.encode, enc.spec
  source = sources.make_source(config, workdir, encode_fn,
                               jax.process_index(), jax.process_count())
  if spec is None:
    spec = _text_encoder_spec(config, source)
    if int(spec["config"]["d_model"]) != int(config.model.text_dim):
      raise ConfigError(f"model.text_dim {config.model.text_dim} does not match "
                        f"the store's T5 width {spec['config']['d_model']}; set "
                        "model.text_dim to it.")
  _write_json(os.path.join(workdir, "text_encoder.json"), spec)

  ckpt = ckpt_lib.Checkpointer(workdir, max_to_keep=int(config.keep_checkpoints),
                               keep_period=int(config.keep_period),
                               async_save=bool(config.async_checkpoints),
                               snapshot=str(config.checkpoint_snapshot))
  try:
    restored = ckpt.restore_latest(abstract, shardings)
  except ckpt_lib.StructureMismatch as e:
    ckpt.close()
    raise ConfigError(str(e)) from None
  write_workdir_config(workdir, config)
  if restored is not None:
    latest, state, meta = restored
    position = int(meta["data_position"])
    logging.info("resumed from step %d", latest)
  else:
    state = state_lib.init_state(stage.unet, config, tx, mesh, shardings,
                                 jax.random.PRNGKey(int(config.seed)))
    position = 0
    if config.init_from:
      params = ckpt_lib.restore_params(config.init_from, abstract.params,
                                       shardings.params)
      state = state.replace(params=params, ema_params=jax.tree_util.tree_map(
          jnp.copy, params))
      logging.info("initialised params from %s", config.init_from)
  start_step = int(jax.device_get(state.step))

  step_fn = make_train_step(stage, tx, lr_schedule, config, mesh, shardings)
  writer = metrics_lib.create_writer(workdir)
  prefetch = pipeline.Prefetcher(source.local_batch, position,
                                 depth=int(config.prefetch))
  flops = 0.0
  throughput = None
  accumulated = metrics_lib.Accumulator()
  n_devices = len(devices)
  # Mean loss of each log window of this invocation (host floats, one per
  # log_every steps).
  losses: list = []
  last_metrics: dict = {}
  max_skips = int(config.max_consecutive_skips)
  log_every = int(config.log_every)
  checkpoint_every = int(config.checkpoint_every)
  sample_every = int(config.sample_every)
  stop = min(total, stop_at) if stop_at else total
  eval_batch = None
  sample_grid = None
  t_start = time.perf_counter()
  if progress and jax.process_index() == 0:
    print(f"training {workdir}: step {start_step} -> {stop} of {total}, "
          f"batch {config.batch_size}, mesh {dict(mesh.shape)}, "
          f"{build.count_params(state.params) / 1e6:.2f}M params", flush=True)

  last_saved = [None]

  def check_skips(step: int, run: int) -> None:
    if run >= max_skips:
      raise NonFiniteError(
          f"{run} consecutive steps had a non-finite loss or gradient (seen "
          f"at step {step}); lower the learning rate or check the data. The "
          "last checkpoint is intact.")

  def save(step: int, reason: str):
    finite, run = jax.device_get((state_lib.is_finite_tree(state.params),
                                  state.skipped))
    if not bool(finite):
      raise NonFiniteError(f"Refusing to checkpoint a non-finite state at "
                           f"step {step}.")
    check_skips(step, int(run))
    last_saved[0] = step
    ckpt.save(step, state, {"data_position": position, "step": step,
                            "batch_size": int(config.batch_size),
                            "reason": reason})

  try:
    with _SigtermFlag() as sigterm:
      step = start_step
      while step < stop:
        now_log = (step + 1) % log_every == 0 or step + 1 == stop
        now_sample = bool(sample_every) and (step + 1) % sample_every == 0
        now_save = (step + 1) % checkpoint_every == 0 or step + 1 == stop
        # Steps that neither log, sample nor save only dispatch work: a
        # device-to-host read in one would make the host wait for the step
        # (no run-ahead), so the guard turns any such read into an error.
        # The first step compiles, and lowering reads the constants the step
        # closes over (its base key): a one-off read, allowed.
        quiet = step != start_step and not (now_log or now_sample or now_save)
        with jax.transfer_guard_device_to_host(
            "disallow_explicit" if quiet else "allow"):
          batch = _global_batch(prefetch.get(position), mesh)
          if flops == 0.0 and step == start_step:
            flops = metrics_lib.step_flops(step_fn.lowered(state, batch))
            # Whether a save's snapshot fits beside the step is decided from
            # the step's compiled peak (the compile is the first step's).
            ckpt.prepare(state, metrics_lib.compiled_peak_bytes(
                step_fn.compiled(state, batch)))
            throughput = metrics_lib.Throughput(int(config.batch_size), flops,
                                                peak, n_devices)
          state, m = step_fn(state, batch)
          accumulated.add(m, state.skipped)
          step += 1
          position += 1
          throughput.add()
          if now_log:
            # Reading the sums waits for the steps: the rate is right too.
            last_metrics, run = accumulated.read(int(config.loss_buckets))
            check_skips(step, run)
            losses.append(last_metrics["loss"])
            last_metrics.update(throughput.summary())
            last_metrics.update(metrics_lib.memory_stats())
            last_metrics["total_skipped_steps"] = float(
                jax.device_get(state.total_skipped))
            writer.write_scalars(step, last_metrics)
            writer.flush()
            if progress and jax.process_index() == 0:
              rate = last_metrics.get("steps_per_sec", 0)
              eta = (stop - step) / rate if rate else None
              print(metrics_lib.format_line(step, total, last_metrics, eta),
                    flush=True)
            throughput.reset()
          if now_sample:
            if eval_batch is None:
              eval_batch = source.local_batch(0)
            if sample_grid is None:
              sample_grid = _SampleGrid(stage, config, workdir, mesh)
            sample_grid(state, eval_batch, step, writer)
          if now_save and not sigterm.raised:
            save(step, "periodic" if step < stop else "final")
        if sigterm.raised:
          if last_saved[0] != step:
            save(step, "preempted")
          ckpt.wait()
          raise Preempted(step)
    ckpt.wait()
  finally:
    prefetch.close()
    writer.close()
    ckpt.close()
  if progress and jax.process_index() == 0:
    print(f"done: step {step}, {time.perf_counter() - t_start:.1f}s", flush=True)
  return {"step": step, "metrics": last_metrics, "losses": losses,
          "state": state}


class _SampleGrid:
  """Periodic samples of the first examples' captions, with the EMA params.

  Draws with ``config.sample`` exactly as ``Cascade.sample`` would
  (``Stage.uint8_sampler``), and compiles once per run: every later grid
  reuses the compiled sampling loop. Writes ``samples/step_N.png`` and a
  TensorBoard image.
  """

  def __init__(self, stage: Stage, config, workdir: str, mesh):
    self._settings = StageSettings.from_config(config.sample)
    self._num = int(config.num_samples)
    self._dir = os.path.join(workdir, "samples")
    self._mesh = mesh
    self._fn = jax.jit(stage.uint8_sampler(self._settings))
    self._is_sr = stage.is_sr

  def __call__(self, state, batch: dict, step: int, writer) -> None:
    n = min(self._num, batch["text"].shape[0])
    text = jnp.asarray(batch["text"][:n])
    mask = jnp.asarray(batch["text_mask"][:n])
    inputs = SampleInputs(
        text=text, text_mask=mask,
        lowres=jnp.asarray(batch["lowres"][:n]) if self._is_sr else None)
    with parallel.sharding_context(self._mesh):
      images = self._fn(state.ema_params, inputs, jax.random.PRNGKey(step))
    images = np.asarray(jax.device_get(images))
    if jax.process_index() == 0:
      images_lib.save_grid(images, os.path.join(self._dir,
                                               f"step_{step:08d}.png"))
      writer.write_images(step, {"samples": images})
