"""Raw documents: the embedded default corpus, or a user's .txt / .jsonl files."""

from __future__ import annotations

import json
import logging
import pathlib

import storage
from storage.paths import read_files

log = logging.getLogger(__name__)

SUFFIXES = (".txt", ".jsonl")


class DataError(ValueError):
    """Input data is missing, empty or malformed."""


def default_corpus() -> list[str]:
    """Python's bundled documentation topics (~465 KB of English), present on every machine."""
    from pydoc_data.topics import topics
    return [topics[key] for key in sorted(topics)]


def load_documents(path: str, jsonl_field: str = "text", key: str = "data.path") -> list[str]:
    """Documents from `path` (a file or a directory searched recursively); '' is the default.

    Errors name `path` as the config field `key`.
    """
    if not path:
        return default_corpus()
    files = _files(path, key)
    if not files:
        raise DataError(f"{key} {path!r} holds no {' or '.join(SUFFIXES)} files")
    documents = []
    for file, raw in zip(files, read_files(files), strict=True):
        documents += _read_file(file, raw, jsonl_field)
    documents = [d for d in documents if d]
    if not documents:
        raise DataError(f"{key} {path!r}: every document is empty")
    return documents


def _files(path: str, key: str) -> list[pathlib.Path | storage.Path]:
    """`path` itself if a file, else the .txt/.jsonl files under it (in a bucket: the
    objects under the prefix, found by one listing)."""
    if storage.is_remote(path):
        root = storage.path(path)
        if root.is_file():
            return [root]
        found = storage.files_under(root)
        if not found:
            raise DataError(f"{key} {path!r} does not exist (no object and no prefix)")
        return [root / name for name in sorted(found) if pathlib.PurePosixPath(name).suffix
                in SUFFIXES]
    root = pathlib.Path(path)
    if root.is_file():
        return [root]
    if not root.exists():
        raise DataError(f"{key} {path!r} does not exist")
    return sorted(p for p in root.rglob("*") if p.is_file() and p.suffix in SUFFIXES)


def decode_utf8(raw: bytes) -> tuple[str, int]:
    """The text, with each undecodable byte sequence replaced by U+FFFD, and how many were."""
    text = raw.decode("utf-8", errors="replace")
    if "\ufffd" not in text:
        return text, 0
    return text, text.count("\ufffd") - raw.decode("utf-8", errors="ignore").count("\ufffd")


def jsonl_document(line: str, field: str, where: str) -> str | None:
    """The string `field` of a JSONL record (None if absent); invalid JSON names `where`."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise DataError(f"{where}: not valid JSON ({e.msg})") from e
    value = record.get(field) if isinstance(record, dict) else None
    return value if isinstance(value, str) else None


def _read_text(file: storage.Path, raw: bytes) -> str:
    text, bad = decode_utf8(raw)
    if bad:
        log.warning("%s: replaced %d undecodable byte sequence(s) with U+FFFD", file, bad)
    return text


def _read_file(file: storage.Path, raw: bytes, field: str) -> list[str]:
    if file.suffix not in SUFFIXES:
        raise DataError(f"{file}: unsupported file type (expected {' or '.join(SUFFIXES)})")
    text = _read_text(file, raw)
    if file.suffix == ".txt":
        return [text]
    documents, missing = [], 0
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        document = jsonl_document(line, field, f"{file}:{number}")
        if document is None:
            missing += 1
        else:
            documents.append(document)
    if missing:
        log.warning("%s: skipped %d line(s) without a string field %r", file, missing, field)
    return documents
