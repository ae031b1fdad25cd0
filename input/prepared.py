"""Read a dataset written by `python -m input.prepare`: checked, memory-mapped token shards."""

from __future__ import annotations

import json
import pathlib
from typing import Any

import numpy as np

from input.corpus import DataError
from input.shards import FORMAT, MANIFEST, file_crc32, shard_file
from input.tokenizer import Tokenizer


def is_prepared(path: str) -> bool:
    return bool(path) and (pathlib.Path(path) / MANIFEST).is_file()


class TokenStream:
    """Several token arrays read as one: `len()` and slicing, across shard boundaries.

    Built from shard files it pickles as their paths, so Grain worker processes
    map the files themselves instead of receiving a copy of the data.
    """

    def __init__(self, shards: list[np.ndarray], paths: list[pathlib.Path] | None = None):
        self.paths = paths
        self.shards = [s for s in shards if len(s)]
        self.offsets = np.cumsum([0] + [len(s) for s in self.shards])

    @classmethod
    def from_files(cls, paths: list[pathlib.Path]) -> TokenStream:
        return cls([np.load(p, mmap_mode="r") for p in paths], paths)

    def __reduce__(self):
        if self.paths is None:
            return TokenStream, (self.shards,)
        return TokenStream.from_files, (self.paths,)

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

    def __len__(self) -> int:
        return self.stop - self.start

    def __getitem__(self, index: slice) -> np.ndarray:
        start, stop, _ = index.indices(len(self))
        return self.stream[self.start + start:self.start + stop]


def load_manifest(path: str | pathlib.Path) -> dict[str, Any]:
    manifest_path = pathlib.Path(path) / MANIFEST
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise DataError(f"{manifest_path}: cannot read the manifest ({e})") from e
    if manifest.get("format") != FORMAT:
        raise DataError(f"{manifest_path}: format {manifest.get('format')!r}, expected {FORMAT!r}")
    return manifest


def open_prepared(path: str, tokenizer: Tokenizer, verify: bool = True) -> TokenStream:
    """The dataset's token stream, after checking tokenizer, sizes and (optionally) CRC32s."""
    root = pathlib.Path(path)
    manifest = load_manifest(root)
    expected = tokenizer.identity()
    if manifest["tokenizer"] != expected:
        raise DataError(
            f"{root / MANIFEST} was prepared with tokenizer {manifest['tokenizer']}, but the run "
            f"is configured with {expected}; prepare the data again or change the tokenizer")
    if manifest["tokens"] == 0:
        raise DataError(f"{root}: the prepared dataset is empty")
    shards = []
    for record in manifest["shards"]:
        shards.append(_open_shard(root, record, np.dtype(manifest["token_dtype"]), verify))
    return TokenStream(shards, [shard_file(root, r["name"], "tokens") for r in manifest["shards"]])


def _open_shard(root: pathlib.Path, record: dict[str, Any], dtype: np.dtype,
                verify: bool) -> np.ndarray:
    path = shard_file(root, record["name"], "tokens")
    if not path.is_file():
        raise DataError(f"shard {path} is missing")
    if verify and file_crc32(path) != record["crc32"]["tokens"]:
        raise DataError(f"shard {path} fails its CRC32 checksum (corrupted or overwritten)")
    try:
        tokens = np.load(path, mmap_mode="r")
    except ValueError as e:  # numpy's error for a file shorter than its header says
        raise DataError(f"shard {path} is truncated or not a token shard ({e})") from e
    if tokens.dtype != dtype or len(tokens) != record["tokens"]:
        raise DataError(f"shard {path} holds {len(tokens)} {tokens.dtype} tokens, the manifest "
                        f"says {record['tokens']} {dtype}")
    return tokens

