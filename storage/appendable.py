"""A log file that grows by appends, on disk or in a bucket."""

from __future__ import annotations

import os
import time
import uuid

from storage.paths import gcs, is_remote, path

FLUSH_SECONDS = 10.0
"""On Cloud Storage, appended bytes reach the bucket at most this long after they were
appended (and at once on `flush` and `close`): what a kill -9 can lose."""


class AppendableFile:
    """Appends to `target`. A local file is appended to and flushed at every append, as a
    plain file would be. An object cannot be appended to: the bytes are kept, and at most
    every `flush_seconds` uploaded as an object of their own that Cloud Storage composes
    onto the end of the target (a server-side concatenation; nothing is downloaded)."""

    def __init__(self, target: str | os.PathLike, flush_seconds: float = FLUSH_SECONDS):
        self.path = path(target)
        self._remote = is_remote(self.path)
        self._flush_seconds = flush_seconds
        self._pending: list[bytes] = []
        self._flushed_at = time.monotonic()
        self._local = None
        self._exists: bool | None = None  # of the object; asked once, then known

    def append(self, data: bytes) -> None:
        if not self._remote:
            if self._local is None:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self._local = open(self.path, "ab")  # noqa: SIM115 (kept open until close)
            self._local.write(data)
            self._local.flush()
            return
        self._pending.append(data)
        if time.monotonic() - self._flushed_at >= self._flush_seconds:
            self.flush()

    def flush(self) -> None:
        """Everything appended so far into the bucket (a local file is flushed already)."""
        self._flushed_at = time.monotonic()
        if not self._pending:
            return
        data = b"".join(self._pending)
        target, fs = os.fspath(self.path), gcs()
        if self._exists is None:
            self._exists = fs.exists(target)
        if not self._exists:
            fs.pipe_file(target, data)
            self._exists = True
        else:
            part = f"{target}.part-{uuid.uuid4().hex}"
            fs.pipe_file(part, data)
            try:
                fs.merge(target, [target, part])
            finally:
                fs.rm_file(part)
        self._pending = []  # only once in the bucket: a failed upload is tried again

    def close(self) -> None:
        if self._local is not None:
            self._local.close()
            self._local = None
        self.flush()
