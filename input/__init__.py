"""Tokenizers, raw corpora, offline prepare, and the Grain training pipeline.

The Grain pipeline is imported on first use, so `python -m input.prepare` and its
worker processes start without loading Grain.
"""

import importlib

from input.corpus import DataError, default_corpus, load_documents
from input.prepared import open_prepared
from input.tokenizer import ByteTokenizer, Tokenizer, get_tokenizer

_PIPELINE = ("DataSources", "PackedRows", "Source", "Splits", "data_sources", "eval_batches",
             "eval_path_rows", "make_splits", "token_stream", "train_dataset", "train_iterator")

__all__ = ["ByteTokenizer", "DataError", "Tokenizer", "default_corpus", "get_tokenizer",
           "load_documents", "open_prepared", *_PIPELINE]


def __getattr__(name: str):
    if name in _PIPELINE:
        return getattr(importlib.import_module("input.pipeline"), name)
    raise AttributeError(f"module 'input' has no attribute {name!r}")
