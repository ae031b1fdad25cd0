"""Ray runner of `input.prepare` next to the local one, on the input benchmark's corpus.

    python benchmarks/prepare_ray.py [--mb 40] [--workers 2] [--repeats 3] [--dir /tmp/prepare-ray]

The corpus and tokenizer are those of benchmarks/input_pipeline.py (JSONL copies of the
default corpus; a byte-level BPE of 8,192 tokens; --shard-mb 2). Each prepare is its own
`python -m input.prepare` process, timed from start to exit: the local runner with N worker
processes, and the Ray runner joined (`--ray ADDRESS`) to a cluster of N CPUs that this
process holds (started before the clock: a cluster outlives its jobs). Contenders take
turns within each round; medians over the rounds. Ray's usage report and dashboard are off.
"""

from __future__ import annotations

import argparse
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
os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
# The local runner's single worker is this process, where the Rust tokenizer spreads each
# batch over every core; a Ray task, like each worker of a local pool, uses one thread.
LOCAL_ONE_THREAD = "local, 1 worker, 1 thread"


def write_corpus(work: pathlib.Path, megabytes: float) -> float:
    """The input benchmark's corpus under work/raw (written by its own function, in a process
    of its own: that module sets up its process for training); its MB of text."""
    code = ("import pathlib, sys; sys.path.insert(0, 'benchmarks'); "
            "from input_pipeline import write_corpus; "
            f"d = write_corpus(pathlib.Path({str(work / 'raw')!r}), {megabytes}); "
            "print(sum(len(x.encode()) for x in d) / 1e6)")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True,
                          capture_output=True, text=True)
    return float(done.stdout.split()[-1])


def timed_prepare(work: pathlib.Path, out: str, extra: list[str],
                  env: dict[str, str] | None = None) -> float:
    """Seconds of one `python -m input.prepare` of the corpus, start to exit."""
    shutil.rmtree(work / out, ignore_errors=True)
    command = [sys.executable, "-m", "input.prepare", str(work / "raw"), "--out",
               str(work / out), "--tokenizer", str(work / "tokenizer.json"),
               "--shard-mb", "2", *extra]
    started = time.perf_counter()
    subprocess.run(command, cwd=REPO, check=True, capture_output=True,
                   env={**os.environ, **(env or {})})
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=float, default=40.0)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--dir", default="/tmp/prepare-ray")
    args = parser.parse_args()
    import ray

    from input import default_corpus
    from input.tokenizer import train_bpe

    work = pathlib.Path(args.dir)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    mb = write_corpus(work, args.mb)
    train_bpe(iter(default_corpus()), args.vocab, work / "tokenizer.json")
    print(f"corpus: {mb:.1f} MB of JSONL, byte-level BPE of {args.vocab} tokens, --shard-mb 2, "
          f"{os.cpu_count()} cores; medians of {args.repeats}")
    seconds: dict[str, list[float]] = {}
    for cpus in sorted({1, args.workers}):
        started = time.perf_counter()
        ray.init(address="local", num_cpus=cpus, include_dashboard=False,
                 logging_level="WARNING")
        address = ray.get_runtime_context().gcs_address
        print(f"Ray cluster of {cpus} CPU(s) started in {time.perf_counter() - started:.1f} s")
        try:
            for _ in range(args.repeats):
                contenders = {
                    f"local, {cpus} worker(s)": ("local", ["--workers", str(cpus)], {}),
                    f"Ray, {cpus} worker(s)": ("ray", ["--ray", address], {})}
                if cpus == 1:  # like a Ray task or a pool worker: one tokenizer thread
                    contenders[LOCAL_ONE_THREAD] = ("local", ["--workers", "1"],
                                                    {"TOKENIZERS_PARALLELISM": "false"})
                for name, (out, extra, env) in contenders.items():
                    seconds.setdefault(name, []).append(timed_prepare(work, out, extra, env))
        finally:
            ray.shutdown()
        same = all((work / o / "manifest.json").read_bytes()
                   == (work / "local" / "manifest.json").read_bytes() for o in ("ray",))
        print(f"  {cpus} worker(s): Ray's manifest byte-identical to the local one: {same}")
    tokens = json.loads((work / "local" / "manifest.json").read_text())["tokens"]
    print(f"\n{'runner':26} {'wall s':>8} {'MB/s':>7} {'tokens/s':>11}")
    for name, times in seconds.items():
        median = statistics.median(times)
        print(f"{name:26} {median:8.2f} {mb / median:7.2f} {tokens / median:11,.0f}")
    for cpus in sorted({1, args.workers}):
        ray_seconds = statistics.median(seconds[f"Ray, {cpus} worker(s)"])
        for local in (f"local, {cpus} worker(s)", *([LOCAL_ONE_THREAD] if cpus == 1 else [])):
            ratio = ray_seconds / statistics.median(seconds[local])
            print(f"Ray / {local}: {ratio:.2f}x wall time (target <= 1.25x)")


if __name__ == "__main__":
    main()
