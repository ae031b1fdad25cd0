"""`<run_dir>/metrics.jsonl`: one JSON object per logged step and per evaluation; the same
scalars go to TensorBoard event files in `<run_dir>/tensorboard/`.

A restarted run appends, so the file holds the whole history of the run. In a gs:// run
dir both files grow by objects composed onto them (`storage.AppendableFile`): records
reach the bucket at most `storage.appendable.FLUSH_SECONDS` (10 s) after they were
written and at once on `close` (the run's end, a SIGTERM'd run's included), so a SIGTERM
loses nothing and a kill -9 can lose the last FLUSH_SECONDS of records. On disk every
record is in the file as soon as it is written, as before.
"""

from __future__ import annotations

import json
import pathlib
import time
from typing import Any

import jax

import storage
from observe.tensorboard_log import TensorBoardLog

FILENAME = "metrics.jsonl"


class MetricsLog:
    def __init__(self, run_dir: str | pathlib.Path):
        self.path = storage.path(run_dir) / FILENAME
        self._file = storage.AppendableFile(self.path)
        self.tensorboard = TensorBoardLog(run_dir)

    def write(self, record: dict[str, Any]) -> None:
        if jax.process_index() != 0:
            return
        record = {**record, "time": round(time.time(), 3)}
        self._file.append((json.dumps(record) + "\n").encode())
        self.tensorboard.write(record)

    def close(self) -> None:
        self._file.close()
        self.tensorboard.close()

    def __enter__(self) -> MetricsLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read(run_dir: str | pathlib.Path) -> list[dict[str, Any]]:
    """Every record of a run, oldest first."""
    path = storage.path(run_dir) / FILENAME
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
