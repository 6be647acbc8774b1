"""Runs command-line jobs under TCMalloc, where it is installed (CPU side).

Why: XLA:CPU allocates one temporary buffer per executable run (hundreds of
MB for a CPU-scale U-Net training step). glibc's malloc serves any block
over 32 MB (64 MB in a thread's arena) with a fresh ``mmap`` and returns it
with ``munmap`` on free, so every step page-faults and zeroes the whole
buffer again. No glibc setting avoids it (threads' arenas fall back to
``mmap`` whatever ``M_MMAP_MAX`` says, and ``MALLOC_ARENA_MAX=1`` makes the
step slower from lock contention). TCMalloc keeps freed spans mapped and
hands them back, so the faults go to zero and CPU training steps run faster
(benchmarks/RESULTS.md has the measurements). On GPU and TPU the step's
buffers live in device memory and this only changes the host allocator of
the Python process, which the accelerator step does not wait on.

A preload must be in place when the process starts, so the console entry
points call ``maybe_reexec()`` first: it re-executes the same command line
(same PID, so signals and launchers are unaffected) with TCMalloc in
``LD_PRELOAD``. It does nothing when TCMalloc is already loaded or cannot be
found (Debian/Ubuntu: ``apt-get install libtcmalloc-minimal4``), off Linux,
or with ``IMAGEN_JAX_MALLOC=system``.
"""
from __future__ import annotations

import ctypes.util
import os
import sys
from typing import Mapping, Optional, Sequence

ENV_CHOICE = "IMAGEN_JAX_MALLOC"     # "tcmalloc" (default) or "system"
_ENV_DONE = "IMAGEN_JAX_MALLOC_REEXEC"  # set on the re-executed process
_LIB_NAMES = ("tcmalloc_minimal", "tcmalloc")
_LIB_DIRS = ("/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu",
             "/usr/lib64", "/usr/lib", "/usr/local/lib")
_SONAMES = ("libtcmalloc_minimal.so.4", "libtcmalloc.so.4",
            "libtcmalloc_minimal.so", "libtcmalloc.so")


def find_tcmalloc() -> Optional[str]:
  """Path (or soname the loader resolves) of an installed TCMalloc, or None."""
  for directory in _LIB_DIRS:
    for soname in _SONAMES:
      path = os.path.join(directory, soname)
      if os.path.exists(path):
        return path
  for name in _LIB_NAMES:
    found = ctypes.util.find_library(name)
    if found:
      return found
  return None


def loaded_allocator(maps_text: Optional[str] = None) -> str:
  """``"tcmalloc"`` if TCMalloc is mapped into this process, else ``"system"``.

  Args:
    maps_text: contents of ``/proc/self/maps`` (read when None).

  Returns:
    The allocator name.
  """
  if maps_text is None:
    try:
      with open("/proc/self/maps") as f:
        maps_text = f.read()
    except OSError:
      return "system"
  return "tcmalloc" if "libtcmalloc" in maps_text else "system"


def preload_env(env: Mapping[str, str], library: Optional[str],
                already_loaded: bool, platform: str = sys.platform
                ) -> Optional[dict]:
  """The environment to re-execute with, or None to carry on as is.

  Args:
    env: the current environment.
    library: TCMalloc's path (``find_tcmalloc()``) or None.
    already_loaded: whether TCMalloc is in this process already.
    platform: ``sys.platform``.

  Returns:
    A copy of ``env`` with ``library`` first in ``LD_PRELOAD``, TCMalloc's
    release rate 0 (unless set) and the loop guard set; None when nothing is
    to be done.
  """
  choice = (env.get(ENV_CHOICE) or "tcmalloc").strip().lower()
  if choice not in ("tcmalloc", "system"):
    raise ValueError(f"{ENV_CHOICE}={env[ENV_CHOICE]!r} is not an allocator; "
                     "set it to tcmalloc or system.")
  if (choice == "system" or already_loaded or library is None
      or not platform.startswith("linux") or env.get(_ENV_DONE)):
    return None
  new = dict(env)
  rest = env.get("LD_PRELOAD", "").strip()
  new["LD_PRELOAD"] = f"{library} {rest}".strip()
  # TCMalloc otherwise hands freed spans back to the kernel now and then
  # (madvise), and the next run faults them in again: keep them.
  new.setdefault("TCMALLOC_RELEASE_RATE", "0")
  new[_ENV_DONE] = "1"
  return new


def maybe_reexec(argv: Optional[Sequence[str]] = None) -> None:
  """Re-executes this command under TCMalloc if it is found and not loaded.

  Call it first thing in a console entry point, before any JAX computation
  (the process image is replaced; nothing done before survives).

  Args:
    argv: the command line to run again; ``sys.orig_argv`` (interpreter,
      its options, ``-m module`` or the script, and the arguments) if None.
  """
  new_env = preload_env(os.environ, find_tcmalloc(),
                        loaded_allocator() == "tcmalloc")
  if new_env is None:
    return
  argv = list(argv if argv is not None else sys.orig_argv)
  sys.stdout.flush()
  sys.stderr.flush()
  try:
    os.execve(sys.executable, argv, new_env)
  except OSError:
    return  # could not re-execute: run on with the system allocator
