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

