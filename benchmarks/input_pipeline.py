"""Input benchmark: each figure next to its reference, measured in one run.

    python benchmarks/input_pipeline.py [--mb 40] [--dir /tmp/input-bench]

1. prepare throughput (MB/s of raw text, tokens/s) with a byte-level BPE, next to
   the same `tokenizers` library encoding the same text in one batch call;
2. training-pipeline tokens/s from the prepared dataset, next to the tokens/s the
   tiny preset's train step consumes on this machine;
3. data wait as % of step time over a 200-step tiny run on the prepared dataset.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import shutil
import statistics
import subprocess
import sys
import time

REPO = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from train import process  # noqa: E402

with process.started():  # as `python -m train` sets up its process
    import configs
    from input import (
        default_corpus,
        get_tokenizer,
        make_splits,
        train_dataset,
        train_iterator,
    )
    from input.tokenizer import train_bpe
    from train import run


def write_corpus(directory: pathlib.Path, megabytes: float) -> list[str]:
    """JSONL shards of the default corpus, repeated with numbered copies up to `megabytes`."""
    directory.mkdir(parents=True)
    topics, documents, size, part = default_corpus(), [], 0, 0
    while size < megabytes * 1e6:
        with open(directory / f"part-{part:03d}.jsonl", "w") as f:
            for i, text in enumerate(topics):
                doc = f"copy {part} topic {i}\n{text}"
                f.write(json.dumps({"text": doc}) + "\n")
                documents.append(doc)
                size += len(doc.encode())
        part += 1
    return documents


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=float, default=40.0)
    parser.add_argument("--dir", default="/tmp/input-bench")
    parser.add_argument("--vocab", type=int, default=8192)
    args = parser.parse_args()
    work = pathlib.Path(args.dir)
    shutil.rmtree(work, ignore_errors=True)
    documents = write_corpus(work / "raw", args.mb)
    raw_mb = sum(len(d.encode()) for d in documents) / 1e6
    tokenizer = train_bpe(iter(default_corpus()), args.vocab, work / "tokenizer.json")
    cores = os.cpu_count() or 1
    print(f"corpus: {raw_mb:.1f} MB in {len(documents):,} documents; byte-level BPE of "
          f"{args.vocab} tokens; {cores} cores")

    started = time.perf_counter()
    encoded = tokenizer.encode_batch(documents)
    raw_seconds = time.perf_counter() - started
    tokens = sum(len(e) for e in encoded)
    del encoded
    # As users run it: its own process, so the workers it spawns start light.
    command = [sys.executable, "-m", "input.prepare", str(work / "raw"), "--out",
               str(work / "prepared"), "--tokenizer", str(work / "tokenizer.json"),
               "--workers", str(cores), "--shard-mb", "2"]
    started = time.perf_counter()
    subprocess.run(command, cwd=REPO, check=True, capture_output=True)
    prepare_seconds = time.perf_counter() - started
    manifest = json.loads((work / "prepared" / "manifest.json").read_text())
    print("\n1. prepare throughput")
    print(f"   ours {raw_mb / prepare_seconds:.2f} MB/s, "
          f"{manifest['tokens'] / prepare_seconds:,.0f} tokens/s | tokenizers encode_batch "
          f"{raw_mb / raw_seconds:.2f} MB/s, {tokens / raw_seconds:,.0f} tokens/s | "
          f"ratio {raw_seconds / prepare_seconds:.2f} (target >= 0.7)")

    config = configs.load("tiny", [f"data.path={work / 'prepared'}",
                                   f"data.tokenizer={work / 'tokenizer.json'}",
                                   f"model.vocab_size={args.vocab}",
                                   f"run_dir={work / 'run'}", "train.steps=200",
                                   "train.log_every=50", "checkpoint.every=0",
                                   "train.eval_batches=1", "train.compile_cache=false"])
    splits = make_splits(config.data, get_tokenizer(config.data.tokenizer))
    dataset = train_dataset(splits.train, seed=0, global_batch=config.train.batch_size)
    with_workers = dataclasses.replace(config.data, workers=cores)
    iterator = train_iterator(dataset, with_workers)
    next(iterator)
    rates = []
    for _ in range(3):
        started, batches = time.perf_counter(), 300
        for _ in range(batches):
            next(iterator)
        elapsed = time.perf_counter() - started
        rates.append(batches * config.train.batch_size * config.data.seq_len / elapsed)
    pipeline = statistics.median(rates)

    result = run(config)
    step_tokens = (result.final_step - 1) * config.train.batch_size * config.data.seq_len
    consumed = step_tokens / result.train_seconds
    print(f"\n2. training pipeline from the prepared dataset ({cores} Grain workers)")
    print(f"   pipeline {pipeline:,.0f} tokens/s | tiny train step consumes {consumed:,.0f} "
          f"tokens/s | ratio {pipeline / consumed:.1f}x (target >= 20x)")
    print("\n3. data wait over a 200-step tiny run")
    print(f"   {1e3 * result.data_wait_seconds / result.final_step:.2f} ms a step = "
          f"{100 * result.data_wait_seconds / result.train_seconds:.2f}% of step time "
          "(target < 1%)")


if __name__ == "__main__":
    main()
