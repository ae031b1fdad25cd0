"""Per-file checksums of a finished checkpoint, verified before every restore.

TensorStore does not detect a flipped bit inside a chunk: the restore succeeds
with wrong values. So once Orbax has finalised a step, we record the size and
CRC32 of each of its files, and refuse to restore a step whose files differ.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import zlib

import storage

MANIFEST = "checksums.json"
# Orbax rewrites its step metadata (commit timestamps) after the data is final, and on
# Cloud Storage marks a finished step or item with a commit file, also after.
UNCHECKED = {MANIFEST, "_CHECKPOINT_METADATA", "commit_success.txt"}
_CHUNK = 1 << 22
# Verifying before a restore reads with several threads, to keep reads in flight. Checksums
# are written in the background of training with one: on a host whose cores all run the
# step, each extra thread takes a core's share from it (measured: 0.87 -> 0.90 of the
# steps/s without checkpoints, benchmarks/checkpoint.py figure 2).
_VERIFY_THREADS = 8
_WRITE_THREADS = 1


class DamagedCheckpointError(ValueError):
    """A file of a checkpoint is missing, truncated or altered."""


def _crc32(path: storage.Path) -> int:
    crc = 0
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            crc = zlib.crc32(chunk, crc)
    return crc


def _files(step_dir: storage.Path) -> dict[str, int]:
    """The step's checked files, by path relative to it -> size: one listing, no stat each."""
    return {name: size for name, size in sorted(storage.files_under(step_dir).items())
            if os.path.basename(name) not in UNCHECKED}


def _parallel_crc32(paths: list[storage.Path], threads: int) -> list[int]:
    # Reads and zlib.crc32 release the GIL: threads keep several reads in flight.
    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        return list(pool.map(_crc32, paths))


def write_checksums(step_dir: storage.Path) -> int:
    """Record size and CRC32 of every file of the step; returns the total bytes."""
    files = _files(step_dir)
    crcs = _parallel_crc32([step_dir / name for name in files], _WRITE_THREADS)
    entries = {name: {"size": size, "crc32": crc}
               for (name, size), crc in zip(files.items(), crcs, strict=True)}
    storage.write_atomically(step_dir / MANIFEST, json.dumps(entries, indent=1, sort_keys=True))
    return sum(e["size"] for e in entries.values())


def has_checksums(step_dir: storage.Path) -> bool:
    return (step_dir / MANIFEST).is_file()


def verify(step_dir: storage.Path, step: int, under: str = "") -> None:
    """Raise DamagedCheckpointError naming the step and the first bad file (of those whose
    path in the step starts with `under`, e.g. "config/": all by default)."""
    entries = [(name, e) for name, e in _manifest_entries(step_dir, step)
               if name.startswith(under)]
    sizes = storage.files_under(step_dir)
    for name, expected in entries:
        path = step_dir / name
        if name not in sizes:
            raise DamagedCheckpointError(f"checkpoint step {step}: file {path} is missing")
        size = sizes[name]
        if size != expected["size"]:
            raise DamagedCheckpointError(
                f"checkpoint step {step}: file {path} has {size} bytes, expected "
                f"{expected['size']} (truncated or overwritten)")
    paths = [step_dir / name for name, _ in entries]
    for path, (_, expected), crc in zip(paths, entries, _parallel_crc32(paths, _VERIFY_THREADS),
                                         strict=True):
        if crc != expected["crc32"]:
            raise DamagedCheckpointError(
                f"checkpoint step {step}: file {path} fails its CRC32 checksum (corrupted)")


def _manifest_entries(step_dir: storage.Path, step: int) -> list[tuple[str, dict[str, int]]]:
    """The manifest's (file, {size, crc32}) pairs; a manifest that is not one is damage too."""
    path = step_dir / MANIFEST
    try:
        entries = json.loads(path.read_text())
        if not (isinstance(entries, dict) and all(
                isinstance(e, dict) and isinstance(e.get("size"), int)
                and isinstance(e.get("crc32"), int) for e in entries.values())):
            raise ValueError("not a map of file name to size and crc32")
    except (OSError, UnicodeDecodeError, ValueError) as e:  # JSONDecodeError is a ValueError
        raise DamagedCheckpointError(
            f"checkpoint step {step}: its checksum file {path} is unreadable ({e})") from e
    return sorted(entries.items())
