"""Read a dataset written by `python -m input.prepare`: checked token shards, memory-mapped on
disk and read by ranged requests from Cloud Storage.

A shard in a bucket is not downloaded whole nor kept on local disk: rows are read with
ranged GETs of aligned blocks (`BLOCK_BYTES`), and the blocks read last are kept in a
per-process LRU of bounded memory (`CACHE_BYTES`). Why ranges rather than a local cache of
whole shards: the first step starts after one listing and one header read per shard, not
after downloading gigabytes; no disk quota or eviction across worker processes to manage;
and Grain's read threads (and worker processes, each re-opening the shards it reads) run
requests concurrently, so the prefetch buffer hides each request's latency. Blocks, not
rows, so neighbouring rows and the one-token overlap between rows share a request, and a
dataset that fits in the LRU is read from the bucket once per process. Past the LRU, a
shuffled row is mostly a request of its own (one round trip per row per read thread), so a
step needs data.read_threads >= rows per step x request latency / step time.
"""

from __future__ import annotations

import ast
import collections
import json
import os
import pathlib
import threading
from typing import Any

import numpy as np

import storage
from input.corpus import DataError
from input.shards import FORMAT, MANIFEST, file_crc32, shard_file
from input.tokenizer import Tokenizer
from storage.paths import StoredObject, read_range

BLOCK_BYTES = 1 << 16
"""Bytes per ranged request: one round trip brings 32K uint16 tokens, ~127 tiny rows."""
CACHE_BYTES = 256 << 20
"""Blocks kept per process (every remote shard together), least recently used evicted."""
HEADER_BYTES = 4096
"""Bytes read to parse a .npy header (numpy's own writer pads it to 64 or 128 bytes)."""


def is_prepared(path: str) -> bool:
    return bool(path) and storage.path(path).joinpath(MANIFEST).is_file()


class _BlockCache:
    """Blocks of remote shards by (url, block number), thread-safe, bounded in bytes."""

    def __init__(self, capacity: int):
        self.capacity, self.size = capacity, 0
        self.blocks: collections.OrderedDict[tuple[str, int], bytes] = collections.OrderedDict()
        self.lock = threading.Lock()

    def get(self, key: tuple[str, int]) -> bytes | None:
        with self.lock:
            block = self.blocks.get(key)
            if block is not None:
                self.blocks.move_to_end(key)
            return block

    def put(self, key: tuple[str, int], block: bytes) -> None:
        with self.lock:
            if key in self.blocks:
                return
            self.blocks[key] = block
            self.size += len(block)
            while self.size > self.capacity and len(self.blocks) > 1:
                self.size -= len(self.blocks.popitem(last=False)[1])


_CACHE = _BlockCache(CACHE_BYTES)


class RemoteShard:
    """A 1-D .npy array in a bucket, sliced like an array: each slice reads the blocks it
    covers (ranged requests; two threads may fetch the same block once each, harmlessly).

    Pickles as (url, dtype, offset, length): a Grain worker process reads its own ranges.
    """

    def __init__(self, url: str, dtype: np.dtype, data_offset: int, length: int):
        self.url, self.dtype = url, np.dtype(dtype)
        self.data_offset, self.length = data_offset, length

    def __reduce__(self):
        return RemoteShard, (self.url, self.dtype.str, self.data_offset, self.length)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: slice) -> np.ndarray:
        start, stop, _ = index.indices(self.length)
        if stop <= start:
            return np.zeros(0, self.dtype)
        first = self.data_offset + start * self.dtype.itemsize
        last = self.data_offset + stop * self.dtype.itemsize
        numbers = range(first // BLOCK_BYTES, (last - 1) // BLOCK_BYTES + 1)
        blocks = [self._block(number) for number in numbers]
        skip = first - (first // BLOCK_BYTES) * BLOCK_BYTES
        data = b"".join(blocks)[skip:skip + last - first]
        return np.frombuffer(data, self.dtype)

    def _block(self, number: int) -> bytes:
        key = (self.url, number)
        block = _CACHE.get(key)
        if block is None:
            start = number * BLOCK_BYTES
            block = read_range(self.url, start, start + BLOCK_BYTES)
            _CACHE.put(key, block)
        return block


class TokenStream:
    """Several token arrays read as one: `len()` and slicing, across shard boundaries.

    Built from shard files it pickles as their paths (remote shards as their URLs and
    header facts), so Grain worker processes read the files themselves instead of
    receiving a copy of the data.
    """

    def __init__(self, shards: list[Any], paths: list[pathlib.Path] | None = None):
        self.paths = paths
        self.shards = [s for s in shards if len(s)]
        self.offsets = np.cumsum([0] + [len(s) for s in self.shards])

    @classmethod
    def from_files(cls, paths: list[pathlib.Path]) -> TokenStream:
        return cls([np.load(p, mmap_mode="r") for p in paths], paths)

    def __reduce__(self):
        if self.paths is None or self.remote:
            return TokenStream, (self.shards,)
        return TokenStream.from_files, (self.paths,)

    @property
    def remote(self) -> bool:
        """Whether slices are requests to a bucket (round trips) rather than memory reads."""
        return any(isinstance(s, RemoteShard) for s in self.shards)

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def __getitem__(self, index: slice) -> np.ndarray:
        start, stop, step = index.indices(len(self))
        if step != 1:
            raise ValueError("TokenStream supports contiguous slices only")
        parts = []
        shard = int(np.searchsorted(self.offsets, start, side="right")) - 1
        while start < stop and shard < len(self.shards):
            lo = start - int(self.offsets[shard])
            hi = min(stop, int(self.offsets[shard + 1])) - int(self.offsets[shard])
            parts.append(np.asarray(self.shards[shard][lo:hi], dtype=np.int32))
            start += hi - lo
            shard += 1
        return np.concatenate(parts) if parts else np.zeros(0, np.int32)


class StreamWindow:
    """Tokens [start, stop) of a stream, itself sliceable like a stream."""

    def __init__(self, stream: Any, start: int, stop: int):
        self.stream, self.start, self.stop = stream, start, stop

    @property
    def remote(self) -> bool:
        return getattr(self.stream, "remote", False)

    def __len__(self) -> int:
        return self.stop - self.start

    def __getitem__(self, index: slice) -> np.ndarray:
        start, stop, _ = index.indices(len(self))
        return self.stream[self.start + start:self.start + stop]


def load_manifest(path: str | os.PathLike) -> dict[str, Any]:
    manifest_path = storage.path(path) / MANIFEST
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise DataError(f"{manifest_path}: cannot read the manifest ({e})") from e
    if manifest.get("format") != FORMAT:
        raise DataError(f"{manifest_path}: format {manifest.get('format')!r}, expected {FORMAT!r}")
    return manifest


def open_prepared(path: str, tokenizer: Tokenizer, verify: bool = True) -> TokenStream:
    """The dataset's token stream, after checking tokenizer, sizes and (optionally) checksums."""
    root = storage.path(path)
    manifest = load_manifest(root)
    expected = tokenizer.identity()
    if manifest["tokenizer"] != expected:
        raise DataError(
            f"{root / MANIFEST} was prepared with tokenizer {manifest['tokenizer']}, but the run "
            f"is configured with {expected}; prepare the data again or change the tokenizer")
    if manifest["tokens"] == 0:
        raise DataError(f"{root}: the prepared dataset is empty")
    dtype = np.dtype(manifest["token_dtype"])
    paths = [shard_file(root, r["name"], "tokens") for r in manifest["shards"]]
    if storage.is_remote(root):
        objects = storage.objects_under(root)  # sizes and CRC32Cs of every shard: one listing
        shards = [_open_remote_shard(p, objects.get(os.fspath(p.relative_to(root))), r,
                                     dtype, verify)
                  for p, r in zip(paths, manifest["shards"], strict=True)]
    else:
        shards = [_open_shard(p, r, dtype, verify)
                  for p, r in zip(paths, manifest["shards"], strict=True)]
    return TokenStream(shards, paths)


def _open_shard(path: pathlib.Path, record: dict[str, Any], dtype: np.dtype,
                verify: bool) -> np.ndarray:
    if not path.is_file():
        raise DataError(f"shard {path} is missing")
    if verify and file_crc32(path) != record["crc32"]["tokens"]:
        raise _checksum_error(path)
    try:
        tokens = np.load(path, mmap_mode="r")
    except ValueError as e:  # numpy's error for a file shorter than its header says
        raise DataError(f"shard {path} is truncated or not a token shard ({e})") from e
    _check_contents(path, tokens.dtype, len(tokens), record, dtype)
    return tokens


def _open_remote_shard(url: storage.Path, stored: StoredObject | None,
                       record: dict[str, Any], dtype: np.dtype, verify: bool) -> RemoteShard:
    if stored is None:
        raise DataError(f"shard {url} is missing")
    if verify:
        expected = record.get("crc32c", {}).get("tokens")
        if expected is not None:  # the bucket's own checksum: a metadata field, no download
            if stored.crc32c != expected:
                raise _checksum_error(url, "CRC32C")
        elif file_crc32(url) != record["crc32"]["tokens"]:  # prepared before CRC32Cs: read it
            raise _checksum_error(url)
    shard_dtype, length, offset = _npy_header(url, stored.size)
    _check_contents(url, shard_dtype, length, record, dtype)
    return RemoteShard(os.fspath(url), shard_dtype, offset, length)


def _npy_header(url: storage.Path, size: int) -> tuple[np.dtype, int, int]:
    """(dtype, length, data offset) of a 1-D .npy object, from its first bytes and its size."""
    head = read_range(url, 0, HEADER_BYTES)
    try:
        if head[:6] != b"\x93NUMPY":
            raise ValueError("no .npy magic string")
        length_bytes = 2 if head[6] == 1 else 4
        header_len = int.from_bytes(head[8:8 + length_bytes], "little")
        offset = 8 + length_bytes + header_len
        header = ast.literal_eval(head[8 + length_bytes:offset].decode("latin1"))
        shard_dtype, (length,) = np.dtype(header["descr"]), header["shape"]
    except (ValueError, SyntaxError, KeyError, TypeError, IndexError) as e:
        raise DataError(f"shard {url} is truncated or not a token shard ({e})") from e
    if size != offset + length * shard_dtype.itemsize:
        raise DataError(f"shard {url} is truncated or not a token shard ({size} bytes, its "
                        f"header says {offset + length * shard_dtype.itemsize})")
    return shard_dtype, length, offset


def _check_contents(path: Any, found_dtype: np.dtype, length: int, record: dict[str, Any],
                    dtype: np.dtype) -> None:
    if found_dtype != dtype or length != record["tokens"]:
        raise DataError(f"shard {path} holds {length} {found_dtype} tokens, the manifest "
                        f"says {record['tokens']} {dtype}")


def _checksum_error(path: Any, kind: str = "CRC32") -> DataError:
    return DataError(f"shard {path} fails its {kind} checksum (corrupted or overwritten)")
