"""Keep the next global batches ready on the devices while the current step runs."""

from __future__ import annotations

import dataclasses
import queue
import threading
from typing import Any

import grain
from jax.sharding import NamedSharding

import sharding


@dataclasses.dataclass(frozen=True)
class DataPosition:
    """Where a run is in its training data: batches consumed since the start of training.
    Saved with every checkpoint; a resumed run reads on from there."""

    next_index: int = 0

    def to_dict(self) -> dict[str, int]:
        return {"next_index": self.next_index}

    @classmethod
    def from_dict(cls, saved: dict[str, Any]) -> DataPosition:
        return cls(int(saved["next_index"]))


class DeviceFeed:
    """A background thread turns host batches into global arrays, `depth` steps ahead.

    Each item comes with the data position just after its batch, so a checkpoint
    saved after a step records exactly the batches that step consumed, however
    far the feed has read ahead. `batches` must start at `start`.
    """

    def __init__(self, batches: grain.DatasetIterator, batch_sharding: NamedSharding,
                 depth: int = 2, start: DataPosition = DataPosition()):
        self._batches = batches
        self._next_index = start.next_index
        self._sharding = batch_sharding
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._fill, name="device-feed", daemon=True)
        self._thread.start()

    def _fill(self) -> None:
        try:
            while not self._stop.is_set():
                host = next(self._batches)
                self._next_index += 1
                item = (sharding.to_global(host, self._sharding), DataPosition(self._next_index))
                while not self._stop.is_set():
                    try:
                        self._queue.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
        except BaseException as e:  # surfaces in the training thread at the next batch
            self._queue.put(e)

    def __next__(self) -> tuple[dict[str, Any], DataPosition]:
        item = self._queue.get()
        if isinstance(item, BaseException):
            raise item
        return item

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5.0)

    def __enter__(self) -> DeviceFeed:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
