"""`python -m input.prepare SOURCE... --out DIR`: raw text -> token shards + manifest.json.

Sources are files, directories (searched recursively) or globs of .txt, .jsonl
and .jsonl.gz. Work is cut into units before anything is read: uncompressed
files into line-aligned byte ranges of about --shard-mb each, compressed files
whole. Each unit becomes one shard, tokenized by a pool of worker processes
and written atomically with a record of its counts and checksums. The plan
depends only on the sources and --shard-mb, so a killed run started again
redoes only the unfinished shards and ends byte-identical to an uninterrupted
run, whatever the number of workers.

Shard format: a memory-mapped .npy array of token ids (uint16 when the
vocabulary fits, else uint32) and a .npy array of document end offsets.
Training cuts rows at arbitrary offsets of the token stream, so one row is one
slice of a memory map: no per-record decoding, no copies until the batch.
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import gzip
import json
import multiprocessing
import os
import pathlib
import sys
import time
from collections.abc import Iterator
from typing import Any

import numpy as np

from input.corpus import DataError, decode_utf8, jsonl_document
from input.shards import FORMAT, MANIFEST, file_crc32, shard_file
from input.tokenizer import Tokenizer, get_tokenizer, token_dtype, train_bpe

SUFFIXES = (".txt", ".jsonl", ".jsonl.gz", ".parquet")
ENCODE_BATCH = 512  # documents per tokenizer call: the Rust tokenizers parallelise a batch
TRAINED_TOKENIZER = "tokenizer.json"


@dataclasses.dataclass(frozen=True)
class Unit:
    """One shard's worth of input: bytes [start, end) of a file (end -1: to the end).

    For .parquet files, start and end count row groups instead of bytes.
    """

    index: int
    path: str
    start: int
    end: int

    @property
    def name(self) -> str:
        return f"shard-{self.index:05d}"


def _kind(path: pathlib.Path) -> str | None:
    return next((s for s in SUFFIXES if path.name.endswith(s) and
                 not (s == ".jsonl" and path.name.endswith(".jsonl.gz"))), None)


def find_sources(sources: list[str]) -> list[pathlib.Path]:
    """Every input file, sorted; a source that matches nothing is an error naming it."""
    files: set[pathlib.Path] = set()
    for source in sources:
        matches = [pathlib.Path(p) for p in glob.glob(source)] or [pathlib.Path(source)]
        found = []
        for match in matches:
            if match.is_dir():
                found += [p for p in match.rglob("*") if p.is_file() and _kind(p)]
            elif match.is_file():
                if not _kind(match):
                    raise DataError(f"{match}: unsupported file type (expected one of "
                                    f"{', '.join(SUFFIXES)})")
                found.append(match)
        if not found:
            raise DataError(f"source {source!r} matches no {'/'.join(SUFFIXES)} file")
        files.update(p.resolve() for p in found)
    return sorted(files)


def _line_aligned(path: pathlib.Path, offset: int) -> int:
    """The first offset >= `offset` that starts a line (or the file size)."""
    size = path.stat().st_size
    if offset <= 0 or offset >= size:
        return min(max(offset, 0), size)
    with path.open("rb") as f:
        f.seek(offset - 1)
        while chunk := f.read(1 << 16):
            newline = chunk.find(b"\n")
            if newline >= 0:
                return min(f.tell() - len(chunk) + newline + 1, size)
    return size


def plan_units(files: list[pathlib.Path], shard_bytes: int) -> list[Unit]:
    """Cut the input into units; depends only on the files and shard_bytes."""
    units: list[Unit] = []
    for path in files:
        if path.suffix == ".parquet":
            for group in range(_parquet(path).num_row_groups):
                units.append(Unit(len(units), str(path), group, group + 1))
            continue
        size = path.stat().st_size
        if path.name.endswith(".gz") or size == 0:
            units.append(Unit(len(units), str(path), 0, -1))
            continue
        start = 0
        while start < size:
            end = _line_aligned(path, start + shard_bytes)
            units.append(Unit(len(units), str(path), start, end))
            start = end
    return units


@dataclasses.dataclass
class _Counts:
    documents: int = 0
    skipped_lines: int = 0
    replaced_bytes: int = 0
    raw_bytes: int = 0


def _decode(raw: bytes, counts: _Counts) -> str:
    text, replaced = decode_utf8(raw)
    counts.replaced_bytes += replaced
    return text


def _read_range(unit: Unit) -> Iterator[bytes]:
    """The unit's lines (with their newlines), streamed."""
    opener = gzip.open if unit.path.endswith(".gz") else open
    with opener(unit.path, "rb") as f:
        f.seek(unit.start)
        remaining = None if unit.end < 0 else unit.end - unit.start
        for line in f:
            if remaining is not None:
                if remaining <= 0:
                    break
                remaining -= len(line)
            yield line


def _parquet(path: pathlib.Path | str):
    try:
        import pyarrow.parquet as pq
    except ImportError as e:
        raise DataError(f"{path}: reading .parquet needs pyarrow "
                        "(pip install 'io-first-lm[parquet]')") from e
    try:
        return pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises its own types for a damaged file
        raise DataError(f"{path}: not a readable parquet file ({e})") from e


def _parquet_documents(unit: Unit, field: str, counts: _Counts) -> Iterator[tuple[str, bool]]:
    table_file = _parquet(unit.path)
    if field not in table_file.schema_arrow.names:
        raise DataError(f"{unit.path}: no column {field!r} (columns: "
                        f"{', '.join(table_file.schema_arrow.names)}); set --text-field")
    for group in range(unit.start, unit.end):
        for value in table_file.read_row_group(group, columns=[field]).column(0).to_pylist():
            if isinstance(value, str):
                counts.raw_bytes += len(value.encode("utf-8"))
                counts.documents += 1
                yield value, True
            else:
                counts.skipped_lines += 1


def iter_documents(unit: Unit, field: str, counts: _Counts) -> Iterator[tuple[str, bool]]:
    """(text, ends_document) pieces of the unit, in order."""
    if unit.path.endswith(".parquet"):
        yield from _parquet_documents(unit, field, counts)
        return
    if unit.path.endswith(".txt"):
        # A .txt file is one document; it ends in the unit that reaches the end of file.
        size = os.path.getsize(unit.path)
        ends = size > 0 and (unit.end < 0 or unit.end >= size)
        raw = b"".join(_read_range(unit))  # at most about --shard-mb
        counts.raw_bytes += len(raw)
        counts.documents += int(ends)
        if raw or ends:
            yield _decode(raw, counts), ends
        return
    for number, line in enumerate(_read_range(unit), start=1):
        counts.raw_bytes += len(line)
        if not line.strip():
            continue
        where = f"{unit.path}: line {number} of the shard starting at byte {unit.start}"
        document = jsonl_document(_decode(line, counts), field, where)
        if document is None:
            counts.skipped_lines += 1
        else:
            counts.documents += 1
            yield document, True


def _batched(items: Iterator[Any], size: int) -> Iterator[list[Any]]:
    batch = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _save_atomic(path: pathlib.Path, array: np.ndarray) -> None:
    tmp = path.with_suffix(".tmp")
    with tmp.open("wb") as f:
        np.save(f, array)
    tmp.rename(path)


def tokenize_unit(unit: Unit, tokenizer_name: str, field: str, out: str) -> dict[str, Any]:
    """Tokenize one unit into its shard files; returns the shard's record (also saved)."""
    tokenizer = get_tokenizer(tokenizer_name)
    dtype = token_dtype(tokenizer.vocab_size)
    counts, pieces, doc_ends, length = _Counts(), [], [], 0
    for batch in _batched(iter_documents(unit, field, counts), ENCODE_BATCH):
        for ids, (_, ends) in zip(tokenizer.encode_batch([t for t, _ in batch]), batch,
                                  strict=True):
            if ends:
                ids = np.append(ids, tokenizer.eos_id)
            pieces.append(ids.astype(dtype))
            length += len(ids)
            if ends:
                doc_ends.append(length)
    out_dir = pathlib.Path(out)
    tokens = np.concatenate(pieces) if pieces else np.zeros(0, dtype)
    _save_atomic(shard_file(out_dir, unit.name, "tokens"), tokens)
    _save_atomic(shard_file(out_dir, unit.name, "docs"), np.asarray(doc_ends, np.int64))
    record = {
        "name": unit.name, "source": unit.path, "start": unit.start, "end": unit.end,
        "tokens": int(len(tokens)), "documents": counts.documents,
        "raw_bytes": counts.raw_bytes, "skipped_lines": counts.skipped_lines,
        "replaced_bytes": counts.replaced_bytes,
        "crc32": {kind: file_crc32(shard_file(out_dir, unit.name, kind))
                  for kind in ("tokens", "docs")},
    }
    tmp = out_dir / f"{unit.name}.json.tmp"
    tmp.write_text(json.dumps(record, sort_keys=True))
    tmp.rename(out_dir / f"{unit.name}.json")  # the shard's done marker, written last
    return record


def _done(out: pathlib.Path, unit: Unit) -> dict[str, Any] | None:
    marker = out / f"{unit.name}.json"
    if not marker.is_file():
        return None
    record = json.loads(marker.read_text())
    same = (record["source"], record["start"], record["end"]) == (unit.path, unit.start, unit.end)
    return record if same else None


def _one_thread_each() -> None:
    # The worker processes already use every core; a tokenizer that also spreads
    # each batch over all cores would oversubscribe them.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"


def _work(args: tuple[Unit, str, str, str]) -> dict[str, Any]:
    return tokenize_unit(*args)


def _progress(units: list[Unit], records: dict[int, Any], raw: int, raw_total: int,
              tokens: int, started: float) -> str:
    elapsed = max(time.perf_counter() - started, 1e-9)
    rate = raw / elapsed
    eta = (raw_total - raw) / rate if rate > 0 else float("nan")
    pending_files = {u.path for u in units if u.index not in records}
    files = len({u.path for u in units})
    return (f"files {files - len(pending_files)}/{files} | shards {len(records)}/{len(units)} | "
            f"{raw / 1e6:,.1f} MB | {rate / 1e6:.2f} MB/s | {tokens / elapsed:,.0f} tokens/s | "
            f"ETA {eta:.0f} s")


def prepare(sources: list[str], out: str | pathlib.Path, tokenizer: str = "bytes",
            field: str = "text", workers: int | None = None, shard_mb: float = 64.0,
            train_tokenizer: int = 0, report=print) -> dict[str, Any]:
    """Tokenize `sources` into shards under `out` and write its manifest; resumable.

    With `train_tokenizer` = V, first train a byte-level BPE of V tokens on the
    sources (once: a resumed run reuses it) and tokenize with it.
    """
    out = pathlib.Path(out)
    out.mkdir(parents=True, exist_ok=True)
    files = find_sources(sources)
    units = plan_units(files, max(1, int(shard_mb * 1e6)))
    if train_tokenizer:
        tokenizer = str(_trained_tokenizer(units, field, train_tokenizer, out, report))
    records: dict[int, dict[str, Any]] = {}
    for unit in units:
        if (record := _done(out, unit)) is not None:
            records[unit.index] = record
    pending = [u for u in units if u.index not in records]
    report(f"{len(files)} files -> {len(units)} shards ({len(records)} already done)")
    total_raw = sum(_unit_bytes(u) for u in pending)
    started, raw, tokens, last = time.perf_counter(), 0, 0, 0.0
    jobs = [(u, tokenizer, field, str(out)) for u in pending]
    workers = max(1, min(workers or os.cpu_count() or 1, len(jobs) or 1))
    pool = (multiprocessing.get_context("spawn").Pool(workers, initializer=_one_thread_each)
            if workers > 1 else _Serial())
    with pool:
        for record in pool.imap_unordered(_work, jobs):
            records[_index(record)] = record
            raw, tokens = raw + record["raw_bytes"], tokens + record["tokens"]
            if time.perf_counter() - last > 1.0 or len(records) == len(units):
                last = time.perf_counter()
                report(_progress(units, records, raw, total_raw, tokens, started))
    manifest = _manifest(get_tokenizer(tokenizer), [records[u.index] for u in units], files)
    tmp = out / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=1, sort_keys=True))
    tmp.rename(out / MANIFEST)
    _warn_about_input(manifest, report)
    return manifest


def _unit_bytes(unit: Unit) -> int:
    """Bytes of input the unit covers (a parquet unit: its share of the file), for the ETA."""
    size = os.path.getsize(unit.path)
    if unit.path.endswith(".parquet"):
        return size // max(1, _parquet(unit.path).num_row_groups)
    return (unit.end if unit.end >= 0 else size) - unit.start


def _trained_tokenizer(units: list[Unit], field: str, vocab_size: int, out: pathlib.Path,
                       report) -> pathlib.Path:
    path = out / TRAINED_TOKENIZER
    if path.is_file():
        report(f"using the tokenizer trained earlier: {path}")
        return path
    report(f"training a byte-level BPE of {vocab_size} tokens on the sources")
    texts = (text for unit in units for text, _ in iter_documents(unit, field, _Counts()))
    tmp = out / (TRAINED_TOKENIZER + ".tmp")
    train_bpe(texts, vocab_size, tmp)
    tmp.rename(path)
    return path


def _index(record: dict[str, Any]) -> int:
    return int(record["name"].split("-")[1])


class _Serial:
    """The Pool interface, in this process (one worker, or nothing to do)."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def imap_unordered(self, fn, jobs):
        return map(fn, jobs)


def _manifest(tokenizer: Tokenizer, records: list[dict[str, Any]],
              files: list[pathlib.Path]) -> dict[str, Any]:
    return {
        "format": FORMAT,
        "tokenizer": tokenizer.identity(),
        "token_dtype": token_dtype(tokenizer.vocab_size).name,
        "documents": sum(r["documents"] for r in records),
        "tokens": sum(r["tokens"] for r in records),
        "shards": records,
        "sources": [str(f) for f in files],
    }


def _warn_about_input(manifest: dict[str, Any], report) -> None:
    for source in manifest["sources"]:
        if os.path.getsize(source) == 0:
            report(f"warning: {source} is empty; it adds no document")
    for record in manifest["shards"]:
        if record["replaced_bytes"]:
            report(f"warning: {record['source']} (bytes {record['start']}-{record['end']}): "
                   f"replaced {record['replaced_bytes']} undecodable byte sequence(s)")
        if record["skipped_lines"]:
            report(f"warning: {record['source']} (bytes {record['start']}-{record['end']}): "
                   f"skipped {record['skipped_lines']} line(s) without the text field")
    if manifest["tokens"] == 0:
        raise DataError("the sources hold no text: the prepared dataset would be empty")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m input.prepare", description=__doc__.split(
        "\n")[0])
    parser.add_argument("sources", nargs="+", help="files, directories or globs")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--tokenizer", default="bytes",
                        help="'bytes', a tokenizer.json or a SentencePiece .model")
    parser.add_argument("--train-tokenizer", type=int, default=0, metavar="VOCAB_SIZE",
                        help="train a byte-level BPE on the sources and save it beside the data")
    parser.add_argument("--text-field", default="text", help="field of .jsonl records")
    parser.add_argument("--workers", type=int, default=None, help="default: all cores")
    parser.add_argument("--shard-mb", type=float, default=64.0, help="raw MB per shard")
    args = parser.parse_args(argv)
    try:
        manifest = prepare(args.sources, args.out, args.tokenizer, args.text_field,
                           args.workers, args.shard_mb, args.train_tokenizer)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {len(manifest['shards'])} shards, {manifest['documents']:,} documents, "
          f"{manifest['tokens']:,} tokens to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
