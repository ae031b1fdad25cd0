"""A proxy on 127.0.0.1 in front of the GCS-protocol server that misbehaves on purpose.

It forwards every request to the server, after `delay_s` seconds, and answers a seeded
`fail_fraction` of them with 503 instead (before forwarding, so the server never sees a
failed request). The clients must retry the 503s and ride out the delays. Point a
subprocess at it with `gcs_server.emulator_env(proxy.url)`.
"""

from __future__ import annotations

import http.client
import random
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

# Hop-by-hop headers are the proxy's own business; the body is re-sent with a length.
_NOT_FORWARDED = {"connection", "keep-alive", "transfer-encoding", "proxy-connection", "te",
                  "trailer", "upgrade", "content-length"}


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address) -> None:
        pass  # a client that hung up (it exited, or gave up on a delayed reply)


class FaultyProxy:
    def __init__(self, upstream: str, fail_fraction: float = 0.0, delay_s: float = 0.0,
                 seed: int = 0):
        self.upstream = urlsplit(upstream)
        self.fail_fraction = fail_fraction
        self.delay_s = delay_s
        self.requests = 0
        self.failed = 0
        self._random = random.Random(seed)
        self._lock = threading.Lock()
        self._server = _Server(("127.0.0.1", 0), self._handler())
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> FaultyProxy:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()

    def _fails(self) -> bool:
        with self._lock:
            self.requests += 1
            fails = self._random.random() < self.fail_fraction
            self.failed += fails
            return fails

    def _handler(self):
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:
                pass

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    chunks = []
                    while size := int(self.rfile.readline().split(b";")[0], 16):
                        chunks.append(self.rfile.read(size))
                        self.rfile.readline()
                    self.rfile.readline()
                    return b"".join(chunks)
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _forward(self) -> None:
                body = self._body()
                if proxy.delay_s:
                    time.sleep(proxy.delay_s)
                if proxy._fails():
                    self._reply(503, [("Content-Type", "application/json")],
                                b'{"error": {"code": 503, "message": "injected by the proxy"}}')
                    return
                upstream = http.client.HTTPConnection(proxy.upstream.hostname,
                                                      proxy.upstream.port, timeout=60)
                try:
                    headers = {k: v for k, v in self.headers.items()
                               if k.lower() not in _NOT_FORWARDED}
                    upstream.request(self.command, self.path, body=body, headers=headers)
                    response = upstream.getresponse()
                    data = response.read()
                    # Links to the server itself (a resumable upload's Location) go through
                    # the proxy too.
                    own = f"{proxy.upstream.scheme}://{proxy.upstream.netloc}"
                    headers = [(k, v.replace(own, proxy.url)) for k, v in response.getheaders()
                               if k.lower() not in _NOT_FORWARDED]
                    self._reply(response.status, headers, data)
                finally:
                    upstream.close()

            def _reply(self, status: int, headers: list[tuple[str, str]], data: bytes) -> None:
                self.send_response(status)
                for key, value in headers:
                    self.send_header(key, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = _forward

        return Handler
