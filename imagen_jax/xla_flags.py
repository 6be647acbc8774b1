"""XLA flags that imagen_jax sets for speed, before any backend starts.

On XLA:CPU (jaxlib >= 0.8.2) convolutions and dots are routed through
YNNPACK library fusions by default. For the U-Net's convolutions, and above
all their weight gradients, those run 2-5x slower than XLA's own Eigen
kernels (benchmarks/unet_speed.py; RESULTS.md), so we switch them off. The
flag must be set before the first backend is created, hence at import of the
package; an XLA_FLAGS that already mentions it, or IMAGEN_JAX_KEEP_XLA_FLAGS=1,
is left untouched. Older jaxlibs do not know the flag (and would abort on an
unknown one), so it is only added where it exists.
"""

from __future__ import annotations

import os

_YNN_FLAG = "--xla_cpu_experimental_ynn_fusion_type="
_FIRST_JAXLIB_WITH_FLAG = (0, 8, 2)


def _jaxlib_version() -> tuple[int, ...]:
  try:
    from jaxlib import version  # pylint: disable=g-import-not-at-top
    return tuple(int(p) for p in version.__version__.split(".")[:3])
  except Exception:  # pylint: disable=broad-except
    return (0,)


def apply() -> None:
  """Adds the CPU speed flags to XLA_FLAGS unless the user opted out."""
  if os.environ.get("IMAGEN_JAX_KEEP_XLA_FLAGS"):
    return
  flags = os.environ.get("XLA_FLAGS", "")
  if "xla_cpu_experimental_ynn_fusion_type" in flags:
    return
  if _jaxlib_version() < _FIRST_JAXLIB_WITH_FLAG:
    return
  os.environ["XLA_FLAGS"] = (flags + " " + _YNN_FLAG).strip()


def enable_compilation_cache() -> None:
  """Turns on JAX's persistent compilation cache for command-line runs.

  A restarted or resumed job (and the next demo run) then loads its compiled
  train and sampling steps instead of compiling them again: on a 2-core CPU
  that is most of a short run's start-up. JAX_COMPILATION_CACHE_DIR wins; the
  default is ~/.cache/imagen_jax/xla.
  """
  import jax  # pylint: disable=g-import-not-at-top
  path = os.environ.get("JAX_COMPILATION_CACHE_DIR") or os.path.join(
      os.path.expanduser("~"), ".cache", "imagen_jax", "xla")
  try:
    os.makedirs(path, exist_ok=True)
  except OSError:
    return
  jax.config.update("jax_compilation_cache_dir", path)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
