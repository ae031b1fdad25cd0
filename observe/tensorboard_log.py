"""`<run_dir>/tensorboard/`: every scalar of the metrics.jsonl records as TensorBoard events.

Each writer (one per invocation) starts a new event file, so a restarted run adds to the
history and TensorBoard merges the files of the directory.

The event file is written here, without a TensorBoard library: the format is small and
stable (TFRecord framing around `Event` protocol buffers), and the usual writers
import TensorFlow or PyTorch, seconds of start-up on every (re)start of a run.
"""

from __future__ import annotations

import os
import pathlib
import struct
import time
from typing import Any

import storage

DIRNAME = "tensorboard"
NOT_SCALARS = ("step", "time", "dataset")


def scalars(record: dict[str, Any]) -> dict[str, float]:
    """Tag -> value: `train/<name>` for a step record, `eval/<dataset>/<name>` for an eval."""
    prefix = f"eval/{record['dataset']}" if "dataset" in record else "train"
    return {f"{prefix}/{name}": float(value) for name, value in record.items()
            if name not in NOT_SCALARS and isinstance(value, (int, float))}


class TensorBoardLog:
    """Writes records as events: on disk each is flushed at once so a live TensorBoard sees
    it; in a bucket, as metrics.jsonl is (`storage.AppendableFile`)."""

    def __init__(self, run_dir: str | pathlib.Path):
        self.directory = storage.path(run_dir) / DIRNAME
        self._file: storage.AppendableFile | None = None

    def write(self, record: dict[str, Any]) -> None:
        values = b"".join(_field(1, _summary_value(tag, value))
                          for tag, value in scalars(record).items())
        event = (_double(1, record.get("time", time.time())) + _varint_field(2, int(record["step"]))
                 + _field(5, values))
        self._write(event)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def _write(self, event: bytes) -> None:
        if self._file is None:
            # Opened on the first record, so an invocation that logs nothing leaves no
            # file; pid and nanoseconds keep two writers of one second apart.
            name = f"events.out.tfevents.{time.time():.0f}.{os.getpid()}.{time.time_ns()}"
            self._file = storage.AppendableFile(self.directory / name)
            self._file.append(_record(_double(1, time.time()) + _field(3, b"brain.Event:2")))
        self._file.append(_record(event))


# TFRecord framing: length, its masked CRC32C, the data, its masked CRC32C.
def _record(data: bytes) -> bytes:
    length = struct.pack("<Q", len(data))
    return (length + struct.pack("<I", _masked_crc(length)) + data
            + struct.pack("<I", _masked_crc(data)))


def _masked_crc(data: bytes) -> int:
    crc = _crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _crc32c_table() -> list[int]:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
        table.append(crc)
    return table


_CRC32C_TABLE = _crc32c_table()


def _crc32c(data: bytes) -> int:
    crc = 0xFFFFFFFF
    for byte in data:
        crc = _CRC32C_TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


# Protocol-buffer fields of Event {1: wall_time double, 2: step int64, 3: file_version
# string, 5: summary} and Summary.Value {1: tag string, 2: simple_value float}.
def _summary_value(tag: str, value: float) -> bytes:
    return _field(1, tag.encode()) + _key(2, 5) + struct.pack("<f", value)


def _double(number: int, value: float) -> bytes:
    return _key(number, 1) + struct.pack("<d", value)


def _varint_field(number: int, value: int) -> bytes:
    return _key(number, 0) + _varint(value)


def _field(number: int, payload: bytes) -> bytes:
    return _key(number, 2) + _varint(len(payload)) + payload


def _key(number: int, wire_type: int) -> bytes:
    return _varint(number << 3 | wire_type)


def _varint(value: int) -> bytes:
    value &= (1 << 64) - 1  # negative int64s are ten-byte varints
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)
