"""Training throughput, compiled memory of the paper's base stage, checkpoint stall.

  XLA_FLAGS=--xla_force_host_platform_device_count=8 python benchmarks/train_speed.py

1. CPU-scale configs (base64:cpu, sr256:cpu) on this machine, one device,
   at batch 8 and at the config's own batch (32, 16), plus sr256:cpu at its
   former base width of 32 (the demo SR stage's): steps/s, images/s,
   achieved TFLOP/s (XLA cost analysis of the lowered step) and its
   fraction of the measured float32 matmul peak (median step time),
   compiled memory and peak host RSS.
2. The paper-scale base stage (2.0B params, Adafactor + EMA, bf16 compute)
   at per-device batch 32 on the sharding of one 8-chip host (mesh
   data=1 x fsdp=8), with and without remat: ``compiled.memory_analysis()``
   of the train step lowered on abstract inputs (nothing is allocated).
   By default compiled by XLA:CPU on 8 virtual devices, whose scheduler does
   not model remat's savings; with ``--paper-topology=v5p:2x2x2`` it is
   compiled ahead of time by the TPU compiler for 8 chips of that topology,
   on this CPU-only machine (needs ``libtpu``, which jax pins, in a separate
   environment: ``bash benchmarks/setup_tpu_aot_env.sh``). That is the real
   accelerator compiler's buffer assignment, not an extrapolation.
3. Checkpoint saves inside a step loop (``--only-saves`` alone): for the
   tiny state on 1 and on 8 devices (mesh fsdp=8) and the cpu base stage on
   one device, real train steps with a save every ``--save-every`` steps
   (an interval longer than a save); per save, the time ``save`` held the
   loop (``Checkpointer.timings``: the host copy of the packed leaves, the
   snapshot's dispatch, or orbax's host copy) and the time from the
   ``save`` call to orbax's commit. As in the train loop, the steps
   dispatched ahead have finished before the call.
4. Host memory of the train loop (``--host-rss``; alone with
   ``--only-host-rss``): the tiny config for 2,000 steps on one device,
   logging every 200; host RSS at each log (the loop's ``host_rss_gib``
   scalar). Flat from step 200 on: the loop keeps no per-step lists.
5. The paper base stage's peak per device with and without the checkpoint
   snapshot (``--snapshot-paper``; alone with ``--only-snapshot-paper``):
   the snapshot program (a copy of the state's large leaves) is lowered and
   compiled on the paper state's abstract shapes and shardings (eval_shape,
   nothing allocated) on 1 device and on fsdp=8; its
   ``memory_analysis()`` output is the copy's size per device. The train
   step's own peak is not compiled here (the paper step takes XLA:CPU
   20-25 minutes): pass the measured or TPU-compiled figures with
   ``--paper-step-peak-gib=DEVICES:GIB,...``. Where they are given, each
   row also says what ``checkpoint.snapshot_fits`` decides for an 80 GB
   device.

Targets: cpu step >= 50% of matmul FLOP/s; paper base at per-device batch 32
fits 80 GB per device with remat; a tiny state commits in < 1 s on one
device, and a save whose interval is longer than the save holds the loop
for no more than a step.
"""

from __future__ import annotations

import argparse
import os
import resource
import tempfile
import time

import common
import jax
import jax.numpy as jnp
import numpy as np

from imagen_jax import build
from imagen_jax import parallel
from imagen_jax.stage import Stage
from imagen_jax.train import metrics as metrics_lib
from imagen_jax.train import optim
from imagen_jax.train import state as state_lib
from imagen_jax.train.checkpoint import Checkpointer
from imagen_jax.train.step import make_train_step
from tests import helpers


# The memory target: an 80 GB accelerator, in bytes as its vendor counts them
# (74.5 GiB; an H100 "80GB" reports 79.6 GiB in all).
TARGET_DEVICE_BYTES = 80 * 10**9


def _batch(config, b, text_len, seed=0):
  rs = np.random.RandomState(seed)
  r = int(config.train_crop) or int(config.resolution)
  out = {"image": rs.randint(0, 255, (b, r, r, 3)).astype(np.uint8),
         "text": rs.randn(b, text_len, int(config.model.text_dim)).astype(np.float32),
         "text_mask": np.ones((b, text_len), bool)}
  if config.lowres_resolution:
    lr = r * int(config.lowres_resolution) // int(config.resolution)
    out["lowres"] = rs.randint(0, 255, (b, lr, lr, 3)).astype(np.uint8)
  return out


def _setup(config, mesh):
  stage = Stage.from_config(config)
  tx, lr = optim.make_optimizer(config.optimizer, int(config.total_steps))
  abstract, sh = state_lib.state_shardings(
      stage.unet, build.unet_inputs(config, 1, 4), tx, mesh)
  return stage, tx, lr, abstract, sh


def cpu_throughput(name, batch, peak, dtype="float32", base_channels=0):
  config = helpers.load_config(name, "cpu")
  config.batch_size = batch
  config.model.dtype = dtype
  label = f"{name}:cpu {dtype}"
  if base_channels:
    config.model.base_channels = base_channels
    label += f" base_channels={base_channels}"
  mesh = parallel.make_mesh((1, 1, 1), jax.devices()[:1])
  stage, tx, lr, abstract, sh = _setup(config, mesh)
  state = state_lib.init_state(stage.unet, config, tx, mesh, sh,
                               jax.random.PRNGKey(0))
  step = make_train_step(stage, tx, lr, config, mesh, sh)
  b = {k: jax.device_put(v) for k, v in _batch(config, batch, 16).items()}
  compiled = step.compiled(state, b)
  flops = metrics_lib.step_flops(step.lowered(state, b))
  mem = compiled.memory_analysis()
  for _ in range(2):
    state, m = step(state, b)
  jax.block_until_ready(m)
  # Median of single steps, as for the matmul peak (common.time_call).
  cell = [state]

  def one_step():
    cell[0], metrics = step(cell[0], b)
    jax.block_until_ready(metrics)

  secs = common.time_call(one_step, repeats=7, warmup=0)
  state = cell[0]
  return [label, build.count_params(state.params), batch,
          1 / secs, batch / secs, flops / secs / 1e12, flops / secs / peak,
          (mem.temp_size_in_bytes + mem.argument_size_in_bytes) / 2**20,
          resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10]


def tpu_topology_devices(name: str) -> list:
  """The devices of a TPU topology for ahead-of-time compiles (no TPU needed)."""
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
  return list(topologies.get_topology_desc(platform="tpu",
                                           topology_name=name).devices)


def paper_memory(remat: str, per_device_batch: int, devices=None):
  config = helpers.load_config("base64", "paper")
  config.model.remat = remat
  devices = (devices or jax.devices())[:8]
  mesh = parallel.make_mesh((1, 8, 1), devices)
  config.batch_size = per_device_batch * 8
  stage, tx, lr, abstract, sh = _setup(config, mesh)
  step = make_train_step(stage, tx, lr, config, mesh, sh)
  abstract_state = state_lib.abstract_with_shardings(abstract, sh)
  batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype,
                                   sharding=parallel.batch_sharding(mesh, v.ndim))
           for k, v in _batch(config, 8, 128).items()}
  batch = {k: jax.ShapeDtypeStruct((config.batch_size,) + v.shape[1:], v.dtype,
                                   sharding=v.sharding) for k, v in batch.items()}
  t = time.perf_counter()
  compiled = step.compiled(abstract_state, batch)
  mem = compiled.memory_analysis()
  total = metrics_lib.compiled_peak_bytes(compiled)
  return [f"base64:paper remat={remat}", devices[0].device_kind,
          per_device_batch,
          mem.argument_size_in_bytes / 2**30, mem.temp_size_in_bytes / 2**30,
          total / 2**30, "yes" if total < TARGET_DEVICE_BYTES else "NO",
          time.perf_counter() - t]


def paper_run(remat: str, per_device_batch: int, steps: int, bf16_peak: float):
  """Real train steps of the paper base stage on the devices present.

  The accelerator counterpart of ``paper_memory``: params, Adafactor state and
  EMA are allocated (sharded FSDP over all local devices; on one device the
  whole 2.0B state sits there, a harder case than the 8-way sharding of the
  target), the step runs ``steps`` times, and the row gives its median time,
  MFU and the device's peak memory in use as its allocator counts it.

  Args:
    remat: the model's remat policy ("full" or "none").
    per_device_batch: examples per device per step.
    steps: timed steps (after one warm-up).
    bf16_peak: measured bf16 matmul FLOP/s of one device (MFU's denominator
      beside the vendor figure).

  Returns:
    One table row.
  """
  config = helpers.load_config("base64", "paper")
  config.model.remat = remat
  devices = jax.local_devices()
  n = len(devices)
  mesh = parallel.make_mesh((1, n, 1), devices)
  config.batch_size = per_device_batch * n
  stage, tx, lr, abstract, sh = _setup(config, mesh)
  t = time.perf_counter()
  state = state_lib.init_state(stage.unet, config, tx, mesh, sh,
                               jax.random.PRNGKey(0))
  step = make_train_step(stage, tx, lr, config, mesh, sh)
  b = {k: jax.device_put(v, parallel.batch_sharding(mesh, v.ndim))
       for k, v in _batch(config, config.batch_size, 128).items()}
  step.compiled(state, b)
  compile_secs = time.perf_counter() - t
  flops = metrics_lib.step_flops(step.lowered(state, b))
  cell = [state]

  def one_step():
    cell[0], metrics = step(cell[0], b)
    jax.block_until_ready(metrics)
    return metrics

  m = one_step()
  secs = common.time_call(one_step, repeats=steps, warmup=0)
  vendor_peak, _ = metrics_lib.peak_flops_per_device()
  stats = devices[0].memory_stats() or {}
  used = stats.get("peak_bytes_in_use", 0)
  limit = stats.get("bytes_limit", 0)
  per_dev = flops / n / secs
  return [f"base64:paper remat={remat}", devices[0].device_kind, n,
          per_device_batch, float(m["loss"]), secs * 1e3,
          config.batch_size / secs, per_dev / 1e12,
          per_dev / vendor_peak if vendor_peak else float("nan"),
          per_dev / bf16_peak, used / 2**30, limit / 2**30,
          "yes" if used < TARGET_DEVICE_BYTES else "NO", compile_secs]


def save_timings(name: str, variant: str, devices: int, steps: int,
                 every: int, batch: int) -> list:
  """Per-save timings of a step loop that saves every ``every`` steps.

  Args:
    name: "tiny" (configs/tiny.py) or a configs/ stage name (its cpu
      variant).
    variant: the config's variant (ignored for "tiny").
    devices: devices of the mesh (fsdp over all of them).
    steps: train steps in all.
    every: steps between saves.
    batch: global batch.

  Returns:
    Table rows, one per save.
  """
  config = (helpers.tiny_train_config() if name == "tiny"
            else helpers.load_config(name, variant))
  config.batch_size = batch
  label = "tiny" if name == "tiny" else f"{name}:{variant}"
  mesh = parallel.make_mesh((1, devices, 1), jax.devices()[:devices])
  stage, tx, lr, abstract, sh = _setup(config, mesh)
  state = state_lib.init_state(stage.unet, config, tx, mesh, sh,
                               jax.random.PRNGKey(0))
  step = make_train_step(stage, tx, lr, config, mesh, sh)
  b = {k: jax.device_put(v, parallel.batch_sharding(mesh, v.ndim))
       for k, v in _batch(config, batch, 16).items()}
  peak = metrics_lib.compiled_peak_bytes(step.compiled(state, b))
  leaves = jax.tree_util.tree_leaves(state)
  rows = []
  with tempfile.TemporaryDirectory() as d:
    ck = Checkpointer(d, max_to_keep=3)
    # As the train loop does after its first compile.
    ck.prepare(state, peak)
    t0 = time.perf_counter()
    for i in range(1, steps + 1):
      state, _ = step(state, b)
      if i % every == 0:
        # As the train loop's save does (it reads the skip counter first):
        # the steps dispatched ahead finish before the save call, so its
        # time is the save's own.
        jax.block_until_ready(state)
        ck.save(i, state, {"data_position": i})
    jax.block_until_ready(state)
    loop_s = time.perf_counter() - t0
    ck.close()
    for k, t in enumerate(ck.timings):
      rows.append([label, devices, len(leaves),
                   sum(x.nbytes for x in leaves) / 2**20, t["step"],
                   "yes" if t["snapshot"] else "no", t["blocked_s"],
                   t["commit_s"], loop_s / steps if k == 0 else ""])
  return rows


def paper_snapshot(step_peaks: dict) -> list:
  """The paper base stage's snapshot size per device, compiled on shapes.

  Args:
    step_peaks: {devices: the train step's peak GiB per device} (may be
      empty): measured or compiled elsewhere.

  Returns:
    Table rows.
  """
  from imagen_jax.train import checkpoint as ckpt_lib  # pylint: disable=g-import-not-at-top
  config = helpers.load_config("base64", "paper")
  rows = []
  for n in (1, 8):
    if n > len(jax.devices()):
      continue
    mesh = parallel.make_mesh((1, n, 1), jax.devices()[:n])
    t = time.perf_counter()
    _, _, _, abstract, sh = _setup(config, mesh)
    target = jax.tree_util.tree_leaves(
        state_lib.abstract_with_shardings(abstract, sh))
    large = [x for x in target if ckpt_lib._nbytes(x) > ckpt_lib.PACK_LEAF_BYTES]  # pylint: disable=protected-access
    compiled = jax.jit(lambda tree: [jnp.copy(x) for x in tree]).lower(
        large).compile()
    copy = compiled.memory_analysis().output_size_in_bytes
    secs = time.perf_counter() - t
    packed = sum(ckpt_lib._nbytes(x) for x in target) - sum(  # pylint: disable=protected-access
        ckpt_lib._nbytes(x) for x in large)  # pylint: disable=protected-access
    step_gib = step_peaks.get(n)
    row = [f"base64:paper fsdp={n}", len(target), len(large),
           packed / 2**20, copy / 2**30]
    if step_gib is None:
      row += ["", "", "", ""]
    else:
      with_copy = step_gib + copy / 2**30

      class _Device:
        device_kind = "80 GB device"

        def memory_stats(self):
          return {"bytes_limit": TARGET_DEVICE_BYTES}

      fits, _ = ckpt_lib.snapshot_fits(copy, int(step_gib * 2**30), _Device())
      row += [step_gib, with_copy,
              "yes" if with_copy * 2**30 < TARGET_DEVICE_BYTES else "NO",
              "snapshot" if fits else "orbax host copy"]
    rows.append(row + [secs])
  return rows


def host_rss(total: int = 2000, log_every: int = 200) -> list:
  """Host RSS (MiB) at each log of a tiny run of ``total`` steps."""
  from imagen_jax.train import loop  # pylint: disable=g-import-not-at-top
  config = helpers.tiny_train_config(**{
      "total_steps": total, "log_every": log_every, "checkpoint_every": total,
      "mesh.shape": (1, 1, 1), "mesh.num_devices": 1})
  with tempfile.TemporaryDirectory() as d:
    t0 = time.perf_counter()
    loop.train(config, d, progress=False)
    elapsed = time.perf_counter() - t0
    rss = helpers.read_scalars(d, "host_rss_gib")
  first = rss[min(rss)]
  return [[step, rss[step] * 1024, (rss[step] - first) * 1024,
           elapsed if step == total else ""] for step in sorted(rss)]


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--host-rss", action="store_true",
                      help="also section 4: host RSS over 2,000 tiny steps")
  parser.add_argument("--only-host-rss", action="store_true")
  parser.add_argument("--skip-paper", action="store_true")
  parser.add_argument("--paper-topology", default="",
                      help="compile the paper-scale step for this TPU "
                      "topology (e.g. v5p:2x2x2) instead of XLA:CPU")
  parser.add_argument("--remat", default="none,full",
                      help="remat policies for the paper-scale estimate")
  parser.add_argument("--paper-batch", type=int, default=32,
                      help="per-device batch of the paper-scale estimate")
  parser.add_argument("--only-paper", action="store_true")
  parser.add_argument("--batch", type=int, default=8,
                      help="CPU-scale rows at this batch and at the config's")
  parser.add_argument("--dtype", default="float32",
                      help="compute dtypes of the CPU-scale rows, comma "
                      "separated (e.g. float32,bfloat16 on an accelerator)")
  parser.add_argument("--paper-run", action="store_true",
                      help="also run real steps of the paper base stage on "
                      "the devices present (needs an accelerator: 60 GiB "
                      "on one device at batch 32 without remat)")
  parser.add_argument("--paper-steps", type=int, default=5)
  parser.add_argument("--only-saves", action="store_true",
                      help="only section 3 (checkpoint saves)")
  parser.add_argument("--save-steps", type=int, default=200)
  parser.add_argument("--save-every", type=int, default=40)
  parser.add_argument("--tiny-batch", type=int, default=8)
  parser.add_argument("--snapshot-paper", action="store_true",
                      help="also section 5: paper base peak with and without "
                      "the checkpoint snapshot")
  parser.add_argument("--only-snapshot-paper", action="store_true")
  parser.add_argument("--paper-step-peak-gib", default="",
                      help="the paper step's peak GiB per device, measured "
                      "or compiled elsewhere, as DEVICES:GIB,...")
  args = parser.parse_args()
  print(common.machine_line())
  if args.snapshot_paper or args.only_snapshot_paper:
    peaks = {int(k): float(v) for k, v in (
        item.split(":") for item in args.paper_step_peak_gib.split(",")
        if item)}
    print("\n5. Paper base stage: checkpoint snapshot per device (copy "
          "program compiled on the state's abstract shapes; step peak as "
          "given)")
    common.print_table(["config", "arrays", "large arrays", "packed MiB",
                        "snapshot GiB", "step peak GiB", "with snapshot GiB",
                        "with snapshot fits 80 GB", "auto saves by",
                        "eval_shape+compile s"], paper_snapshot(peaks))
    if args.only_snapshot_paper:
      return
  if args.only_saves:
    saves(args)
    return
  if args.host_rss or args.only_host_rss:
    rows = host_rss()
    print("\n4. Host RSS of the train loop, tiny config, one device, log "
          "every 200 steps")
    common.print_table(["step", "host RSS MiB", "vs first log MiB",
                        "run s"], rows)
    if args.only_host_rss:
      return
  if not args.only_paper:
    peaks = {d: common.matmul_peak_flops(dtype=jnp.dtype(d))
             for d in args.dtype.split(",")}
    rows = []
    for dtype, peak in peaks.items():
      for name in ("base64", "sr256"):
        config_batch = int(helpers.load_config(name, "cpu").batch_size)
        for batch in sorted({args.batch, config_batch}):
          rows.append(cpu_throughput(name, batch, peak, dtype))
      # sr256:cpu before its base width went 32 -> 64 (the demo's SR width):
      # narrow convolutions on 64x64 maps are XLA:CPU's weak spot.
      rows.append(cpu_throughput(
          "sr256", int(helpers.load_config("sr256", "cpu").batch_size), peak,
          dtype, base_channels=32))
    print("\n1. CPU-scale train step, one device; measured matmul peak " +
          ", ".join(f"{d} {p / 1e9:.1f} GFLOP/s" for d, p in peaks.items()) +
          " (each row against its dtype's)")
    common.print_table(["config", "params", "batch", "steps/s", "images/s",
                        "TFLOP/s", "of matmul peak", "XLA mem MiB",
                        "peak RSS MiB"], rows)
  if args.paper_run:
    bf16_peak = common.matmul_peak_flops(dtype=jnp.bfloat16)
    rows = [paper_run(r, args.paper_batch, args.paper_steps, bf16_peak)
            for r in args.remat.split(",")]
    print(f"\n2a. Paper base stage (2.0B, Adafactor + EMA, bf16 compute), "
          f"real steps on this machine, per-device batch {args.paper_batch}, "
          f"128 text tokens, mesh data=1 x fsdp=all local devices; measured "
          f"bf16 matmul peak {bf16_peak / 1e12:.0f} TFLOP/s")
    common.print_table(["config", "device", "devices", "batch/device", "loss",
                        "ms/step", "images/s", "TFLOP/s/device",
                        "MFU (vendor peak)", "of measured bf16 peak",
                        "device peak GiB", "device limit GiB", "fits 80 GB",
                        "init+compile s"], rows)
  if not args.skip_paper:
    devices = (tpu_topology_devices(args.paper_topology)
               if args.paper_topology else jax.devices())
    if len(devices) < 8:
      print("\n2. skipped: needs 8 devices "
            "(XLA_FLAGS=--xla_force_host_platform_device_count=8)")
    else:
      rows = [paper_memory(r, args.paper_batch, devices)
              for r in args.remat.split(",")]
      target = (f"TPU compiler, {args.paper_topology}" if args.paper_topology
                else "XLA:CPU")
      print(f"\n2. Paper base stage (2.0B, Adafactor + EMA, bf16), per-device "
            f"batch {args.paper_batch}, mesh data=1 x fsdp=8; compiled "
            f"estimate per device (GiB), {target}")
      common.print_table(["config", "device", "batch/device",
                          "args (state+batch)", "temp (activations)", "total",
                          "fits 80 GB", "compile s"], rows)
  if args.only_paper:
    return
  saves(args)


def saves(args) -> None:
  """Section 3: per-save timings inside step loops."""
  rows = save_timings("tiny", "", 1, args.save_steps, args.save_every,
                      args.tiny_batch)
  if len(jax.devices()) >= 8:
    rows += save_timings("tiny", "", 8, args.save_steps, args.save_every,
                         args.tiny_batch)
  rows += save_timings("base64", "cpu", 1, args.save_steps // 2,
                       args.save_every // 2, args.batch)
  print(f"\n3. Checkpoint saves in a step loop (save every "
        f"{args.save_every} steps; cpu base every {args.save_every // 2}): "
        "loop blocked by the save call vs save call to commit")
  common.print_table(["state", "devices", "arrays", "MiB", "step",
                      "snapshot", "blocked s", "to commit s", "loop s/step"],
                     rows)


if __name__ == "__main__":
  main()
