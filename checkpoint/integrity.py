"""Per-file checksums of a finished checkpoint, verified before every restore.

TensorStore does not detect a flipped bit inside a chunk: the restore succeeds
with wrong values. So once Orbax has finalised a step, we record the size and
checksum of each of its files, and refuse to restore a step whose files differ.
On disk the checksum is a CRC32 of the file's bytes. In a bucket it is the CRC32C that
Cloud Storage computed from the bytes it stored, read from one listing: reading a step
back to checksum it would download it once more after the save, and again before
every restore.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import zlib

import google_crc32c

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


KINDS = ("crc32", "crc32c")
"""The checksums a manifest entry may hold: crc32 (written on disk), crc32c (in a bucket)."""


def _read_checksum(path: storage.Path, kind: str) -> int:
    crc = 0
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            crc = zlib.crc32(chunk, crc) if kind == "crc32" else google_crc32c.extend(crc, chunk)
    return crc


def _checksum(path: storage.Path, kind: str, kept_crc32c: int | None) -> int:
    """The file's checksum of `kind`: the CRC32C a bucket keeps for it if that is the kind
    (nothing is read), else computed from its bytes."""
    if kind == "crc32c" and kept_crc32c is not None:
        return kept_crc32c
    return _read_checksum(path, kind)


def _listing(step_dir: storage.Path) -> tuple[dict[str, int], dict[str, int]]:
    """Every file of the step by path relative to it -> its size, and -> the CRC32C a bucket
    keeps for it ({} on disk): one listing, no stat each."""
    if storage.is_remote(step_dir):
        objects = storage.objects_under(step_dir)
        return ({name: stored.size for name, stored in objects.items()},
                {name: stored.crc32c for name, stored in objects.items()})
    return storage.files_under(step_dir), {}


def _parallel_checksums(jobs: list[tuple[storage.Path, str, int | None]],
                        threads: int) -> list[int]:
    # Reads, zlib.crc32 and google_crc32c release the GIL: threads keep reads in flight.
    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        return list(pool.map(lambda job: _checksum(*job), jobs))


def write_checksums(step_dir: storage.Path) -> int:
    """Record size and checksum of every file of the step; returns the total bytes."""
    sizes, kept = _listing(step_dir)
    files = {name: size for name, size in sorted(sizes.items())
             if os.path.basename(name) not in UNCHECKED}
    kind = "crc32c" if storage.is_remote(step_dir) else "crc32"
    crcs = _parallel_checksums([(step_dir / name, kind, kept.get(name)) for name in files],
                               _WRITE_THREADS)
    entries = {name: {"size": size, kind: crc}
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
    sizes, kept = _listing(step_dir)
    for name, expected in entries:
        path = step_dir / name
        if name not in sizes:
            raise DamagedCheckpointError(f"checkpoint step {step}: file {path} is missing")
        size = sizes[name]
        if size != expected["size"]:
            raise DamagedCheckpointError(
                f"checkpoint step {step}: file {path} has {size} bytes, expected "
                f"{expected['size']} (truncated or overwritten)")
    jobs = [(step_dir / name, _kind(e), kept.get(name)) for name, e in entries]
    for (path, kind, _), (_, expected), crc in zip(
            jobs, entries, _parallel_checksums(jobs, _VERIFY_THREADS), strict=True):
        if crc != expected[kind]:
            raise DamagedCheckpointError(f"checkpoint step {step}: file {path} fails its "
                                         f"{kind.upper()} checksum (corrupted)")


def _kind(entry: dict[str, int]) -> str:
    return next(kind for kind in KINDS if kind in entry)


def _manifest_entries(step_dir: storage.Path, step: int) -> list[tuple[str, dict[str, int]]]:
    """The manifest's (file, {size, crc32 or crc32c}) pairs; a manifest that is not one is
    damage too."""
    path = step_dir / MANIFEST
    try:
        entries = json.loads(path.read_text())
        if not (isinstance(entries, dict) and all(
                isinstance(e, dict) and isinstance(e.get("size"), int)
                and any(isinstance(e.get(kind), int) for kind in KINDS)
                for e in entries.values())):
            raise ValueError("not a map of file name to size and crc32 or crc32c")
    except (OSError, UnicodeDecodeError, ValueError) as e:  # JSONDecodeError is a ValueError
        raise DamagedCheckpointError(
            f"checkpoint step {step}: its checksum file {path} is unreadable ({e})") from e
    return sorted(entries.items())
