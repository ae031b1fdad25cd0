"""Tokenizers, raw corpora, and the Grain training pipeline."""

from input.corpus import DataError, default_corpus, load_documents
from input.pipeline import (
    PackedRows,
    Source,
    Splits,
    data_sources,
    eval_batches,
    make_splits,
    token_stream,
    train_dataset,
    train_iterator,
)
from input.prepared import open_prepared
from input.tokenizer import ByteTokenizer, Tokenizer, get_tokenizer

__all__ = [
    "ByteTokenizer", "DataError", "PackedRows", "Source", "Splits", "Tokenizer", "data_sources",
    "default_corpus",
    "eval_batches", "get_tokenizer", "load_documents", "make_splits", "open_prepared",
    "token_stream", "train_dataset", "train_iterator",
]
