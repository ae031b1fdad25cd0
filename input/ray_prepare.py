"""The Ray runner of `input.prepare` (`--ray [ADDRESS]`): its work units as tasks of a cluster.

The driver (the host running `python -m input.prepare ... --ray`) plans the units and
writes the manifest exactly as a local prepare does; only tokenizing moves: each unit is
one task that reads its byte range of a source through the storage seam, tokenizes it and
writes its shard and done marker there (so sources and output are in a bucket every node
reads). A task whose worker or node dies is run again by Ray, and every unit's output
depends only on its input, so the result is byte-identical; a driver killed and started
again finds the done markers and submits only the rest.

Nodes need this package and its dependencies (the cluster's image, or `ray job submit
--working-dir .` with the `[ray]` extra installed) and credentials for the bucket.
"""

from __future__ import annotations

import hashlib
import os
import pathlib
import tempfile
from collections.abc import Iterator
from typing import Any

from input.corpus import DataError

try:
    import ray
except ImportError as e:  # an optional extra: only --ray needs it
    raise DataError("--ray needs Ray: pip install 'io-first-lm[ray]'") from e

from input.prepare import Unit, _one_thread_each, tokenize_unit, tokenizer_sample
from input.tokenizer import train_bpe

TASK_TRIES = 4
"""How many times Ray runs a unit whose worker process or node died (not one whose input is
bad: that error is the unit's answer, the same on every try)."""


def connect(address: str) -> None:
    """Join the Ray cluster at `address`; "auto": the one this job was submitted to
    (RAY_ADDRESS) or the one started on this host. A process already joined stays so."""
    if ray.is_initialized():
        return
    try:
        ray.init(address=address, logging_level="WARNING")
    except (ConnectionError, RuntimeError, ValueError) as e:
        raise DataError(f"--ray {address}: no Ray cluster to join there ({e}); start one "
                        "with 'ray start --head' or give the address of its head") from e


class _TokenizerFile:
    """A tokenizer spec as the driver has it ("bytes", or a file on its disk) that a task on
    any node turns into a local file of the same name (the manifest's identity names it)."""

    def __init__(self, spec: str):
        self.spec = spec
        self.data = None if spec == "bytes" else pathlib.Path(spec).read_bytes()

    def local(self) -> str:
        if self.data is None:
            return self.spec
        digest = hashlib.sha256(self.data).hexdigest()[:16]
        path = pathlib.Path(tempfile.gettempdir(), "io-first-lm-tokenizers", digest,
                            pathlib.Path(self.spec).name)
        if not path.is_file():  # once per node: written aside, then renamed into place
            path.parent.mkdir(parents=True, exist_ok=True)
            aside = path.with_name(f".{path.name}.{os.getpid()}")
            aside.write_bytes(self.data)
            os.replace(aside, path)
        return str(path)


@ray.remote(num_cpus=1, max_retries=TASK_TRIES - 1)
def _tokenize_task(unit: Unit, tokenizer: _TokenizerFile, field: str, out: str) -> dict:
    _one_thread_each()
    return tokenize_unit(unit, tokenizer.local(), field, out)


@ray.remote(num_cpus=1, max_retries=TASK_TRIES - 1)
def _sample_task(unit: Unit, field: str, budget: int) -> list[str]:
    return tokenizer_sample(unit, field, budget)


@ray.remote(num_cpus=1, max_retries=TASK_TRIES - 1)
def _train_task(vocab_size: int, *samples: list[str]) -> bytes:
    with tempfile.TemporaryDirectory() as scratch:
        path = pathlib.Path(scratch, "tokenizer.json")
        train_bpe((text for sample in samples for text in sample), vocab_size, path)
        return path.read_bytes()


def tokenize(jobs: list[tuple[Unit, str, str, str]],
             workers: int | None) -> Iterator[dict[str, Any]]:
    """The records of `jobs` ((unit, tokenizer, field, out), as the local pool takes them),
    in the order their tasks finish; at most `workers` tasks (default: twice the cluster's
    CPUs, so that none idles) are submitted at once."""
    if not jobs:
        return
    tokenizer = ray.put(_TokenizerFile(jobs[0][1]))
    limit = workers or 2 * max(1, int(ray.cluster_resources().get("CPU", 1)))
    queued, running = list(reversed(jobs)), []
    try:
        while queued or running:
            while queued and len(running) < limit:
                unit, _, field, out = queued.pop()
                running.append(_tokenize_task.remote(unit, tokenizer, field, out))
            done, running = ray.wait(running, num_returns=1)
            yield _answer(done[0])
    finally:
        for task in running:  # an error, or the driver stopping: the rest is not wanted
            ray.cancel(task)


def train_tokenizer(units: list[Unit], field: str, vocab_size: int, budget: int) -> bytes:
    """A byte-level BPE's tokenizer.json, trained by a task on the first `budget` bytes of
    every unit (read by a task each): the sample and order a local prepare trains on."""
    samples = [_sample_task.remote(unit, field, budget) for unit in units]
    return _answer(_train_task.remote(vocab_size, *samples))


def _answer(task: ray.ObjectRef) -> Any:
    """A task's result; a task's error is raised as the local runner raises it (a DataError
    naming the file, ...), with Ray's report of where it happened as its cause."""
    try:
        return ray.get(task)
    except ray.exceptions.RayTaskError as e:
        raise e.cause from e
