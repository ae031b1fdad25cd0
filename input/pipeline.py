"""The Grain pipeline: documents -> packed fixed-length rows -> shuffled, batched, prefetched.

Documents are joined into one token stream with an end-of-document id after
each, and cut into rows of seq_len + 1 tokens that overlap by one, so every
token is an input once and a target once per epoch. The last row is padded
and its padding carries zero loss weight.

The global batch at step k is a pure function of (rows, seed, k): rows are
shuffled per epoch, grouped into per-process slices of the global batch, and
process p takes every P-th slice. Changing the number of processes changes
which process reads a row, never which rows form a batch.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import os
from collections.abc import Iterator, Sequence

import grain
import numpy as np

from configs.schema import DataConfig
from input.corpus import DataError, load_documents
from input.prepared import StreamWindow, is_prepared, open_prepared
from input.tokenizer import Tokenizer

Batch = dict[str, np.ndarray]


class PackedRows:
    """Random access to fixed-length rows cut from a token stream (a Grain data source).

    Each row also carries, per input position, its document's number within the
    row (`segment_ids`, 1-based; 0 is padding) and its position inside that
    document (`positions`), so attention never crosses a document boundary and
    rotary positions restart with every document. A document starts after each
    end-of-document token.
    """

    def __init__(self, stream: np.ndarray, seq_len: int, pad_id: int, eos_id: int):
        if len(stream) < 2:
            raise DataError("the token stream has fewer than 2 tokens; nothing to train on")
        self.stream = stream
        self.seq_len = seq_len
        self.pad_id = pad_id
        self.eos_id = eos_id

    @property
    def remote(self) -> bool:
        """Whether a row is a request to a bucket (a round trip) rather than a memory read."""
        return getattr(self.stream, "remote", False)

    def __len__(self) -> int:
        return -(-(len(self.stream) - 1) // self.seq_len)

    def __getitem__(self, index: int) -> Batch:
        if not 0 <= index < len(self):
            raise IndexError(f"row {index} out of range [0, {len(self)})")
        start = index * self.seq_len
        chunk = self.stream[start:start + self.seq_len + 1]
        row = np.full(self.seq_len + 1, self.pad_id, dtype=np.int32)
        row[:len(chunk)] = chunk
        weights = np.zeros(self.seq_len, dtype=np.float32)
        weights[:len(chunk) - 1] = 1.0
        inputs = row[:-1]
        segment_ids, positions = document_layout(inputs, self.eos_id)
        segment_ids[len(chunk) - 1:] = 0  # padding belongs to no document
        return {"inputs": inputs, "targets": row[1:], "weights": weights,
                "segment_ids": segment_ids, "positions": positions}


def document_layout(inputs_L: np.ndarray, eos_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Per position: 1-based document number within the row, and position in that document."""
    index_L = np.arange(len(inputs_L), dtype=np.int32)
    starts_L = np.ones(len(inputs_L), dtype=bool)
    starts_L[1:] = inputs_L[:-1] == eos_id
    segment_ids_L = np.cumsum(starts_L, dtype=np.int32)
    start_of_segment_L = np.maximum.accumulate(np.where(starts_L, index_L, 0))
    return segment_ids_L, index_L - start_of_segment_L


@dataclasses.dataclass(frozen=True)
class Splits:
    train: PackedRows
    eval: PackedRows | None
    """None when nothing is held out (data.eval_fraction 0)."""


def token_stream(documents: list[str], tokenizer: Tokenizer) -> np.ndarray:
    """All documents as one int32 stream, each followed by the end-of-document id."""
    eos = np.array([tokenizer.eos_id], dtype=np.int32)
    parts = []
    for doc in documents:
        parts += [tokenizer.encode(doc).astype(np.int32), eos]
    return np.concatenate(parts) if parts else np.zeros(0, np.int32)


@dataclasses.dataclass(frozen=True)
class Source:
    """Named rows with their weight: their share of the training mixture, or of the mean
    held-out loss."""

    name: str
    rows: PackedRows
    weight: float


@dataclasses.dataclass(frozen=True)
class DataSources:
    """The rows a run trains on, and the rows it evaluates on."""

    train: tuple[Source, ...]
    heldout: tuple[Source, ...]
    """Empty when nothing is held out: data.eval_fraction 0 and no data.eval_path."""


def data_sources(cfg: DataConfig, tokenizer: Tokenizer) -> DataSources:
    """What the run trains on and what it evaluates on.

    Training: `data.path` as one source, or each dataset of `data.mixture` with its
    weight. Held out: with `data.eval_path`, that data alone (the training datasets are
    used whole); otherwise each training dataset's held-out split, with its weight.
    """
    if cfg.mixture:
        datasets = [(path, path, weight) for path, weight in cfg.mixture]
        for path, _, _ in datasets:
            if not is_prepared(path):
                raise DataError(
                    f"data.mixture: {path!r} is not a prepared dataset (no manifest.json)")
    else:
        datasets = [(cfg.path or "default corpus", cfg.path, 1.0)]
    heldout = [Source(cfg.eval_path, eval_path_rows(cfg, tokenizer), 1.0)] if cfg.eval_path else []
    # eval_path replaces every dataset's own held-out split.
    one = dataclasses.replace(cfg, mixture=(), eval_path="",
                              eval_fraction=0.0 if cfg.eval_path else cfg.eval_fraction)
    train = []
    for name, path, weight in datasets:
        splits = make_splits(dataclasses.replace(one, path=path), tokenizer)
        train.append(Source(name, splits.train, weight))
        if splits.eval is not None:
            heldout.append(Source(name, splits.eval, weight))
    return DataSources(tuple(train), tuple(heldout))


def make_splits(cfg: DataConfig, tokenizer: Tokenizer) -> Splits:
    """Train and held-out rows of `data.path`.

    With `data.eval_path`, all of data.path trains and the held-out rows are eval_path's.
    Otherwise raw text: every round(1/eval_fraction)-th document is held out (with too few
    documents, the last eval_fraction of the token stream); a prepared dataset: the last
    eval_fraction of its token stream. eval_fraction 0 holds out nothing.
    """
    def rows(stream) -> PackedRows:
        return PackedRows(stream, cfg.seq_len, tokenizer.pad_id, tokenizer.eos_id)

    if cfg.eval_path:
        heldout = eval_path_rows(cfg, tokenizer)
        whole = dataclasses.replace(cfg, eval_path="", eval_fraction=0.0)
        return Splits(make_splits(whole, tokenizer).train, heldout)
    if is_prepared(cfg.path):
        stream = open_prepared(cfg.path, tokenizer, cfg.verify_checksums)
        if not cfg.eval_fraction:
            return Splits(rows(stream), None)
        cut = len(stream) - max(cfg.seq_len + 1, int(len(stream) * cfg.eval_fraction))
        if cut < 2:
            raise DataError(f"{cfg.path}: {len(stream)} tokens are too few for a train split "
                            f"and a held-out split of seq_len {cfg.seq_len}")
        return Splits(rows(StreamWindow(stream, 0, cut)),
                      rows(StreamWindow(stream, cut, len(stream))))
    documents = load_documents(cfg.path, cfg.jsonl_field)
    if not cfg.eval_fraction:
        return Splits(rows(token_stream(documents, tokenizer)), None)
    every = max(2, round(1 / cfg.eval_fraction))
    held_out = documents[::every]
    kept = [d for i, d in enumerate(documents) if i % every]
    if held_out and kept:
        return Splits(rows(token_stream(kept, tokenizer)), rows(token_stream(held_out, tokenizer)))
    stream = token_stream(documents, tokenizer)
    cut = len(stream) - max(2, int(len(stream) * cfg.eval_fraction))
    return Splits(rows(stream[:cut]), rows(stream[cut:]))


def eval_path_rows(cfg: DataConfig, tokenizer: Tokenizer) -> PackedRows:
    """All of `data.eval_path` as rows, checked like training data; errors name the field."""
    path = cfg.eval_path
    if is_prepared(path):
        try:
            stream = open_prepared(path, tokenizer, cfg.verify_checksums)
        except DataError as e:
            raise DataError(f"data.eval_path {path!r}: {e}") from e
    else:
        stream = token_stream(load_documents(path, cfg.jsonl_field, key="data.eval_path"),
                              tokenizer)
    return PackedRows(stream, cfg.seq_len, tokenizer.pad_id, tokenizer.eos_id)


def train_dataset(rows: PackedRows | Sequence[tuple[PackedRows, float]], *, seed: int,
                  global_batch: int, process_index: int = 0,
                  process_count: int = 1) -> grain.MapDataset:
    """This process's batches, in step order: element k is its share of global batch k.

    `rows` is one dataset, or several (rows, weight) pairs that are each
    shuffled per epoch and then mixed row by row in proportion to the weights.
    """
    if global_batch % process_count:
        raise ValueError(
            f"train.batch_size ({global_batch}) must divide over {process_count} processes")
    single = isinstance(rows, PackedRows)
    parts = [(rows, 1.0)] if single else list(rows)
    remote = any(part.remote for part, _ in parts)
    epochs = [_epochs(part, (seed + i) % 2**32, remote) for i, (part, _) in enumerate(parts)]
    ds = epochs[0] if single else grain.MapDataset.mix(epochs, [weight for _, weight in parts])
    ds = ds.batch(global_batch // process_count, drop_remainder=True,
                  batch_fn=_stack_fetched if remote else None)
    return ds[process_index::process_count]


def _epochs(rows: PackedRows, seed: int, ahead: bool) -> grain.MapDataset:
    """Endless epochs of the rows, each in its own shuffled order; with `ahead`, each row is
    a future of it (see `FetchedAhead`)."""
    source = FetchedAhead(rows) if ahead else rows
    return grain.MapDataset.source(source).shuffle(seed=seed).repeat(None)


ROWS_IN_FLIGHT = 64
"""Row reads a process keeps in flight from a bucket (each a ranged request)."""
_pools: dict[int, concurrent.futures.ThreadPoolExecutor] = {}


def _pool() -> concurrent.futures.ThreadPoolExecutor:
    # One per process: a Grain worker process starts its own rather than inherit threads.
    if os.getpid() not in _pools:
        _pools[os.getpid()] = concurrent.futures.ThreadPoolExecutor(
            ROWS_IN_FLIGHT, thread_name_prefix="row-reads")
    return _pools[os.getpid()]


class FetchedAhead:
    """Rows whose reading starts when they are asked for: `rows[i]` is a future. A row read
    from a bucket is a round trip of its own (past the block cache), so the rows of a batch
    are requested together rather than one after another; `_stack_fetched` waits for them."""

    def __init__(self, rows: PackedRows):
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> concurrent.futures.Future:
        return _pool().submit(self.rows.__getitem__, index)


def _stack_fetched(rows: Sequence[concurrent.futures.Future]) -> Batch:
    fetched = [row.result() for row in rows]
    return {name: np.stack([row[name] for row in fetched]) for name in fetched[0]}


def train_iterator(ds: grain.MapDataset, cfg: DataConfig,
                   start: int = 0) -> grain.DatasetIterator:
    """Batches `start`, `start + 1`, ... built ahead by Grain threads (and worker processes).

    The data position is just the number of batches consumed, so a run resumes
    by starting here, with any number of workers; Grain's own iterator state
    would tie a resume to the worker count.
    """
    options = grain.ReadOptions(num_threads=cfg.read_threads,
                                prefetch_buffer_size=cfg.prefetch_batches)
    batches = ds[start:].to_iter_dataset(options)
    if cfg.workers:
        from absl import flags

        if not flags.FLAGS.is_parsed():  # Grain's workers read absl flags
            flags.FLAGS.mark_as_parsed()
        batches = batches.mp_prefetch(grain.MultiprocessingOptions(num_workers=cfg.workers))
    return iter(batches)


def eval_batches(rows: PackedRows, batch_size: int, max_batches: int) -> Iterator[Batch]:
    """Held-out rows in order, up to max_batches batches of them (-1: all rows); a short
    last batch is filled with zero-weight rows."""
    count = len(rows) if max_batches < 0 else min(len(rows), batch_size * max_batches)
    for first in range(0, count, batch_size):
        picked = [rows[i] for i in range(first, min(first + batch_size, len(rows)))]
        filler = {k: np.zeros_like(v) for k, v in picked[0].items()}
        picked += [filler] * (batch_size - len(picked))
        yield {k: np.stack([row[k] for row in picked]) for k in picked[0]}
