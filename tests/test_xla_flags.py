"""imagen_jax.xla_flags: the CPU speed flag, its opt-outs and the late-import warning."""

import os
import subprocess
import sys
import warnings

import jax
import pytest

from imagen_jax import xla_flags

FLAG = "--xla_cpu_experimental_ynn_fusion_type="


@pytest.fixture
def no_backend(monkeypatch):
  monkeypatch.setattr(xla_flags, "_cpu_backend_started", lambda: False)


def test_apply_appends_flag_to_user_flags(monkeypatch, no_backend):
  monkeypatch.delenv("IMAGEN_JAX_KEEP_XLA_FLAGS", raising=False)
  monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=2")
  xla_flags.apply()
  assert os.environ["XLA_FLAGS"] == (
      "--xla_force_host_platform_device_count=2 " + FLAG)


@pytest.mark.parametrize("env", [
    {"XLA_FLAGS": "--xla_cpu_experimental_ynn_fusion_type=x"},
    {"XLA_FLAGS": "--foo", "IMAGEN_JAX_KEEP_XLA_FLAGS": "1"},
])
def test_user_choice_is_left_alone_without_warning(monkeypatch, env):
  monkeypatch.delenv("IMAGEN_JAX_KEEP_XLA_FLAGS", raising=False)
  for k, v in env.items():
    monkeypatch.setenv(k, v)
  # Even with a started backend: the user chose, nothing to warn about.
  monkeypatch.setattr(xla_flags, "_cpu_backend_started", lambda: True)
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    xla_flags.apply()
  assert os.environ["XLA_FLAGS"] == env["XLA_FLAGS"]


def test_apply_warns_when_cpu_backend_already_started(monkeypatch):
  monkeypatch.delenv("IMAGEN_JAX_KEEP_XLA_FLAGS", raising=False)
  monkeypatch.setenv("XLA_FLAGS", "")
  monkeypatch.setattr(xla_flags, "_cpu_backend_started", lambda: True)
  with pytest.warns(RuntimeWarning, match="import imagen_jax before"):
    xla_flags.apply()
  assert os.environ["XLA_FLAGS"] == FLAG


def test_cpu_backend_started_reads_jax_state():
  # The suite runs on CPU (conftest) and this touches the backend, so the
  # private JAX API the check uses must report it: a JAX upgrade that drops
  # it fails here instead of silently never warning.
  jax.numpy.zeros(1).block_until_ready()
  assert xla_flags._cpu_backend_started()  # pylint: disable=protected-access


def _import_order(code: str) -> subprocess.CompletedProcess:
  env = {k: v for k, v in os.environ.items()
         if k not in ("XLA_FLAGS", "IMAGEN_JAX_KEEP_XLA_FLAGS")}
  env["JAX_PLATFORMS"] = "cpu"
  return subprocess.run([sys.executable, "-c", code], capture_output=True,
                        text=True, env=env, timeout=120, check=True)


def test_late_import_warns_and_early_import_does_not():
  late = _import_order("import jax; jax.numpy.zeros(1).block_until_ready(); "
                       "import imagen_jax")
  assert "import imagen_jax before the first JAX computation" in late.stderr
  early = _import_order(
      "import os, imagen_jax, jax; jax.numpy.zeros(1).block_until_ready(); "
      "print(os.environ['XLA_FLAGS'])")
  assert "RuntimeWarning" not in early.stderr
  assert early.stdout.split() == [FLAG]


def test_without_ynn_setting_keeps_other_flags():
  flags = f"--xla_force_host_platform_device_count=8 {FLAG} --foo=1"
  assert xla_flags.without_ynn_setting(flags) == (
      "--xla_force_host_platform_device_count=8 --foo=1")
  assert xla_flags.without_ynn_setting(
      "--xla_cpu_experimental_ynn_fusion_type=LIBRARY_FUSION_TYPE_X") == ""
  assert xla_flags.without_ynn_setting("") == ""
