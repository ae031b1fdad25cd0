"""Paths that are local files or Cloud Storage objects, and what differs between the two."""

from __future__ import annotations

import os
import pathlib
import uuid

import fsspec
from etils import epath

Path = epath.Path
"""A local path (`os` underneath, as `pathlib`) or a `gs://bucket/...` URL (gcsfs)."""

GCS_PREFIX = "gs://"

# Objects in a run directory are also written by TensorStore and by other hosts, which
# gcsfs's cache of directory listings would not see: every listing asks the bucket.
fsspec.config.conf.setdefault("gcs", {})["use_listings_cache"] = False


def _point_clients_at_emulator() -> None:
    """With STORAGE_EMULATOR_HOST set (a local GCS-protocol server such as fake-gcs-server),
    point every client this stack uses at it, with no credentials and no cloud metadata
    lookups: google-cloud-storage reads the variable itself; TensorStore (Orbax's array
    writer), gcsfs and google-auth each need their own."""
    url = os.environ.get("STORAGE_EMULATOR_HOST")
    if not url:
        return
    url = url if "://" in url else f"http://{url}"
    unreachable = "127.0.0.1:9"  # no metadata server: nothing may try the cloud's
    for name, value in [("TENSORSTORE_GCS_HTTP_URL", url), ("GOOGLE_AUTH_TOKEN_FOR_TESTING", "x"),
                        ("FSSPEC_GS_TOKEN", "anon"), ("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false"),
                        ("NO_GCE_CHECK", "true"), ("GCE_METADATA_HOST", unreachable),
                        ("GCE_METADATA_ROOT", unreachable), ("GCE_METADATA_IP", unreachable)]:
        os.environ.setdefault(name, value)


_point_clients_at_emulator()


def is_remote(location: str | os.PathLike) -> bool:
    """Whether `location` is a Cloud Storage URL rather than a local path."""
    return os.fspath(location).startswith(GCS_PREFIX)


def path(location: str | os.PathLike) -> Path:
    """`location` as a Path: a gs:// URL as it is, a local path made absolute."""
    if is_remote(location):
        return epath.Path(os.fspath(location))
    return epath.Path(pathlib.Path(location).absolute())


def bucket_and_name(url: str | os.PathLike) -> tuple[str, str]:
    """`gs://bucket/a/b` -> ("bucket", "a/b"), for clients that name the two apart."""
    bucket, _, name = os.fspath(url).removeprefix(GCS_PREFIX).partition("/")
    return bucket, name


def gcs() -> fsspec.AbstractFileSystem:
    """gcsfs, the same instance `epath` uses for gs:// paths."""
    return fsspec.filesystem("gcs", finalize_on_close=True)


def files_under(directory: str | os.PathLike) -> dict[str, int]:
    """Every file under `directory` (recursively) by its path relative to it -> its size.

    On Cloud Storage this is one listing by prefix: no per-directory walk (each a
    request) and no `**` glob (which GCS refuses).
    """
    directory = path(directory)
    if is_remote(directory):
        prefix = os.fspath(directory).removeprefix(GCS_PREFIX).rstrip("/") + "/"
        found = gcs().find(prefix, detail=True)
        return {name[len(prefix):]: int(info["size"]) for name, info in found.items()
                if info["type"] == "file" and not name.endswith("/")}
    files = {}
    for root, _, names in os.walk(directory):
        for name in names:
            full = os.path.join(root, name)
            files[os.path.relpath(full, directory)] = os.path.getsize(full)
    return files


def write_atomically(target: str | os.PathLike, data: bytes | str) -> None:
    """Write `data` so that readers see the old content or the new, never a part: one
    object upload on Cloud Storage, a temporary file renamed over the target on disk."""
    target = path(target)
    payload = data.encode() if isinstance(data, str) else data
    if is_remote(target):
        target.write_bytes(payload)
        return
    tmp = target.parent / f".{target.name}.{uuid.uuid4().hex}.tmp"
    tmp.write_bytes(payload)
    os.replace(tmp, target)
