"""Shared helpers for benchmark scripts: timing, matmul peak, tables."""

from __future__ import annotations

import datetime
import os
import platform
import statistics
import sys
import time
from typing import Callable, Iterable, Sequence

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
  return statistics.median(step_times(fn, repeats))


def step_times(fn: Callable[[], object], repeats: int) -> list[float]:
  """Wall seconds of each of ``repeats`` calls of ``fn()`` (which must block)."""
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return times


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


class StepWorker:
  """A worker subprocess that times single steps on demand, for paired runs.

  The worker (``script --worker ...``) builds and warms its model, calls
  ``serve_steps``, and then times ``run N`` requests read from stdin. Two or
  more workers stay alive side by side and the parent asks each in turn for
  a few steps, so every framework is timed within seconds of the others:
  on a shared host whose load drifts by 10-30% over a minute, the ratio of
  two interleaved rounds is far steadier than the ratio of two separate
  runs. Only one worker computes at any time; the others block on stdin.
  """

  def __init__(self, script: str, args: Sequence[str], env: dict | None = None):
    import subprocess  # pylint: disable=g-import-not-at-top
    import tempfile  # pylint: disable=g-import-not-at-top
    self._stderr = tempfile.TemporaryFile(mode="w+")
    self._args = list(args)
    self._proc = subprocess.Popen(
        [sys.executable, script, *args], stdin=subprocess.PIPE,
        stdout=subprocess.PIPE, stderr=self._stderr, text=True, env=env)
    self.info = self._expect("READY ")

  def _expect(self, tag: str):
    def stderr():
      self._stderr.seek(0)
      return self._stderr.read()
    return _tagged_json(self._proc.stdout, tag, self._args, stderr)

  def steps(self, n: int) -> list[float]:
    """Times ``n`` single steps in the worker; returns their wall seconds."""
    self._proc.stdin.write(f"run {n}\n")
    self._proc.stdin.flush()
    return self._expect("TIMES ")

  def close(self) -> dict:
    """Ends the worker; returns its final RESULT (peak RSS and the like)."""
    self._proc.stdin.write("quit\n")
    self._proc.stdin.flush()
    result = self._expect("RESULT ")
    self._proc.wait()
    self._stderr.close()
    return result


def serve_steps(info: dict, step: Callable[[], object]) -> None:
  """Worker side of ``StepWorker``: announces ``info``, then times ``step``.

  Args:
    info: JSON-serialisable facts about the worker's model (params, FLOPs).
    step: runs one blocking step.
  """
  import json  # pylint: disable=g-import-not-at-top
  import resource  # pylint: disable=g-import-not-at-top
  print("READY " + json.dumps(info), flush=True)
  for line in sys.stdin:
    cmd = line.split()
    if cmd and cmd[0] == "run":
      print("TIMES " + json.dumps(step_times(step, int(cmd[1]))), flush=True)
    elif cmd and cmd[0] == "quit":
      break
  rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
  print("RESULT " + json.dumps({"rss": rss}), flush=True)


def interleave(workers: Sequence[StepWorker], rounds: int, steps: int,
               pause_s: float = 0.3) -> list[list[list[float]]]:
  """Asks each worker in turn for ``steps`` steps, ``rounds`` times.

  Args:
    workers: live workers.
    rounds: alternations.
    steps: steps per worker per round.
    pause_s: idle time before each request, so that the previous worker's
      thread pools (OpenMP and Eigen spin a while after their last task) are
      asleep before the next one starts.

  Returns:
    ``times[w][r]``: worker ``w``'s step seconds in round ``r``.
  """
  times = [[] for _ in workers]
  for _ in range(rounds):
    for i, w in enumerate(workers):
      time.sleep(pause_s)
      times[i].append(w.steps(steps))
  return times


def run_worker(script: str, args: Sequence[str], env: dict | None = None) -> dict:
  """Runs ``script --worker ...`` in a subprocess; returns its RESULT json.

  Each framework measures in its own process so thread pools and peak RSS
  do not mix.
  """
  import subprocess  # pylint: disable=g-import-not-at-top
  out = subprocess.run([sys.executable, script, *args], capture_output=True,
                       text=True, check=False, env=env)
  return _tagged_json(out.stdout.splitlines(), "RESULT ", args,
                      lambda: out.stderr)


def _tagged_json(lines: Iterable[str], tag: str, args: Sequence[str],
                 stderr: Callable[[], str]):
  """The JSON after ``tag`` on the first line that starts with it.

  Raises RuntimeError with the tail of the worker's stderr if the lines end
  (the worker exited) before such a line.
  """
  import json  # pylint: disable=g-import-not-at-top
  for line in lines:
    if line.startswith(tag):
      return json.loads(line[len(tag):])
  raise RuntimeError(f"worker {list(args)} failed:\n{stderr()[-3000:]}")
