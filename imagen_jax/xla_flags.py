"""XLA:CPU flags that imagen_jax sets for speed, before any backend starts.

CPU side only: the flag below changes XLA:CPU's code generation; GPU and
TPU backends do not read it. (Backend choices inside the model live in
``imagen_jax.kernels``; this is the one that must be made in XLA_FLAGS.)

On XLA:CPU (jaxlib >= 0.8.2) convolutions and dots are routed through
YNNPACK library fusions by default. For the U-Net's convolutions, and above
all their weight gradients, those run several times slower than XLA's own
Eigen kernels (benchmarks/unet_speed.py --ynn; RESULTS.md), so we switch
them off. The flag must be set before the first backend is created, hence
at import of the package; an XLA_FLAGS that already mentions it, or
IMAGEN_JAX_KEEP_XLA_FLAGS=1, is left untouched. Older jaxlibs do not know
the flag (and would abort on an unknown one), so it is only added where it
exists.

XLA reads XLA_FLAGS once, when the first backend starts. A session that
started JAX on the CPU before importing imagen_jax (``import jax;
jax.devices()`` in the first notebook cell) keeps the YNNPACK fusions for
its lifetime, and its U-Net training steps run slower (RESULTS.md);
``apply`` warns once in that case.
"""
from __future__ import annotations

import os
import sys
import warnings

_YNN_NAME = "--xla_cpu_experimental_ynn_fusion_type"
_YNN_FLAG = _YNN_NAME + "="  # empty: no YNNPACK fusion kinds
_FIRST_JAXLIB_WITH_FLAG = (0, 8, 2)


def _jaxlib_version() -> tuple[int, ...]:
  try:
    from jaxlib import version  # pylint: disable=g-import-not-at-top
    return tuple(int(p) for p in version.__version__.split(".")[:3])
  except Exception:  # pylint: disable=broad-except
    return (0,)


def _cpu_backend_started() -> bool:
  """Whether JAX already runs on a CPU default backend in this process.

  Never starts a backend itself: without ``jax`` imported, none can have
  started.
  """
  if "jax" not in sys.modules:
    return False
  try:
    import jax  # pylint: disable=g-import-not-at-top
    from jax._src import xla_bridge  # pylint: disable=g-import-not-at-top
    return bool(xla_bridge.backends_are_initialized()
                and jax.default_backend() == "cpu")
  except Exception:  # pylint: disable=broad-except
    return False


def apply() -> None:
  """Adds the CPU speed flags to XLA_FLAGS unless the user opted out.

  Warns (once per process, as warnings do) when JAX's CPU backend already
  started, so that the flags cannot take effect here; subprocesses still
  inherit them.
  """
  if os.environ.get("IMAGEN_JAX_KEEP_XLA_FLAGS"):
    return
  flags = os.environ.get("XLA_FLAGS", "")
  if _YNN_NAME.lstrip("-") in flags:
    return
  if _jaxlib_version() < _FIRST_JAXLIB_WITH_FLAG:
    return
  os.environ["XLA_FLAGS"] = (flags + " " + _YNN_FLAG).strip()
  if _cpu_backend_started():
    warnings.warn(
        "imagen_jax was imported after JAX started on the CPU, so XLA keeps "
        "its YNNPACK fusions (slower U-Net training steps; "
        "benchmarks/RESULTS.md); import "
        "imagen_jax before the first JAX computation, or start Python with "
        f"XLA_FLAGS={_YNN_FLAG}", RuntimeWarning, stacklevel=3)


def without_ynn_setting(flags: str) -> str:
  """``flags`` (an XLA_FLAGS value) less any YNNPACK fusion setting.

  For a child process that must run with XLA's defaults: this process's
  XLA_FLAGS already carries what ``apply`` added at import, and a child
  inherits it even with IMAGEN_JAX_KEEP_XLA_FLAGS set.

  Args:
    flags: space-separated XLA flags.

  Returns:
    The same flags without ``--xla_cpu_experimental_ynn_fusion_type=...``.
  """
  return " ".join(f for f in flags.split()
                  if not f.startswith(_YNN_NAME))


def enable_compilation_cache() -> None:
  """Turns on JAX's persistent compilation cache for command-line runs.

  A restarted or resumed job (and the next demo run) then loads its compiled
  train and sampling steps instead of compiling them again: on a 2-core CPU
  that is most of a short run's start-up. JAX_COMPILATION_CACHE_DIR (a local
  path or a gs:// URL) wins; the default is ~/.cache/imagen_jax/xla.
  """
  import jax  # pylint: disable=g-import-not-at-top
  from imagen_jax import fileio  # pylint: disable=g-import-not-at-top
  path = os.environ.get("JAX_COMPILATION_CACHE_DIR") or os.path.join(
      os.path.expanduser("~"), ".cache", "imagen_jax", "xla")
  # JAX writes a gs:// cache through etils.epath itself; os.makedirs would
  # make a local "gs:" directory under the current one instead.
  if not fileio.is_remote(path):
    try:
      os.makedirs(path, exist_ok=True)
    except OSError:
      return
  jax.config.update("jax_compilation_cache_dir", path)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
