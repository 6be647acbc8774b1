"""Runs command-line jobs under a host allocator that keeps big blocks (CPU side).

Why: XLA:CPU allocates one temporary buffer per executable run (hundreds of
MB for a CPU-scale U-Net training step). glibc's malloc serves any block
over 32 MB (64 MB in a thread's arena) with a fresh ``mmap`` and returns it
with ``munmap`` on free, so every step page-faults and zeroes the whole
buffer again in 4 KiB pages. No glibc setting keeps such blocks (threads'
arenas fall back to ``mmap`` whatever ``M_MMAP_MAX`` says, and
``MALLOC_ARENA_MAX=1`` makes the step slower from lock contention).
TCMalloc keeps freed spans mapped and hands them back, so the faults go to
zero and CPU training steps run faster. Where TCMalloc is not installed,
glibc's ``glibc.malloc.hugetlb=1`` tunable (glibc >= 2.35) asks for
transparent huge pages on malloc's mappings: the buffer still comes and
goes every run, but in 2 MiB pages, 512 times fewer faults; the demo's
base step then lands near TCMalloc's (benchmarks/RESULTS.md has the
measurements, TCMalloc still the steadier). On GPU and
TPU the step's buffers live in device memory and this only changes the host
allocator of the Python process, which the accelerator step does not wait
on.

Both must be in place when the process starts, so the console entry points
call ``maybe_reexec()`` first: it re-executes the same command line (same
PID, so signals and launchers are unaffected) with TCMalloc in
``LD_PRELOAD`` or, without TCMalloc, with the tunable in ``GLIBC_TUNABLES``.
``IMAGEN_JAX_MALLOC`` chooses: ``tcmalloc`` (default: TCMalloc, else glibc
with huge pages), ``glibc-thp`` (glibc with huge pages even where TCMalloc
is installed) or ``system`` (leave the process as started). Nothing is done
off Linux, when the choice is already in effect, or when transparent huge
pages are off (``never``) and TCMalloc is absent. TCMalloc on Debian/Ubuntu:
``apt-get install libtcmalloc-minimal4``.
"""
from __future__ import annotations

import ctypes.util
import os
import platform as platform_lib
import sys
from typing import Mapping, Optional, Sequence

ENV_CHOICE = "IMAGEN_JAX_MALLOC"
CHOICES = ("tcmalloc", "glibc-thp", "system")  # the first is the default
_ENV_DONE = "IMAGEN_JAX_MALLOC_REEXEC"  # set on the re-executed process
_LIB_NAMES = ("tcmalloc_minimal", "tcmalloc")
_LIB_DIRS = ("/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu",
             "/usr/lib64", "/usr/lib", "/usr/local/lib")
_SONAMES = ("libtcmalloc_minimal.so.4", "libtcmalloc.so.4",
            "libtcmalloc_minimal.so", "libtcmalloc.so")
_HUGETLB = "glibc.malloc.hugetlb"   # glibc >= 2.35; 1 = THP via madvise
_THP_MODE = "/sys/kernel/mm/transparent_hugepage/enabled"


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


def glibc_thp_supported(thp_mode_text: Optional[str] = None,
                        libc: Optional[tuple[str, str]] = None) -> bool:
  """Whether glibc's huge-page tunable would take effect in a new process.

  Args:
    thp_mode_text: contents of the kernel's transparent-huge-page mode file
      (read when None), e.g. ``"always [madvise] never"``.
    libc: ``platform.libc_ver()`` (read when None).

  Returns:
    True for glibc >= 2.35 with transparent huge pages in ``always`` or
    ``madvise`` mode.
  """
  name, version = libc if libc is not None else platform_lib.libc_ver()
  try:
    major, minor = (int(v) for v in version.split(".")[:2])
  except ValueError:
    return False
  if name != "glibc" or (major, minor) < (2, 35):
    return False
  if thp_mode_text is None:
    try:
      with open(_THP_MODE) as f:
        thp_mode_text = f.read()
    except OSError:
      return False
  return "[always]" in thp_mode_text or "[madvise]" in thp_mode_text


def _hugetlb_setting(env: Mapping[str, str]) -> Optional[str]:
  """The value ``GLIBC_TUNABLES`` gives the huge-page tunable, or None."""
  for item in env.get("GLIBC_TUNABLES", "").split(":"):
    name, _, value = item.partition("=")
    if name.strip() == _HUGETLB:
      return value.strip()
  return None


def loaded_allocator(maps_text: Optional[str] = None,
                     env: Optional[Mapping[str, str]] = None) -> str:
  """The host allocator this process runs with.

  Args:
    maps_text: contents of ``/proc/self/maps`` (read when None).
    env: the environment the process started with (``os.environ`` if None).

  Returns:
    ``"tcmalloc"`` if TCMalloc is mapped into this process, ``"glibc-thp"``
    for glibc with its huge-page tunable set, else ``"system"``.
  """
  if maps_text is None:
    try:
      with open("/proc/self/maps") as f:
        maps_text = f.read()
    except OSError:
      maps_text = ""
  if "libtcmalloc" in maps_text:
    return "tcmalloc"
  setting = _hugetlb_setting(os.environ if env is None else env)
  return "glibc-thp" if setting not in (None, "", "0") else "system"


def preload_env(env: Mapping[str, str], library: Optional[str],
                already_loaded: bool, platform: str = sys.platform,
                thp_supported: bool = False) -> Optional[dict]:
  """The environment to re-execute with, or None to carry on as is.

  Args:
    env: the current environment.
    library: TCMalloc's path (``find_tcmalloc()``) or None.
    already_loaded: whether TCMalloc is in this process already.
    platform: ``sys.platform``.
    thp_supported: ``glibc_thp_supported()``.

  Returns:
    A copy of ``env`` with, for the ``tcmalloc`` choice and a ``library``,
    ``library`` first in ``LD_PRELOAD`` and TCMalloc's release rate 0
    (unless set); otherwise, where ``thp_supported``, glibc's huge-page
    tunable added to ``GLIBC_TUNABLES``; and the loop guard set. None when
    nothing is to be done.
  """
  choice = (env.get(ENV_CHOICE) or CHOICES[0]).strip().lower()
  if choice not in CHOICES:
    raise ValueError(f"{ENV_CHOICE}={env[ENV_CHOICE]!r} is not an allocator; "
                     f"set it to one of {', '.join(CHOICES)}.")
  if (choice == "system" or already_loaded
      or not platform.startswith("linux") or env.get(_ENV_DONE)):
    return None
  new = dict(env)
  if choice == "tcmalloc" and library is not None:
    rest = env.get("LD_PRELOAD", "").strip()
    new["LD_PRELOAD"] = f"{library} {rest}".strip()
    # TCMalloc otherwise hands freed spans back to the kernel now and then
    # (madvise), and the next run faults them in again: keep them.
    new.setdefault("TCMALLOC_RELEASE_RATE", "0")
  elif thp_supported and _hugetlb_setting(env) is None:
    rest = env.get("GLIBC_TUNABLES", "").strip(":")
    new["GLIBC_TUNABLES"] = ":".join(filter(None, (rest, f"{_HUGETLB}=1")))
  else:
    return None
  new[_ENV_DONE] = "1"
  return new


def maybe_reexec(argv: Optional[Sequence[str]] = None) -> None:
  """Re-executes this command under the chosen allocator (see the module doc).

  Call it first thing in a console entry point, before any JAX computation
  (the process image is replaced; nothing done before survives).

  Args:
    argv: the command line to run again; ``sys.orig_argv`` (interpreter,
      its options, ``-m module`` or the script, and the arguments) if None.
  """
  new_env = preload_env(os.environ, find_tcmalloc(),
                        loaded_allocator() == "tcmalloc",
                        thp_supported=glibc_thp_supported())
  if new_env is None:
    return
  argv = list(argv if argv is not None else sys.orig_argv)
  sys.stdout.flush()
  sys.stderr.flush()
  try:
    os.execve(sys.executable, argv, new_env)
  except OSError:
    return  # could not re-execute: run on as started
