"""Input benchmark: each figure next to its reference, measured in one run.

    python benchmarks/input_pipeline.py [--mb 40] [--dir /tmp/input-bench]

1. prepare throughput (MB/s of raw text, tokens/s) with a byte-level BPE, next to
   the same `tokenizers` library encoding the same text in one batch call;
2. training-pipeline tokens/s from the prepared dataset, next to the tokens/s the
   tiny preset's train step consumes on this machine;
3. data wait as % of step time over a 200-step tiny run on the prepared dataset.

    python benchmarks/input_pipeline.py --storage gs [--mb 10] [--delay-ms 50]

compares, side by side, the same prepared dataset read from local disk (memory maps) and
from a bucket of a local fake-gcs-server behind a proxy adding `--delay-ms` to every
request (ranged reads: with the block LRU holding the dataset; with a 1 MiB LRU, so most
rows are a request of their own, at the default 2 Grain read threads and at 16): pipeline
rows/s once warm, and the data wait of a tiny-preset run (the loop's own data-wait metric,
median over its log intervals after the first) in ms and as a fraction of its step time.
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
    parser.add_argument("--storage", choices=["local", "gs"], default="local")
    parser.add_argument("--delay-ms", type=float, default=50.0)
    parser.add_argument("--measure", help=argparse.SUPPRESS)  # a child of --storage gs
    parser.add_argument("--upload-from", help=argparse.SUPPRESS)
    parser.add_argument("--cache-mb", type=float, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--read-threads", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        return print(json.dumps(measure(args)))
    if args.storage == "gs":
        return compare_storage(args)
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
                                   "train.eval_batches=1", "train.compile_cache=false"]
                           + ([f"data.read_threads={args.read_threads}"] if args.read_threads
                              else []))
    splits = make_splits(config.data, get_tokenizer(config.data.tokenizer))
    dataset = train_dataset(splits.train, seed=0, global_batch=config.train.batch_size)
    with_workers = dataclasses.replace(config.data, workers=cores)
    iterator = train_iterator(dataset, with_workers)
    next(iterator)
    pipeline = batches_per_s(iterator, 300) * config.train.batch_size * config.data.seq_len

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


def batches_per_s(iterator, batches: int, rounds: int = 3) -> float:
    """Median over `rounds` of the batches a second the iterator gives, `batches` at a time."""
    rates = []
    for _ in range(rounds):
        started = time.perf_counter()
        for _ in range(batches):
            next(iterator)
        rates.append(batches / (time.perf_counter() - started))
    return statistics.median(rates)


def prepare_small(args) -> pathlib.Path:
    """A corpus of `--mb`, its BPE and its prepared dataset under --dir; the work dir."""
    work = pathlib.Path(args.dir)
    shutil.rmtree(work, ignore_errors=True)
    write_corpus(work / "raw", args.mb)
    train_bpe(iter(default_corpus()), args.vocab, work / "tokenizer.json")
    subprocess.run([sys.executable, "-m", "input.prepare", str(work / "raw"), "--out",
                    str(work / "prepared"), "--tokenizer", str(work / "tokenizer.json"),
                    "--workers", str(os.cpu_count() or 1), "--shard-mb", "2"],
                   cwd=REPO, check=True, capture_output=True)
    return work


def compare_storage(args) -> None:
    """Local disk vs the same dataset in a bucket behind a delaying proxy, side by side."""
    sys.path.insert(0, str(REPO / "tests"))
    from gcs_proxy import FaultyProxy

    from gcs_server import GCSServer, emulator_env

    work = prepare_small(args)
    (work / "gcs").mkdir()
    server = GCSServer(work / "gcs").start()
    try:
        url = f"{server.create_bucket('bench')}/prepared"
        with FaultyProxy(server.url, delay_s=args.delay_ms / 1e3) as proxy:
            env = emulator_env(proxy.url)
            rows = [("local mmap", ["--measure", str(work / "prepared")]),
                    ("gs ranges", ["--measure", url, "--upload-from", str(work / "prepared")]),
                    ("gs, 1 MiB LRU", ["--measure", url, "--cache-mb", "1"]),
                    ("gs, 1 MiB LRU, 16 thr", ["--measure", url, "--cache-mb", "1",
                                               "--read-threads", "16"])]
            figures = {}
            for name, extra in rows:
                command = [sys.executable, __file__, "--dir", str(work), "--vocab",
                           str(args.vocab), *extra]
                done = subprocess.run(command, cwd=REPO, env=env, check=True,
                                      capture_output=True, text=True)
                figures[name] = json.loads(done.stdout.strip().splitlines()[-1])
            requests = proxy.requests
    finally:
        server.stop()
    tokens = json.loads((work / "prepared" / "manifest.json").read_text())["tokens"]
    print(f"{tokens:,} tokens in a prepared dataset; gs requests each delayed "
          f"{args.delay_ms:.0f} ms ({requests} requests in all); tiny preset, medians")
    print(f"{'':22} {'rows/s':>9} {'step ms':>8} {'data wait ms':>13} {'wait/step':>10}")
    for name, f in figures.items():
        print(f"{name:22} {f['rows_per_s']:9,.0f} {f['step_ms']:8.1f} "
              f"{f['data_wait_ms']:13.3f} {100 * f['data_wait_fraction']:9.2f}%")
    print("target: data wait < 1% of the step once warm")


def measure(args) -> dict[str, float]:
    """Rows/s of the warm pipeline and the data wait of a tiny run, reading `--measure`."""
    from input import prepared
    from observe import metrics_log

    if args.cache_mb:
        prepared._CACHE.capacity = int(args.cache_mb * 2**20)
    work = pathlib.Path(args.dir)
    if args.upload_from:
        import storage

        for name in storage.files_under(args.upload_from):
            storage.path(f"{args.measure}/{name}").write_bytes(
                pathlib.Path(args.upload_from, name).read_bytes())
    run_dir = work / f"run-{time.monotonic_ns()}"
    config = configs.load("tiny", [f"data.path={args.measure}",
                                   f"data.tokenizer={work / 'tokenizer.json'}",
                                   f"model.vocab_size={args.vocab}", f"run_dir={run_dir}",
                                   "train.steps=200", "train.log_every=20", "checkpoint.every=0",
                                   "train.eval_batches=1", "train.compile_cache=false"]
                           + ([f"data.read_threads={args.read_threads}"] if args.read_threads
                              else []))
    splits = make_splits(config.data, get_tokenizer(config.data.tokenizer))
    dataset = train_dataset(splits.train, seed=0, global_batch=config.train.batch_size)
    iterator = train_iterator(dataset, config.data)
    for _ in range(20):  # warm: first blocks, threads started
        next(iterator)
    rows_per_s = batches_per_s(iterator, 50) * config.train.batch_size
    run(config)
    logged = [r for r in metrics_log.read(run_dir) if "data_wait_ms" in r][1:]  # warm only
    return {"rows_per_s": rows_per_s,
            "step_ms": statistics.median(r["step_ms"] for r in logged),
            "data_wait_ms": statistics.median(r["data_wait_ms"] for r in logged),
            "data_wait_fraction": statistics.median(r["data_wait_pct"] / 100 for r in logged)}


if __name__ == "__main__":
    main()
