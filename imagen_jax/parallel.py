"""Device meshes, logical-axis sharding rules and multi-host initialisation.

Models name their parameter and activation axes logically (see
``models/layers.py``); the rules below map those names to the mesh axes
``data``, ``fsdp`` and ``tensor``:

* ``data``: pure data parallelism (batch split, params replicated);
* ``fsdp``: batch split *and* params / optimizer state split over their
  "embed" / "conv_in" axis (ZeRO-3 style, gathered per layer by XLA);
* ``tensor``: params split over their "mlp" / "heads" / "conv_out" axis.

A mesh axis that does not divide a parameter's dimension is dropped for that
parameter (it stays replicated along it) rather than failing, so one rule set
serves every model size.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", BATCH_AXES),
    ("embed", "fsdp"),
    ("conv_in", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("joined_kv", "tensor"),
    ("conv_out", "tensor"),
    ("vocab", "tensor"),
    ("kv", None),
    ("norm", None),
    ("relpos_buckets", None),
    ("height", None),
    ("width", None),
    ("act_channels", None),
    ("length", None),
    ("act_embed", None),
)


def resolve_mesh_shape(shape: Sequence[int], num_devices: int) -> tuple[int, ...]:
  """Replaces one -1 in a mesh shape by what is left of the devices.

  Args:
    shape: sizes for (data, fsdp, tensor); at most one may be -1.
    num_devices: devices the mesh must cover exactly.

  Returns:
    The concrete shape.
  """
  shape = [int(s) for s in shape]
  if len(shape) != len(MESH_AXES):
    raise ValueError(f"mesh.shape {tuple(shape)} must have 3 entries (data, "
                     "fsdp, tensor).")
  if shape.count(-1) > 1:
    raise ValueError(f"mesh.shape {tuple(shape)} has more than one -1; give "
                     "at most one axis as 'the rest'.")
  known = int(np.prod([s for s in shape if s != -1]))
  if -1 in shape:
    if known <= 0 or num_devices % known:
      raise ValueError(f"mesh.shape {tuple(shape)} does not divide the "
                       f"{num_devices} devices present.")
    shape[shape.index(-1)] = num_devices // known
  if int(np.prod(shape)) != num_devices:
    raise ValueError(f"mesh.shape {tuple(shape)} needs {int(np.prod(shape))} "
                     f"devices but {num_devices} are present; use -1 for one "
                     "axis to take the rest.")
  return tuple(shape)


def make_mesh(shape: Sequence[int] = (-1, 1, 1),
              devices: Optional[Sequence[jax.Device]] = None,
              dcn_shape: Optional[Sequence[int]] = None) -> Mesh:
  """Builds a (data, fsdp, tensor) mesh over ``devices`` (default: all).

  Uses ``mesh_utils`` so the device order follows the physical topology (TPU
  torus, GPU NVLink islands). With ``dcn_shape`` (one entry per axis, the
  number of slices/hosts along it), builds a hybrid ICI x DCN mesh for
  multi-slice TPU jobs.

  Args:
    shape: per-axis sizes within a slice (or overall when no dcn_shape);
      one -1 takes the remaining devices.
    devices: devices to use; all global devices by default.
    dcn_shape: optional per-axis slice counts.

  Returns:
    A ``jax.sharding.Mesh`` with axes ("data", "fsdp", "tensor").
  """
  from jax.experimental import mesh_utils  # pylint: disable=g-import-not-at-top
  devices = list(devices if devices is not None else jax.devices())
  if dcn_shape is not None and int(np.prod(dcn_shape)) > 1:
    slices = int(np.prod(dcn_shape))
    # TPU slices are the DCN granules (devices carry their slice_index);
    # elsewhere (GPU clusters, CPU hosts) each process is one. CPU devices
    # also report a slice_index, always 0, hence the platform test.
    by_process = devices[0].platform != "tpu"
    granules = len({d.process_index if by_process else d.slice_index
                    for d in devices})
    if granules != slices:
      raise ValueError(
          f"mesh.dcn_shape={tuple(dcn_shape)} asks for {slices} slices but "
          f"the devices form {granules} "
          f"({'processes' if by_process else 'TPU slices'}); set "
          f"mesh.dcn_shape to a shape whose product is {granules}.")
    ici = resolve_mesh_shape(shape, len(devices) // slices)
    grid = mesh_utils.create_hybrid_device_mesh(
        ici, tuple(dcn_shape), devices, process_is_granule=by_process)
    return Mesh(grid, MESH_AXES)
  concrete = resolve_mesh_shape(shape, len(devices))
  try:
    grid = mesh_utils.create_device_mesh(concrete, devices)
  except (NotImplementedError, ValueError, AssertionError):
    grid = np.asarray(devices).reshape(concrete)
  return Mesh(grid, MESH_AXES)


def _fit_spec(shape: Sequence[int], spec: PartitionSpec, mesh: Mesh
              ) -> PartitionSpec:
  """Drops mesh axes that do not evenly divide the dimension they shard."""
  fitted = []
  for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
    if axes is None:
      fitted.append(None)
      continue
    names = (axes,) if isinstance(axes, str) else tuple(axes)
    keep, size = [], 1
    for name in names:
      if dim % (size * mesh.shape[name]) == 0:
        keep.append(name)
        size *= mesh.shape[name]
    fitted.append(None if not keep else (keep[0] if len(keep) == 1
                                         else tuple(keep)))
  return PartitionSpec(*fitted)


def param_shardings(boxed_abstract: Any, mesh: Mesh,
                    rules: Sequence[tuple[str, Any]] = DEFAULT_RULES) -> Any:
  """NamedShardings for a tree of logically-partitioned (boxed) values.

  Args:
    boxed_abstract: output of ``jax.eval_shape(module.init, ...)`` (or any
      tree with ``nn.LogicallyPartitioned`` leaves); unboxed leaves are
      replicated.
    mesh: the device mesh.
    rules: logical-to-mesh axis rules.

  Returns:
    A tree of ``NamedSharding`` matching the unboxed tree.
  """
  specs = nn.get_partition_spec(boxed_abstract)
  mesh_specs = nn.logical_to_mesh(specs, rules)
  shapes = nn.unbox(boxed_abstract)
  return jax.tree_util.tree_map(
      lambda spec, x: NamedSharding(mesh, _fit_spec(x.shape, spec, mesh)),
      mesh_specs, shapes,
      is_leaf=lambda x: isinstance(x, PartitionSpec))


@contextlib.contextmanager
def sharding_context(mesh: Mesh,
                     rules: Sequence[tuple[str, Any]] = DEFAULT_RULES):
  """Mesh + logical-axis rules in scope, so activation constraints apply."""
  with mesh, nn.logical_axis_rules(rules):
    yield


def batch_sharding(mesh: Mesh, ndim: int = 1) -> NamedSharding:
  """Sharding of a batch-major array: leading axis over (data, fsdp)."""
  return NamedSharding(mesh, PartitionSpec(BATCH_AXES, *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
  """Fully replicated sharding on ``mesh``."""
  return NamedSharding(mesh, PartitionSpec())


def data_parallel_size(mesh: Mesh) -> int:
  """How many ways the batch is split (data x fsdp)."""
  return int(mesh.shape["data"] * mesh.shape["fsdp"])


def initialize_distributed(coordinator_address: Optional[str] = None,
                           num_processes: Optional[int] = None,
                           process_id: Optional[int] = None) -> None:
  """Starts multi-host JAX when there is more than one process.

  On TPU pods, SLURM and other clusters jax detects everything itself; on a
  plain set of machines pass the coordinator explicitly (also through the
  environment: IMAGEN_COORDINATOR, IMAGEN_NUM_PROCESSES, IMAGEN_PROCESS_ID).
  A single process with nothing set does nothing.
  """
  coordinator_address = coordinator_address or os.environ.get(
      "IMAGEN_COORDINATOR")
  if num_processes is None and os.environ.get("IMAGEN_NUM_PROCESSES"):
    num_processes = int(os.environ["IMAGEN_NUM_PROCESSES"])
  if process_id is None and os.environ.get("IMAGEN_PROCESS_ID"):
    process_id = int(os.environ["IMAGEN_PROCESS_ID"])
  if coordinator_address:
    # Cross-process collectives on CPU (tests, CPU clusters) go through gloo;
    # the option only concerns the CPU backend. No backend may start before
    # initialize(), so nothing here may touch devices.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=coordinator_address,
                               num_processes=num_processes,
                               process_id=process_id)
    return
  if any(k in os.environ for k in ("SLURM_JOB_ID", "TPU_WORKER_HOSTNAMES",
                                   "MEGASCALE_COORDINATOR_ADDRESS")):
    try:
      jax.distributed.initialize()
    except (RuntimeError, ValueError):
      # A single-task SLURM allocation or a one-host TPU VM: nothing to join.
      pass
