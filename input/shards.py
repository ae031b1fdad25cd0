"""The on-disk layout of a prepared dataset, shared by the writer and the reader."""

from __future__ import annotations

import pathlib
import zlib

import google_crc32c

MANIFEST = "manifest.json"
FORMAT = "io-first-lm/token-shards/v1"


def shard_file(root: pathlib.Path, name: str, kind: str) -> pathlib.Path:
    """`kind` is "tokens" (token ids) or "docs" (document end offsets); `root` may also be
    a `storage.Path` in a bucket."""
    return root / f"{name}.{kind}.npy"


def file_crc32(path: pathlib.Path) -> int:
    crc = 0
    with path.open("rb") as f:
        while chunk := f.read(1 << 22):
            crc = zlib.crc32(chunk, crc)
    return crc


def checksums(data: bytes) -> tuple[int, int]:
    """(CRC32, CRC32C) of a shard file's bytes. The CRC32C is the one Cloud Storage keeps for
    each object, so a shard in a bucket is checked with a metadata request, not a download."""
    return zlib.crc32(data), google_crc32c.value(data)
