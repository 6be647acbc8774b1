"""Training metrics: throughput, FLOP/s and MFU, memory; TensorBoard + logs."""

from __future__ import annotations

import os
import time
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

# Dense peak FLOP/s per chip for bf16 matmuls (vendor figures).
PEAK_FLOPS = {
    "TPU v2": 45e12, "TPU v3": 123e12, "TPU v4": 275e12, "TPU v5 lite": 197e12,
    "TPU v5e": 197e12, "TPU v5p": 459e12, "TPU v5": 459e12, "TPU v6 lite": 918e12,
    "TPU v6e": 918e12,
    "NVIDIA H100": 989e12, "NVIDIA H200": 989e12, "NVIDIA A100": 312e12,
    "NVIDIA L4": 121e12, "NVIDIA A10": 125e12, "NVIDIA V100": 125e12,
}


def measure_matmul_flops(sizes=None, repeats: int = 5, dtype=None,
                         precision=None) -> float:
  """This machine's measured matmul FLOP/s on the default device.

  The one measurement behind the CPU fallback of ``peak_flops_per_device``
  and the "of matmul peak" columns of benchmarks/.

  Args:
    sizes: square sizes to try; default 1024-3072 on CPU, 4096-8192 on an
      accelerator (a GPU needs large products to fill its matrix units).
    repeats: timed products per size (median of them).
    dtype: operand dtype (default float32; bfloat16 for the peak that
      bf16-compute runs on accelerators are measured against).
    precision: ``jax.lax.Precision`` of the product; None is XLA's default
      (on NVIDIA GPUs a float32 product then runs on TF32 tensor cores).

  Returns:
    The best FLOP/s over ``sizes``, on random operands (zeros can run faster
    than real data on GPUs).
  """
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  dtype = dtype or jnp.float32
  if sizes is None:
    sizes = ((1024, 2048, 3072) if jax.default_backend() == "cpu"
             else (4096, 8192))
  best = 0.0
  for n in sizes:
    ka, kb = jax.random.split(jax.random.PRNGKey(n))
    a = jax.random.normal(ka, (n, n), dtype)
    b = jax.random.normal(kb, (n, n), dtype)
    f = jax.jit(lambda a, b: jnp.matmul(a, b, precision=precision))
    f(a, b).block_until_ready()
    times = []
    for _ in range(repeats):
      t = time.perf_counter()
      f(a, b).block_until_ready()
      times.append(time.perf_counter() - t)
    best = max(best, 2.0 * n**3 / float(np.median(times)))
  return best


def peak_flops_per_device(configured: float = 0.0) -> tuple[float, str]:
  """(peak FLOP/s of one device, where the figure came from).

  Order: the config's value; the table above by device kind; on CPU a
  float32 matmul measured now (shared by all CPU devices of the process).
  """
  if configured:
    return float(configured), "config"
  kind = jax.devices()[0].device_kind
  for name, flops in PEAK_FLOPS.items():
    if kind.startswith(name) or name in kind:
      return flops, f"table ({kind})"
  if jax.devices()[0].platform == "cpu":
    # One size, few repeats: this runs at every training start (~0.2 s).
    best = measure_matmul_flops(sizes=(1024,), repeats=5)
    # All virtual CPU devices share the host's cores.
    return best / max(len(jax.local_devices()), 1), "measured (cpu matmul)"
  return 0.0, f"unknown device kind {kind!r}: set config.peak_flops"


def step_flops(lowered) -> float:
  """FLOPs of one train step, all devices together, from XLA cost analysis.

  Counted on the lowered program (``jax.jit(...).lower(...)``: the global
  computation before partitioning and backend passes), not the compiled one.
  The compiled program's cost analysis counts one device's share of an SPMD
  step (an 8-device mesh reports 1/8), and on NVIDIA GPUs it leaves out the
  convolutions and matmuls that XLA hands to cuDNN/cuBLAS as custom calls
  (a small fraction of a U-Net step's FLOPs; benchmarks/RESULTS.md). The
  lowered count is
  the same on every mesh and backend; it includes remat's recomputation,
  as a hardware-FLOPs MFU does.

  Args:
    lowered: a ``jax.stages.Lowered`` (or anything with ``cost_analysis()``).

  Returns:
    The step's FLOPs, or 0.0 where the backend offers no cost analysis.
  """
  try:
    cost = lowered.cost_analysis()
    if isinstance(cost, (list, tuple)):
      cost = cost[0]
    return float(cost.get("flops", 0.0))
  except Exception:  # pylint: disable=broad-except
    return 0.0


def compiled_peak_bytes(compiled) -> Optional[int]:
  """A compiled program's peak memory per device, from XLA's analysis.

  Arguments + temporaries + outputs, less the outputs that reuse donated
  arguments' buffers.

  Args:
    compiled: a ``jax.stages.Compiled``.

  Returns:
    Bytes, or None where the backend gives no analysis.
  """
  mem = compiled.memory_analysis()
  if mem is None:
    return None
  return int(mem.temp_size_in_bytes + mem.argument_size_in_bytes
             + mem.output_size_in_bytes - mem.alias_size_in_bytes)


def memory_stats() -> dict[str, float]:
  """Host RSS and, where the backend reports it, device memory in GiB."""
  out = {}
  try:
    import psutil  # pylint: disable=g-import-not-at-top
    out["host_rss_gib"] = psutil.Process(os.getpid()).memory_info().rss / 2**30
  except ImportError:
    pass
  try:
    stats = jax.local_devices()[0].memory_stats() or {}
    if "bytes_in_use" in stats:
      out["device_mem_gib"] = stats["bytes_in_use"] / 2**30
    if "peak_bytes_in_use" in stats:
      out["device_peak_mem_gib"] = stats["peak_bytes_in_use"] / 2**30
  except Exception:  # pylint: disable=broad-except
    pass
  return out


class Throughput:
  """Steps/s, images/s, TFLOP/s per device and MFU over a logging window."""

  def __init__(self, global_batch: int, flops_per_step: float, peak: float,
               devices: int):
    self.global_batch = global_batch
    self.flops_per_step = flops_per_step
    self.peak = peak
    self.devices = devices
    self._t = time.perf_counter()
    self._steps = 0

  def add(self, steps: int = 1) -> None:
    self._steps += steps

  def reset(self) -> None:
    self._t = time.perf_counter()
    self._steps = 0

  def summary(self) -> dict[str, float]:
    dt = max(time.perf_counter() - self._t, 1e-9)
    sps = self._steps / dt
    out = {"steps_per_sec": sps, "images_per_sec": sps * self.global_batch}
    if self.flops_per_step:
      per_dev = self.flops_per_step * sps / self.devices
      out["tflops_per_device"] = per_dev / 1e12
      if self.peak:
        out["mfu"] = per_dev / self.peak
    return out


def _accumulate(acc: dict, m: dict, skip_run: jax.Array) -> dict:
  """acc + one step's metrics (bucket losses weighted by their counts)."""
  out = {}
  for key, value in m.items():
    value = jnp.asarray(value, jnp.float32)
    if key.startswith("loss_t"):
      value = value * jnp.asarray(m["count_t" + key[len("loss_t"):]],
                                  jnp.float32)
    out[key] = acc[key] + value
  out["steps"] = acc["steps"] + 1.0
  out["max_skip_run"] = jnp.maximum(acc["max_skip_run"],
                                    jnp.asarray(skip_run, jnp.float32))
  return out


_accumulate_jit = jax.jit(_accumulate, donate_argnums=0)


class Accumulator:
  """Sums of the per-step metrics between two logs, kept on the device.

  ``add`` dispatches one small jitted sum and returns at once: nothing is
  read back until ``read`` (at a log interval), so steps are dispatched
  ahead, and host memory does not grow with the number of steps. The sums
  are float32 on the device (a log window of up to ~10^5 steps loses no
  digit a progress line shows).
  """

  def __init__(self):
    self._acc: Optional[dict] = None

  def add(self, m: dict, skip_run: jax.Array) -> None:
    """Adds one step's metrics; ``skip_run`` is the consecutive-skip count."""
    if self._acc is None:
      self._acc = {k: jnp.zeros((), jnp.float32)
                   for k in list(m) + ["steps", "max_skip_run"]}
    self._acc = _accumulate_jit(self._acc, m, skip_run)

  def read(self, buckets: int) -> tuple[dict[str, float], int]:
    """(means since the last read, longest run of consecutive skips); resets.

    Means of loss, grad_norm and learning_rate; ``skipped_steps`` is a sum;
    ``loss_t{i}`` is the count-weighted mean of the buckets that had any.
    """
    if self._acc is None:
      return {}, 0
    host = {k: float(v) for k, v in jax.device_get(self._acc).items()}
    self._acc = None
    n = max(host["steps"], 1.0)
    out = {key: host[key] / n for key in ("loss", "grad_norm", "learning_rate")
           if key in host}
    out["skipped_steps"] = host.get("skipped", 0.0)
    for i in range(buckets):
      count = host.get(f"count_t{i}", 0.0)
      if count > 0:
        out[f"loss_t{i}"] = host[f"loss_t{i}"] / count
    return out, int(host["max_skip_run"])


def create_writer(workdir: str):
  """clu writer: TensorBoard event files + log lines (process 0 writes files).

  A URL workdir gets its event files through ``fileio`` (``_UploadingWriter``),
  so they reach any storage fileio reaches.
  """
  from clu import metric_writers  # pylint: disable=g-import-not-at-top
  from imagen_jax import fileio  # pylint: disable=g-import-not-at-top
  if fileio.is_remote(workdir) and jax.process_index() == 0:
    return _UploadingWriter(workdir)
  return metric_writers.create_default_writer(
      workdir, just_logging=jax.process_index() > 0)


class _UploadingWriter:
  """A clu writer on a local spool directory, copied to a URL on ``flush``.

  Event files are appended to locally and each flush uploads the files that
  grew (a whole object each time: object stores cannot append), so the
  bucket holds every event up to the last flush.
  """

  def __init__(self, workdir: str):
    import tempfile  # pylint: disable=g-import-not-at-top
    from clu import metric_writers  # pylint: disable=g-import-not-at-top
    self._dest = workdir
    self._local = tempfile.mkdtemp(prefix="imagen_jax_tb_")
    self._inner = metric_writers.create_default_writer(self._local)
    self._sizes: dict[str, int] = {}

  def __getattr__(self, name):
    return getattr(self._inner, name)

  def flush(self) -> None:
    from imagen_jax import fileio  # pylint: disable=g-import-not-at-top
    self._inner.flush()
    for path in fileio.walk_files(self._local):
      size = os.path.getsize(path)
      if self._sizes.get(path) != size:
        rel = os.path.relpath(path, self._local)
        fileio.makedirs(fileio.join(self._dest, os.path.dirname(rel)))
        fileio.upload(path, fileio.join(self._dest, rel))
        self._sizes[path] = size

  def close(self) -> None:
    import shutil  # pylint: disable=g-import-not-at-top
    try:
      self.flush()
    finally:
      self._inner.close()
      shutil.rmtree(self._local, ignore_errors=True)


def format_line(step: int, total: int, metrics: dict[str, float],
                eta_s: Optional[float]) -> str:
  """One progress line: step, loss, rates, ETA."""
  parts = [f"step {step}/{total}", f"loss {metrics.get('loss', float('nan')):.4f}"]
  for key, fmt in (("grad_norm", "gnorm {:.3g}"), ("steps_per_sec", "{:.2f} steps/s"),
                   ("images_per_sec", "{:.1f} img/s"),
                   ("tflops_per_device", "{:.3g} TFLOP/s/dev"), ("mfu", "MFU {:.1%}")):
    if key in metrics:
      parts.append(fmt.format(metrics[key]))
  if eta_s is not None:
    parts.append(f"ETA {int(eta_s // 3600)}:{int(eta_s % 3600 // 60):02d}:"
                 f"{int(eta_s % 60):02d}")
  return " | ".join(parts)
