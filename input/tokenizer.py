"""Tokenizers: text <-> token ids. The byte-level default needs no files."""

from __future__ import annotations

import hashlib
from typing import Any, Protocol

import numpy as np


class Tokenizer(Protocol):
    """What the pipeline and sampler need from a tokenizer."""

    name: str
    vocab_size: int
    eos_id: int
    pad_id: int

    def encode(self, text: str) -> np.ndarray: ...

    def decode(self, ids: np.ndarray | list[int]) -> str: ...

    def identity(self) -> dict[str, Any]: ...


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

    def identity(self) -> dict[str, Any]:
        """Name, size and a hash of everything that decides the ids (kept in manifests)."""
        spec = f"utf-8 bytes 0-255; eos={self.eos_id}; pad={self.pad_id}".encode()
        return {"name": self.name, "vocab_size": self.vocab_size,
                "sha256": hashlib.sha256(spec).hexdigest()}


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits, else uint32."""
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


def get_tokenizer(name: str = "bytes") -> Tokenizer:
    if name != "bytes":
        raise ValueError(f"unknown tokenizer {name!r}; available: 'bytes'")
    return ByteTokenizer()
