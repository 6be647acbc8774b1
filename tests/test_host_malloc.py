"""Allocator re-execution of the console commands (imagen_jax/host_malloc.py)."""

import os
import subprocess
import sys

import pytest

from imagen_jax import host_malloc
from tests import helpers

LIB = "/usr/lib/libtcmalloc_minimal.so.4"


def test_preload_env_prepends_library_and_sets_loop_guard():
  env = {"LD_PRELOAD": "/opt/other.so", "PATH": "/bin"}
  new = host_malloc.preload_env(env, LIB, already_loaded=False,
                                platform="linux")
  assert new["LD_PRELOAD"] == f"{LIB} /opt/other.so"
  assert new["PATH"] == "/bin"
  assert new["TCMALLOC_RELEASE_RATE"] == "0"
  assert host_malloc.preload_env({"TCMALLOC_RELEASE_RATE": "2"}, LIB, False,
                                 "linux")["TCMALLOC_RELEASE_RATE"] == "2"
  assert env == {"LD_PRELOAD": "/opt/other.so", "PATH": "/bin"}  # untouched
  # The re-executed process must not re-execute again.
  assert host_malloc.preload_env(new, LIB, False, "linux") is None
  assert host_malloc.preload_env({}, LIB, False, "linux")["LD_PRELOAD"] == LIB


@pytest.mark.parametrize("env,library,loaded,platform", [
    ({"IMAGEN_JAX_MALLOC": "system"}, LIB, False, "linux"),   # opted out
    ({"IMAGEN_JAX_MALLOC": " System "}, LIB, False, "linux"),
    ({}, LIB, True, "linux"),                                 # already in
    ({}, None, False, "linux"),                 # not installed, no THP
    ({"IMAGEN_JAX_MALLOC": "glibc-thp"}, LIB, True, "linux"),  # TCMalloc in
    ({}, LIB, False, "darwin"),                               # not Linux
])
def test_preload_env_does_nothing(env, library, loaded, platform):
  assert host_malloc.preload_env(env, library, loaded, platform) is None


def test_preload_env_empty_choice_is_default_and_bad_choice_is_one_line():
  assert host_malloc.preload_env({"IMAGEN_JAX_MALLOC": ""}, LIB, False,
                                 "linux") is not None
  with pytest.raises(ValueError, match=r"IMAGEN_JAX_MALLOC='jemalloc' .*"
                     r"tcmalloc, glibc-thp, system"):
    host_malloc.preload_env({"IMAGEN_JAX_MALLOC": "jemalloc"}, LIB, False,
                            "linux")


def test_loaded_allocator_reads_maps():
  maps = ("7f00-7f01 r-xp 0 08:01 1 /usr/lib/x86_64-linux-gnu/"
          "libtcmalloc_minimal.so.4.5.10\n7f02-7f03 r-xp 0 08:01 2 "
          "/usr/lib/x86_64-linux-gnu/libc.so.6\n")
  thp = {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}
  assert host_malloc.loaded_allocator(maps, {}) == "tcmalloc"
  assert host_malloc.loaded_allocator(maps, thp) == "tcmalloc"
  assert host_malloc.loaded_allocator(maps.split("\n", 1)[1], {}) == "system"
  assert host_malloc.loaded_allocator(maps.split("\n", 1)[1], thp) == "glibc-thp"
  # Only a setting that turns the tunable on counts.
  off = {"GLIBC_TUNABLES": "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=0"}
  assert host_malloc.loaded_allocator(maps.split("\n", 1)[1], off) == "system"


def test_without_tcmalloc_glibc_gets_huge_pages():
  env = {"GLIBC_TUNABLES": "glibc.malloc.arena_max=4", "PATH": "/bin"}
  new = host_malloc.preload_env(env, None, False, "linux", thp_supported=True)
  assert new["GLIBC_TUNABLES"] == ("glibc.malloc.arena_max=4:"
                                   "glibc.malloc.hugetlb=1")
  assert "LD_PRELOAD" not in new and new["PATH"] == "/bin"
  assert host_malloc.preload_env(new, None, False, "linux", True) is None
  # TCMalloc wins where installed, unless glibc-thp is asked for.
  assert "GLIBC_TUNABLES" not in host_malloc.preload_env({}, LIB, False,
                                                         "linux", True)
  new = host_malloc.preload_env({"IMAGEN_JAX_MALLOC": "glibc-thp"}, LIB,
                                False, "linux", True)
  assert new["GLIBC_TUNABLES"] == "glibc.malloc.hugetlb=1"
  assert "LD_PRELOAD" not in new
  # A tunable the user set is left as it is; no THP, nothing to gain.
  assert host_malloc.preload_env({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"},
                                 None, False, "linux", True) is None
  assert host_malloc.preload_env({}, None, False, "linux", False) is None


@pytest.mark.parametrize("mode,libc,expected", [
    ("always [madvise] never\n", ("glibc", "2.36"), True),
    ("[always] madvise never\n", ("glibc", "2.39"), True),
    ("always madvise [never]\n", ("glibc", "2.36"), False),
    ("always [madvise] never\n", ("glibc", "2.31"), False),  # no tunable
    ("always [madvise] never\n", ("", ""), False),            # musl
])
def test_glibc_thp_supported(mode, libc, expected):
  assert host_malloc.glibc_thp_supported(mode, libc) is expected


# A child that re-executes itself, then reports its allocator, its PID and the
# fewest page faults in four runs (after two warm-ups) of an XLA:CPU program whose temporary buffer
# (x @ x.T, 144 MB) is larger than anything glibc keeps mapped after free.
_CHILD = """
import os, resource, sys
from imagen_jax import host_malloc
host_malloc.maybe_reexec()
import jax, jax.numpy as jnp
f = jax.jit(lambda x: (x @ x.T).sum(axis=1) * 2 + (x @ x.T).max(axis=0))
x = jnp.ones((6000, 16), jnp.float32)
for _ in range(2):
  jax.block_until_ready(f(x))
faults = []
for _ in range(4):
  before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  jax.block_until_ready(f(x))
  faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
faults = min(faults)  # steady state: a run may overlap the last one's free
print("CHILD", host_malloc.loaded_allocator(), os.getpid(), faults)
"""


def _run_child(choice):
  env = dict(os.environ, IMAGEN_JAX_MALLOC=choice)
  for name in ("IMAGEN_JAX_MALLOC_REEXEC", "TCMALLOC_RELEASE_RATE",
               "GLIBC_TUNABLES"):
    env.pop(name, None)
  proc = subprocess.Popen([sys.executable, "-c", _CHILD], cwd=helpers.ROOT,
                          env=env, stdout=subprocess.PIPE, text=True)
  out, _ = proc.communicate(timeout=300)
  assert proc.returncode == 0
  line = [ln for ln in out.splitlines() if ln.startswith("CHILD")][-1]
  _, allocator, pid, faults = line.split()
  return allocator, int(pid), int(faults), proc.pid


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux only")
def test_reexec_keeps_pid_and_stops_the_per_run_page_faults():
  allocator, pid, faults_system, popen_pid = _run_child("system")
  assert allocator == "system" and pid == popen_pid
  # glibc unmaps the temporary buffer after every run: ~35k 4 KiB faults.
  assert faults_system > 10_000, faults_system
  if host_malloc.glibc_thp_supported():
    allocator, pid, faults_thp, popen_pid = _run_child("glibc-thp")
    assert allocator == "glibc-thp" and pid == popen_pid
    # The buffer still comes and goes, in 2 MiB pages instead of 4 KiB.
    assert faults_thp < faults_system // 10, (faults_thp, faults_system)
  if host_malloc.find_tcmalloc() is None:
    pytest.skip("TCMalloc is not installed (apt-get install "
                "libtcmalloc-minimal4); the glibc half ran")
  allocator, pid, faults_tc, popen_pid = _run_child("tcmalloc")
  assert allocator == "tcmalloc"
  assert pid == popen_pid  # exec, not a child: signals still reach the job
  assert faults_tc < faults_system // 10, (faults_tc, faults_system)
