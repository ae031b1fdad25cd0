"""Whole directories between a bucket and local disk, for libraries that only take files.

safetensors memory-maps its files and matplotlib's writers want a file name: for those,
a directory in a bucket is copied down to a temporary directory first (or written there
and copied up after). A local directory is used where it is, with no copy.
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import tempfile
from collections.abc import Iterator

from storage.paths import files_under, is_remote, path


@contextlib.contextmanager
def local_copy(directory: str | os.PathLike,
               suffixes: tuple[str, ...] = ()) -> Iterator[pathlib.Path]:
    """`directory` on local disk: itself, or a temporary copy of the bucket's files (those
    whose names end in one of `suffixes`, if given)."""
    if not is_remote(directory):
        yield pathlib.Path(directory)
        return
    source = path(directory)
    with tempfile.TemporaryDirectory(prefix="io-first-lm-download-") as tmp:
        for name in files_under(source):
            if suffixes and not name.endswith(suffixes):
                continue
            target = pathlib.Path(tmp, name)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes((source / name).read_bytes())
        yield pathlib.Path(tmp)


@contextlib.contextmanager
def written_to(directory: str | os.PathLike) -> Iterator[pathlib.Path]:
    """A local directory to write into that ends up as `directory`: `directory` itself, or
    a temporary one whose files are uploaded when the block ends without an error."""
    if not is_remote(directory):
        local = pathlib.Path(directory)
        local.mkdir(parents=True, exist_ok=True)
        yield local
        return
    target = path(directory)
    with tempfile.TemporaryDirectory(prefix="io-first-lm-upload-") as tmp:
        yield pathlib.Path(tmp)
        for file in sorted(pathlib.Path(tmp).rglob("*")):
            if file.is_file():
                (target / file.relative_to(tmp).as_posix()).write_bytes(file.read_bytes())
