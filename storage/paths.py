"""Paths that are local files or Cloud Storage objects, and what differs between the two."""

from __future__ import annotations

import base64
import dataclasses
import functools
import io
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


@functools.cache
def gcs_client():
    """A google-cloud-storage client, for what gcsfs lacks (conditional creates): application
    default credentials on Cloud Storage; no credentials and no project with
    STORAGE_EMULATOR_HOST set (a local GCS-protocol server)."""
    from google.cloud import storage as gcs_client

    if os.environ.get("STORAGE_EMULATOR_HOST"):
        from google.auth.credentials import AnonymousCredentials

        return gcs_client.Client(project="<none>", credentials=AnonymousCredentials())
    return gcs_client.Client()


def files_under(directory: str | os.PathLike) -> dict[str, int]:
    """Every file under `directory` (recursively) by its path relative to it -> its size.

    On Cloud Storage this is one listing by prefix: no per-directory walk (each a
    request) and no `**` glob (which GCS refuses).
    """
    directory = path(directory)
    if is_remote(directory):
        return {name: stored.size for name, stored in objects_under(directory).items()}
    files = {}
    for root, _, names in os.walk(directory):
        for name in names:
            full = os.path.join(root, name)
            files[os.path.relpath(full, directory)] = os.path.getsize(full)
    return files


@dataclasses.dataclass(frozen=True)
class StoredObject:
    size: int
    crc32c: int
    """The CRC32C that Cloud Storage computed from the bytes it stored."""


def objects_under(directory: str | os.PathLike) -> dict[str, StoredObject]:
    """Every object under a gs:// `directory` by its path relative to it: one listing,
    nothing downloaded."""
    prefix = os.fspath(path(directory)).removeprefix(GCS_PREFIX).rstrip("/") + "/"
    found = gcs().find(prefix, detail=True)
    return {name[len(prefix):]: StoredObject(
                int(info["size"]), int.from_bytes(base64.b64decode(info["crc32c"]), "big"))
            for name, info in found.items() if info["type"] == "file" and not name.endswith("/")}


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


# Reading inputs piece by piece (input.prepare): sizes, ranges and lines without downloading
# whole objects.


def file_size(location: str | os.PathLike) -> int:
    """Bytes in a file or object: one metadata request on Cloud Storage."""
    if is_remote(location):
        return int(gcs().size(os.fspath(location)))
    return os.path.getsize(location)


def read_range(location: str | os.PathLike, start: int, end: int) -> bytes:
    """Bytes [start, end) of a file, fewer where it ends first: one ranged request on Cloud
    Storage, nothing else of the object downloaded."""
    if is_remote(location):
        return gcs().cat_file(os.fspath(location), start=start, end=end)
    with open(location, "rb") as f:
        f.seek(start)
        return f.read(max(0, end - start))


def open_reader(location: str | os.PathLike, buffer_bytes: int = 1 << 20) -> io.BufferedReader:
    """A seekable binary reader of a file or object, for reading line by line: gcsfs's own
    readline copies a whole read-ahead block (MBs) per line, so a buffer sits in front."""
    if is_remote(location):
        return io.BufferedReader(path(location).open("rb"), buffer_bytes)
    return open(location, "rb")  # noqa: SIM115 (the caller's to close)


def read_files(locations: list[str | os.PathLike]) -> list[bytes]:
    """The contents of several files, in order; objects are fetched concurrently."""
    names = [os.fspath(p).removeprefix(GCS_PREFIX) for p in locations if is_remote(p)]
    fetched = gcs().cat(names) if names else {}  # a list in, a dict by name out
    return [fetched[os.fspath(p).removeprefix(GCS_PREFIX)] if is_remote(p) else
            pathlib.Path(p).read_bytes() for p in locations]


def glob_objects(pattern: str) -> dict[str, str]:
    """gs:// URLs matching a glob in a bucket -> "file" or "directory" (a prefix); none
    when the bucket does not exist."""
    try:
        found = gcs().glob(pattern, detail=True)
    except FileNotFoundError:
        return {}
    return {GCS_PREFIX + name: info["type"] for name, info in found.items()}


def bucket_exists(location: str | os.PathLike) -> bool:
    """Whether the bucket of a gs:// `location` exists (one request)."""
    return gcs().exists(GCS_PREFIX + bucket_and_name(location)[0])


GCS_TRIES = 6
"""How many times a request to Cloud Storage is tried before its error is raised: gcsfs's own
default, 1 + 2 + 4 + 8 + 16 s of backoff between tries (~31 s), which rides out a bucket's
transient 503s and 429s. `IO_FIRST_LM_GCS_TRIES` sets another (the fault tests use 3: a
dead server is then named after ~3 s, not ~31)."""


def gcs_tries() -> int:
    """How many times each client tries a request (GCS_TRIES unless the environment says)."""
    return max(1, int(os.environ.get("IO_FIRST_LM_GCS_TRIES", GCS_TRIES)))


def _bound_gcsfs_retries() -> None:
    """gcsfs fixes its tries when its class is defined; a run that asks for another number
    re-wraps its one request method with it (uploads, listings and composes all go through
    it; each retries 5xx, 429 and refused connections with backoff)."""
    tries = gcs_tries()
    if tries == GCS_TRIES:
        return
    from gcsfs import core, retry

    request = core.GCSFileSystem._request
    core.GCSFileSystem._request = retry.retry_request(retries=tries)(
        getattr(request, "__wrapped__", request))


_bound_gcsfs_retries()
