"""Tokenizers: text <-> token ids.

`get_tokenizer(spec)` takes "bytes" (the default; needs no files), a Hugging Face
`tokenizer.json` (the Rust `tokenizers` library), or a SentencePiece `.model`.
Every tokenizer names an end-of-document id (the separator of packed rows) and
an identity (name, size, SHA-256 of what decides the ids) kept in manifests.
"""

from __future__ import annotations

import hashlib
import pathlib
from typing import Any, Protocol

import numpy as np

import storage
from input.corpus import DataError

EOS_CANDIDATES = ("<|endoftext|>", "</s>", "<eos>", "<|end_of_text|>")
PAD_CANDIDATES = ("<pad>", "<|pad|>", "[PAD]")


class Tokenizer(Protocol):
    """What the pipeline and sampler need from a tokenizer."""

    name: str
    vocab_size: int
    eos_id: int
    pad_id: int

    def encode(self, text: str) -> np.ndarray: ...

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]: ...

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

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        return [self.encode(text) for text in texts]

    def decode(self, ids: np.ndarray | list[int]) -> str:
        data = bytes(int(i) for i in ids if 0 <= int(i) < 256)
        return data.decode("utf-8", errors="replace")

    def identity(self) -> dict[str, Any]:
        """Name, size and a hash of everything that decides the ids (kept in manifests)."""
        spec = f"utf-8 bytes 0-255; eos={self.eos_id}; pad={self.pad_id}".encode()
        return {"name": self.name, "vocab_size": self.vocab_size,
                "sha256": hashlib.sha256(spec).hexdigest()}


def _file_identity(kind: str, path: pathlib.Path, vocab_size: int,
                   data: bytes) -> dict[str, Any]:
    """Kind, file name, size and content hash: the same for a file on disk and its copy in a
    bucket, so a dataset prepared from one checks against a run configured with the other."""
    return {"name": f"{kind}:{path.name}", "vocab_size": vocab_size,
            "sha256": hashlib.sha256(data).hexdigest()}


class HuggingFaceTokenizer:
    """A `tokenizer.json` run by the Rust `tokenizers` library."""

    def __init__(self, path: str | pathlib.Path):
        from tokenizers import Tokenizer as RustTokenizer

        self.path = storage.path(path)
        self._data = self.path.read_bytes()  # a bucket's object read once, as a file is
        self._tokenizer = RustTokenizer.from_str(self._data.decode("utf-8"))
        self.name = f"hf:{self.path.name}"
        self.vocab_size = self._tokenizer.get_vocab_size()
        self.eos_id = _first_id(self._tokenizer.token_to_id, EOS_CANDIDATES, self.path, "end")
        pad = [i for t in PAD_CANDIDATES if (i := self._tokenizer.token_to_id(t)) is not None]
        self.pad_id = pad[0] if pad else self.eos_id

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self._tokenizer.encode(text, add_special_tokens=False).ids, np.int32)

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        encodings = self._tokenizer.encode_batch(texts, add_special_tokens=False)
        return [np.asarray(e.ids, np.int32) for e in encodings]

    def decode(self, ids: np.ndarray | list[int]) -> str:
        return self._tokenizer.decode([int(i) for i in ids])

    def identity(self) -> dict[str, Any]:
        return _file_identity("hf", self.path, self.vocab_size, self._data)


class SentencePieceTokenizer:
    """A SentencePiece `.model` file."""

    def __init__(self, path: str | pathlib.Path):
        import sentencepiece

        self.path = storage.path(path)
        self._data = self.path.read_bytes()
        self._sp = sentencepiece.SentencePieceProcessor(model_proto=self._data)
        self.name = f"sentencepiece:{self.path.name}"
        self.vocab_size = self._sp.get_piece_size()
        self.eos_id = self._sp.eos_id()
        if self.eos_id < 0:
            raise DataError(f"tokenizer {self.path} has no end-of-sentence id (eos_id)")
        self.pad_id = self._sp.pad_id() if self._sp.pad_id() >= 0 else self.eos_id

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self._sp.encode(text), np.int32)

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        return [np.asarray(ids, np.int32) for ids in self._sp.encode(texts)]

    def decode(self, ids: np.ndarray | list[int]) -> str:
        return self._sp.decode([int(i) for i in ids])

    def identity(self) -> dict[str, Any]:
        return _file_identity("sentencepiece", self.path, self.vocab_size, self._data)


def _first_id(lookup, candidates: tuple[str, ...], path: pathlib.Path, what: str) -> int:
    for token in candidates:
        if (token_id := lookup(token)) is not None:
            return token_id
    raise DataError(f"tokenizer {path} has no {what}-of-document token (looked for "
                    f"{', '.join(candidates)})")


def get_tokenizer(spec: str = "bytes") -> Tokenizer:
    """"bytes", a path to a Hugging Face tokenizer.json, or a SentencePiece .model."""
    if spec == "bytes":
        return ByteTokenizer()
    path = storage.path(spec)
    if not path.is_file():
        raise DataError(f"data.tokenizer {spec!r}: neither 'bytes' nor an existing file")
    if path.suffix == ".json":
        return HuggingFaceTokenizer(path)
    if path.suffix == ".model":
        return SentencePieceTokenizer(path)
    raise DataError(f"data.tokenizer {spec!r}: expected 'bytes', a tokenizer.json or a "
                    "SentencePiece .model")


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits, else uint32."""
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


def train_bpe(texts, vocab_size: int, path: str | pathlib.Path) -> HuggingFaceTokenizer:
    """Train a byte-level BPE on an iterator of texts and save it as a tokenizer.json."""
    from tokenizers import Tokenizer as RustTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tokenizer = RustTokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[EOS_CANDIDATES[0], PAD_CANDIDATES[0]],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(texts, trainer=trainer)
    tokenizer.save(str(path))
    return HuggingFaceTokenizer(path)
