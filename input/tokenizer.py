"""Tokenizers: text <-> token ids. The byte-level default needs no files."""

from __future__ import annotations

from typing import Protocol

import numpy as np


class Tokenizer(Protocol):
    """What the pipeline and sampler need from a tokenizer."""

    name: str
    vocab_size: int
    eos_id: int
    pad_id: int

    def encode(self, text: str) -> np.ndarray: ...

    def decode(self, ids: np.ndarray | list[int]) -> str: ...


class ByteTokenizer:
    """UTF-8 bytes are ids 0..255; then end-of-document and padding."""

    name = "bytes"
    eos_id = 256
    pad_id = 257
    vocab_size = 258

    def encode(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int32)

    def decode(self, ids: np.ndarray | list[int]) -> str:
        data = bytes(int(i) for i in ids if 0 <= int(i) < 256)
        return data.decode("utf-8", errors="replace")


def get_tokenizer(name: str = "bytes") -> Tokenizer:
    if name != "bytes":
        raise ValueError(f"unknown tokenizer {name!r}; available: 'bytes'")
    return ByteTokenizer()
