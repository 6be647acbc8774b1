"""Test setup: 8 virtual CPU devices, so sharding runs without accelerators."""

import os

# Must be set before jax initialises its backends. LLVM's -O0 halves XLA:CPU
# compile times, which dominate a suite of tiny models; kernels (convs, dots)
# are library calls either way, and results are the same math.
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
  _flags += " --xla_force_host_platform_device_count=8"
if "xla_backend_optimization_level" not in _flags:
  _flags += " --xla_backend_optimization_level=0"
os.environ["XLA_FLAGS"] = _flags.strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
# The tests compare float32 numerics (remat vs not, fused vs reference) at
# float32 tolerances. On NVIDIA GPUs XLA's default float32 dot/conv runs on
# TF32 tensor cores (~1e-3 relative): ask for full float32 there. A no-op on
# CPU, whose float32 products are always full precision.
os.environ.setdefault("JAX_DEFAULT_MATMUL_PRECISION", "highest")

# One persistent compilation cache for the whole session: subprocess tests
# (CLI, kill/resume, multi-process) then reuse what other tests compiled.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      os.path.join("/tmp", f"imagen_jax_test_xla_{os.getuid()}"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

import jax  # noqa: E402

jax.config.update("jax_compilation_cache_dir",
                  os.environ["JAX_COMPILATION_CACHE_DIR"])
jax.config.update("jax_persistent_cache_min_compile_time_secs",
                  float(os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"]))
