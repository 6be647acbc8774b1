"""Shared helpers for benchmark scripts: timing, matmul peak, tables."""

from __future__ import annotations

import datetime
import os
import platform
import statistics
import sys
import time
from typing import Callable, Sequence

import jax
import jax.numpy as jnp

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

# Benchmarks run as the console commands do: under TCMalloc where installed
# (imagen_jax/host_malloc.py; IMAGEN_JAX_MALLOC=system for glibc). Worker
# subprocesses, ours and the PyTorch references alike, inherit the preload,
# so side-by-side rows always share one allocator (named in machine_line).
from imagen_jax import host_malloc  # pylint: disable=g-import-not-at-top,g-bad-import-order
host_malloc.maybe_reexec()


def block(x):
  """Waits for every array in a pytree."""
  return jax.block_until_ready(x)


def time_call(fn: Callable[[], object], repeats: int = 5, warmup: int = 1
              ) -> float:
  """Median wall seconds of ``fn()`` (which must block) over ``repeats``."""
  for _ in range(warmup):
    fn()
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def matmul_peak_flops(sizes: Sequence[int] | None = None, repeats: int = 5,
                      dtype=jnp.float32, precision=None) -> float:
  """This machine's measured matmul FLOP/s, best over sizes (the training
  loop's own measurement, ``metrics.measure_matmul_flops``: see there)."""
  from imagen_jax.train import metrics  # pylint: disable=g-import-not-at-top
  return metrics.measure_matmul_flops(sizes, repeats, dtype, precision)


def machine_line() -> str:
  """One line naming the date, CPU/accelerator, core count and allocator."""
  dev = jax.devices()[0]
  cpu = platform.processor() or platform.machine()
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          cpu = line.split(":", 1)[1].strip()
          break
  except OSError:
    pass
  return (f"{datetime.date.today().isoformat()} | {dev.platform} "
          f"({dev.device_kind}) | {cpu} | {os.cpu_count()} cores | "
          f"jax {jax.__version__} | malloc {host_malloc.loaded_allocator()}")


def print_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
  """Prints a Markdown table (pastes straight into RESULTS.md)."""
  def fmt(v):
    if isinstance(v, float):
      return f"{v:.4g}"
    return str(v)
  cells = [[fmt(v) for v in row] for row in rows]
  widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]
  print("| " + " | ".join(h.ljust(w) for h, w in zip(headers, widths)) + " |")
  print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
  for r in cells:
    print("| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |")


def run_worker(script: str, args: Sequence[str], env: dict | None = None) -> dict:
  """Runs ``script --worker ...`` in a subprocess; returns its RESULT json.

  Each framework measures in its own process so thread pools and peak RSS
  do not mix.
  """
  import json  # pylint: disable=g-import-not-at-top
  import subprocess  # pylint: disable=g-import-not-at-top
  out = subprocess.run([sys.executable, script, *args], capture_output=True,
                       text=True, check=False, env=env)
  for line in out.stdout.splitlines():
    if line.startswith("RESULT "):
      return json.loads(line[7:])
  raise RuntimeError(f"worker {args} failed:\n{out.stderr[-3000:]}")
