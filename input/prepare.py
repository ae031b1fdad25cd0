"""`python -m input.prepare SOURCE... --out DIR`: raw text -> token shards + manifest.json.

Sources are files, directories (searched recursively) or globs of .txt, .jsonl,
.jsonl.gz and .parquet, on local disk or in a bucket (`gs://bucket/dir`: one
listing by prefix; `gs://bucket/dir/*.jsonl`); --out may be in a bucket too.
Objects are read through the storage seam (the driver reads only a few KB
around each cut) and every output file is one atomic upload there. Work is cut
into units before anything is read: uncompressed files into line-aligned byte
ranges of about --shard-mb each, compressed files whole. Each unit becomes
one shard, tokenized by a pool of worker processes and written atomically
with a record of its counts and checksums (CRC32, and the CRC32C that Cloud
Storage keeps for each object, checked without a download). The plan
depends only on the sources and --shard-mb, so a killed run started again
redoes only the unfinished shards and ends byte-identical to an uninterrupted
run, whatever the number of workers.

`--ray [ADDRESS]` runs the same units as tasks of a Ray cluster instead of local worker
processes (input/ray_prepare.py; `pip install 'io-first-lm[ray]'`): the output is the same,
byte for byte.

Shard format: a memory-mapped .npy array of token ids (uint16 when the
vocabulary fits, else uint32) and a .npy array of document end offsets.
Training cuts rows at arbitrary offsets of the token stream, so one row is one
slice of a memory map: no per-record decoding, no copies until the batch.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import glob
import gzip
import io
import json
import multiprocessing
import os
import pathlib
import sys
import tempfile
import time
import zlib
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, BinaryIO

import numpy as np

import storage
from input.corpus import DataError, decode_utf8, jsonl_document
from input.shards import FORMAT, MANIFEST, checksums, shard_file
from input.tokenizer import Tokenizer, get_tokenizer, token_dtype, train_bpe
from storage.paths import (
    bucket_and_name,
    bucket_exists,
    file_size,
    glob_objects,
    open_reader,
    read_files,
    read_range,
)

SUFFIXES = (".txt", ".jsonl", ".jsonl.gz", ".parquet")
ENCODE_BATCH = 512  # documents per tokenizer call: the Rust tokenizers parallelise a batch
TRAINED_TOKENIZER = "tokenizer.json"
# --train-tokenizer reads at most this much text, the same share from the start of every unit:
# a byte-level BPE's merges settle well within a GB, and training time and memory grow with
# the sample. Fixed by the plan alone, the sample (and so the tokenizer) is the same on one
# host or a cluster; a corpus whose units all fit their share is read whole.
TOKENIZER_SAMPLE_BYTES = 1 << 30
# Files cut at once while planning: each cut is a small ranged read, so a bucket's latency,
# not its bandwidth, bounds the plan of many files.
PLAN_THREADS = 16


@dataclasses.dataclass(frozen=True)
class Unit:
    """One shard's worth of input: bytes [start, end) of a file (end -1: to the end).

    `path` is an absolute local path or a gs:// URL. For .parquet files, start and end
    count row groups instead of bytes.
    """

    index: int
    path: str
    start: int
    end: int

    @property
    def name(self) -> str:
        return f"shard-{self.index:05d}"


def _kind(name: str) -> str | None:
    return next((s for s in SUFFIXES if name.endswith(s) and
                 not (s == ".jsonl" and name.endswith(".jsonl.gz"))), None)


def _unsupported(name: str) -> DataError:
    return DataError(f"{name}: unsupported file type (expected one of {', '.join(SUFFIXES)})")


def _local_matches(source: str) -> list[str]:
    matches = [pathlib.Path(p) for p in glob.glob(source)] or [pathlib.Path(source)]
    found = []
    for match in matches:
        if match.is_dir():
            found += [p for p in match.rglob("*") if p.is_file() and _kind(p.name)]
        elif match.is_file():
            if not _kind(match.name):
                raise _unsupported(str(match))
            found.append(match)
    return [str(p.resolve()) for p in found]


def _remote_matches(source: str) -> list[str]:
    """The objects of a gs:// source: a glob, one object, or a prefix (one listing of it,
    never a recursive `**` glob, which GCS refuses)."""
    if glob.has_magic(source):
        matches = glob_objects(source)
    else:
        matches = {source: "file" if storage.path(source).is_file() else "directory"}
    found = []
    for match, kind in matches.items():
        if kind == "file":
            if not _kind(match):
                raise _unsupported(match)
            found.append(match)
            continue
        with contextlib.suppress(FileNotFoundError):  # no such bucket: nothing found
            found += [f"{match.rstrip('/')}/{name}" for name in storage.files_under(match)
                      if _kind(name)]
    return found


def find_sources(sources: list[str]) -> list[str]:
    """Every input file (absolute local paths and gs:// URLs), sorted; a source that matches
    nothing is an error naming it."""
    files: set[str] = set()
    for source in sources:
        found = (_remote_matches if storage.is_remote(source) else _local_matches)(source)
        if not found:
            raise DataError(f"source {source!r} matches no {'/'.join(SUFFIXES)} file")
        files.update(found)
    # By path components, as pathlib sorts: the unit order of a local prepare is unchanged.
    return sorted(files, key=lambda f: pathlib.PurePosixPath(f).parts)


def _line_aligned(path: str, offset: int, size: int) -> int:
    """The first offset >= `offset` that starts a line (or the file size); reads only a
    little around `offset`."""
    if offset <= 0 or offset >= size:
        return min(max(offset, 0), size)
    at, want = offset - 1, 1 << 13  # most lines end within a few KB; a long one, in more
    while chunk := read_range(path, at, min(at + want, size)):
        newline = chunk.find(b"\n")
        if newline >= 0:
            return min(at + newline + 1, size)
        at, want = at + len(chunk), min(want * 2, 1 << 20)
    return size


def _file_cuts(path: str, shard_bytes: int) -> list[tuple[int, int]]:
    """The (start, end) of each unit of one file: row groups of a parquet file, the whole
    of a compressed or empty one, else line-aligned byte ranges of about shard_bytes."""
    if path.endswith(".parquet"):
        return [(group, group + 1) for group in range(_parquet(path).num_row_groups)]
    size = file_size(path)
    if path.endswith(".gz") or size == 0:
        return [(0, -1)]
    cuts, start = [], 0
    while start < size:
        end = _line_aligned(path, start + shard_bytes, size)
        cuts.append((start, end))
        start = end
    return cuts


def plan_units(files: list[str], shard_bytes: int) -> list[Unit]:
    """Cut the input into units; depends only on the files and shard_bytes (files are cut
    concurrently, numbered in order)."""
    files = list(map(str, files))
    with ThreadPoolExecutor(PLAN_THREADS) as pool:
        cuts = list(pool.map(lambda path: _file_cuts(path, shard_bytes), files))
    spans = [(path, start, end) for path, file_cuts in zip(files, cuts, strict=True)
             for start, end in file_cuts]
    return [Unit(index, *span) for index, span in enumerate(spans)]


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


@contextlib.contextmanager
def _open(path: str) -> Iterator[BinaryIO]:
    """A buffered binary reader of a local file or an object, decompressed for .gz."""
    with open_reader(path) as raw:
        if not path.endswith(".gz"):
            yield raw
            return
        with gzip.GzipFile(fileobj=raw, mode="rb") as f:
            yield f


def _read_range(unit: Unit) -> Iterator[bytes]:
    """The unit's lines (with their newlines), streamed."""
    try:
        with _open(unit.path) as f:
            f.seek(unit.start)
            remaining = None if unit.end < 0 else unit.end - unit.start
            for line in f:
                if remaining is not None:
                    if remaining <= 0:
                        break
                    remaining -= len(line)
                yield line
    except (gzip.BadGzipFile, EOFError, zlib.error) as e:
        raise DataError(f"{unit.path}: not a readable gzip file ({e})") from e


def _parquet(path: str):
    try:
        import pyarrow.parquet as pq
    except ImportError as e:
        raise DataError(f"{path}: reading .parquet needs pyarrow "
                        "(pip install 'io-first-lm[parquet]')") from e
    try:
        # An object through the storage seam: pyarrow would reach for a cloud client of its own.
        return pq.ParquetFile(storage.path(path).open("rb") if storage.is_remote(path) else path)
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
        size = file_size(unit.path)
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


def tokenizer_sample(unit: Unit, field: str, budget: int) -> list[str]:
    """The unit's first documents, until `budget` bytes of input are read (the document that
    crosses it included): the unit's share of the sample a tokenizer is trained on."""
    counts, texts = _Counts(), []
    for text, _ in iter_documents(unit, field, counts):
        texts.append(text)
        if counts.raw_bytes >= budget:
            break
    return texts


def sample_budget(units: list[Unit]) -> int:
    """Bytes of each unit's share of the tokenizer's training sample."""
    return max(1, TOKENIZER_SAMPLE_BYTES // max(1, len(units)))


def _batched(items: Iterator[Any], size: int) -> Iterator[list[Any]]:
    batch = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


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
    out_dir = storage.path(out)
    tokens = np.concatenate(pieces) if pieces else np.zeros(0, dtype)
    files = {"tokens": _npy_bytes(tokens), "docs": _npy_bytes(np.asarray(doc_ends, np.int64))}
    for kind, data in files.items():
        storage.write_atomically(shard_file(out_dir, unit.name, kind), data)
    # Both checksums of the bytes in hand: nothing just written (or uploaded) is read back.
    sums = {kind: checksums(data) for kind, data in files.items()}
    record = {
        "name": unit.name, "source": unit.path, "start": unit.start, "end": unit.end,
        "tokens": int(len(tokens)), "documents": counts.documents,
        "raw_bytes": counts.raw_bytes, "skipped_lines": counts.skipped_lines,
        "replaced_bytes": counts.replaced_bytes,
        "crc32": {kind: crc32 for kind, (crc32, _) in sums.items()},
        "crc32c": {kind: crc32c for kind, (_, crc32c) in sums.items()},
    }
    # The shard's done marker, written last.
    storage.write_atomically(out_dir / f"{unit.name}.json", json.dumps(record, sort_keys=True))
    return record


def _done(out: storage.Path, units: list[Unit]) -> dict[int, dict[str, Any]]:
    """The records of the units whose done marker is there and names the same input: one
    listing of `out`, then only the markers found are read (at once, from a bucket)."""
    present = storage.files_under(out)
    finished = [u for u in units if f"{u.name}.json" in present]
    records = {}
    for unit, data in zip(finished, read_files([out / f"{u.name}.json" for u in finished]),
                          strict=True):
        record = json.loads(data)
        if (record["source"], record["start"], record["end"]) == (unit.path, unit.start,
                                                                 unit.end):
            records[unit.index] = record
    return records


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
    whole = sum(u.path.endswith(".gz") for u in units)
    gz = f" ({whole} whole .jsonl.gz files: gzip cannot be cut)" if whole else ""
    return (f"files {files - len(pending_files)}/{files} | shards {len(records)}/{len(units)}"
            f"{gz} | {raw / 1e6:,.1f} MB | {rate / 1e6:.2f} MB/s | "
            f"{tokens / elapsed:,.0f} tokens/s | ETA {eta:.0f} s")


def prepare(sources: list[str], out: str | os.PathLike, tokenizer: str = "bytes",
            field: str = "text", workers: int | None = None, shard_mb: float = 64.0,
            train_tokenizer: int = 0, report=print, ray: str | None = None) -> dict[str, Any]:
    """Tokenize `sources` into shards under `out` (a directory or gs:// URL) and write its
    manifest; resumable.

    With `train_tokenizer` = V, first train a byte-level BPE of V tokens on a sample of
    the sources (once: a resumed run reuses it) and tokenize with it. With `ray` (a
    cluster's address, or "auto"), the units run as tasks of that Ray cluster.
    """
    out = _output_dir(out)
    cluster = _cluster(ray)
    files = find_sources(sources)
    units = plan_units(files, max(1, int(shard_mb * 1e6)))
    sizes = _sizes(files)
    # Tokenizer files live on local disk for the workers: one from a bucket is copied here.
    with tempfile.TemporaryDirectory(prefix="io-first-lm-prepare-") as scratch:
        if train_tokenizer:
            tokenizer = _trained_tokenizer(units, field, train_tokenizer, out, scratch, report,
                                           cluster)
        else:
            tokenizer = _local_file(tokenizer, scratch)
        manifest = _tokenize(units, files, sizes, tokenizer, field, workers, out, report,
                             cluster)
    _warn_about_input(manifest, sizes, report)
    return manifest


def _cluster(address: str | None):
    """None (worker processes of this host), or the Ray runner joined to the cluster at
    `address`: Ray is an optional extra, imported only when asked for."""
    if address is None:
        return None
    from input import ray_prepare

    ray_prepare.connect(address)
    return ray_prepare


def _output_dir(out: str | os.PathLike) -> storage.Path:
    root = storage.path(out)
    if not storage.is_remote(root):
        root.mkdir(parents=True, exist_ok=True)
    elif not bucket_exists(root):
        # Checked first, or the first upload would fail in a worker with a bare "not found".
        bucket = bucket_and_name(root)[0]
        raise DataError(f"output directory {root}: bucket gs://{bucket} does not exist "
                        "(create it first, in the region of the TPU VMs)")
    return root


def _local_file(spec: str, scratch: str) -> str:
    """`spec` itself, or for a gs:// URL a copy in `scratch` under the same file name."""
    if not storage.is_remote(spec):
        return spec
    local = pathlib.Path(scratch, storage.path(spec).name)
    local.write_bytes(storage.path(spec).read_bytes())
    return str(local)


def _sizes(files: list[str]) -> dict[str, int]:
    """Each file's size in bytes, asked for concurrently (a request each in a bucket)."""
    with ThreadPoolExecutor(PLAN_THREADS) as pool:
        return dict(zip(files, pool.map(file_size, files), strict=True))


def _tokenize(units: list[Unit], files: list[str], sizes: dict[str, int], tokenizer: str,
              field: str, workers: int | None, out: storage.Path, report,
              cluster) -> dict[str, Any]:
    """Tokenize the units without a done marker, then write the manifest of all."""
    records = _done(out, units)
    pending = [u for u in units if u.index not in records]
    report(f"{len(files)} files -> {len(units)} shards ({len(records)} already done)")
    unit_bytes = _unit_bytes(units, sizes)
    total_raw = sum(unit_bytes[u.index] for u in pending)
    started, raw, tokens, last = time.perf_counter(), 0, 0, 0.0
    jobs = [(u, tokenizer, field, str(out)) for u in pending]
    with _results(jobs, workers, cluster) as results:
        for record in results:
            records[_index(record)] = record
            raw, tokens = raw + record["raw_bytes"], tokens + record["tokens"]
            if time.perf_counter() - last > 1.0 or len(records) == len(units):
                last = time.perf_counter()
                report(_progress(units, records, raw, total_raw, tokens, started))
    manifest = _manifest(get_tokenizer(tokenizer), [records[u.index] for u in units], files)
    storage.write_atomically(out / MANIFEST, json.dumps(manifest, indent=1, sort_keys=True))
    return manifest


@contextlib.contextmanager
def _results(jobs: list[tuple[Unit, str, str, str]], workers: int | None,
             cluster) -> Iterator[Iterator[dict[str, Any]]]:
    """The records of `jobs` in the order they finish: from tasks of a Ray cluster, from a
    pool of worker processes, or from this process (one worker, or nothing to do)."""
    if cluster is not None:
        yield cluster.tokenize(jobs, workers)
        return
    workers = max(1, min(workers or os.cpu_count() or 1, len(jobs) or 1))
    pool = (multiprocessing.get_context("spawn").Pool(workers, initializer=_one_thread_each)
            if workers > 1 else _Serial())
    with pool:
        yield pool.imap_unordered(_work, jobs)


def _unit_bytes(units: list[Unit], sizes: dict[str, int]) -> dict[int, int]:
    """Bytes of input each unit covers (a parquet unit: its share of the file), for the ETA."""
    per_file = Counter(u.path for u in units)
    return {u.index: sizes[u.path] // per_file[u.path] if u.path.endswith(".parquet")
            else (u.end if u.end >= 0 else sizes[u.path]) - u.start for u in units}


def _trained_tokenizer(units: list[Unit], field: str, vocab_size: int, out: storage.Path,
                       scratch: str, report, cluster) -> str:
    """A local path to the BPE trained on the sources and kept in `out` (trained once)."""
    path = out / TRAINED_TOKENIZER
    if path.is_file():
        report(f"using the tokenizer trained earlier: {path}")
        return _local_file(os.fspath(path), scratch)
    budget = sample_budget(units)
    report(f"training a byte-level BPE of {vocab_size} tokens on the sources (at most the "
           f"first {budget / 1e6:,.1f} MB of each of the {len(units)} shards)")
    local = pathlib.Path(scratch, TRAINED_TOKENIZER)
    if cluster is None:
        texts = (text for unit in units for text in tokenizer_sample(unit, field, budget))
        train_bpe(texts, vocab_size, local)
    else:
        local.write_bytes(cluster.train_tokenizer(units, field, vocab_size, budget))
    storage.write_atomically(path, local.read_bytes())
    return os.fspath(local if storage.is_remote(path) else path)


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
              files: list[str]) -> dict[str, Any]:
    return {
        "format": FORMAT,
        "tokenizer": tokenizer.identity(),
        "token_dtype": token_dtype(tokenizer.vocab_size).name,
        "documents": sum(r["documents"] for r in records),
        "tokens": sum(r["tokens"] for r in records),
        "shards": records,
        "sources": [str(f) for f in files],
    }


def _warn_about_input(manifest: dict[str, Any], sizes: dict[str, int], report) -> None:
    for source in manifest["sources"]:
        if sizes[source] == 0:
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


def _is_a_source(name: str) -> bool:
    return storage.is_remote(name) or os.path.exists(name) or any(c in name for c in "*?[")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m input.prepare", description=__doc__.split(
        "\n")[0])
    parser.add_argument("sources", nargs="+",
                        help="files, directories or globs, local or gs://bucket/...")
    parser.add_argument("--out", required=True, help="output directory or gs://bucket/dir")
    parser.add_argument("--tokenizer", default="bytes",
                        help="'bytes', a tokenizer.json or a SentencePiece .model")
    parser.add_argument("--train-tokenizer", type=int, default=0, metavar="VOCAB_SIZE",
                        help="train a byte-level BPE on the sources and save it beside the data")
    parser.add_argument("--text-field", default="text", help="field of .jsonl records")
    parser.add_argument("--workers", type=int, default=None,
                        help="worker processes (default: all cores); with --ray, the most "
                             "tasks at once (default: twice the cluster's CPUs)")
    parser.add_argument("--shard-mb", type=float, default=64.0, help="raw MB per shard")
    parser.add_argument("--ray", nargs="?", const="auto", default=None, metavar="ADDRESS",
                        help="run the shards as tasks of a Ray cluster: its address, or none "
                             "to join the cluster this job was submitted to (RAY_ADDRESS) or "
                             "the one started on this host ('ray start --head')")
    args = parser.parse_args(argv)
    if args.ray is not None and _is_a_source(args.ray):
        parser.error(f"--ray took {args.ray!r}, a source, as the cluster's address: put --ray "
                     "after the sources, or write --ray=ADDRESS")
    try:
        manifest = prepare(args.sources, args.out, args.tokenizer, args.text_field,
                           args.workers, args.shard_mb, args.train_tokenizer, ray=args.ray)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {len(manifest['shards'])} shards, {manifest['documents']:,} documents, "
          f"{manifest['tokens']:,} tokens to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
