"""Checkpoint benchmark: every figure next to its reference, measured in one run.

    python benchmarks/checkpoint.py [--repeats 3] [--dir /tmp/ckpt-bench]

State: parameters + Adam moments of a ~92M-parameter Llama-shape model
(~1.1 GB), FSDP over 8 (fake CPU) devices. Figures are medians over repeats.
1. loop blocking per async save vs plain Orbax async vs one host memory copy
2. steps/s of bench-20m saving every 5 steps vs bare saves (the floor) vs no checkpoints,
   over whole save cycles after the first 15 steps (the steady state of a long run)
3. save throughput until written vs plain Orbax sync save vs raw write+fsync
4. restore throughput (same mesh, 8 -> 4 devices) vs plain Orbax vs TensorStore alone
   (the ceiling of this on-disk format) vs raw read
5. restart to first step after restore: cold vs warm cache (the saved step) vs XLA's
   compilation cache alone (traced and lowered again)

    python benchmarks/checkpoint.py --storage gs [--repeats 3]

The same state saved to and restored from a bucket on a GCS-protocol server that the
benchmark starts on 127.0.0.1 (fake-gcs-server, objects on the local disk under --dir):
loop blocking in the bucket vs on local disk, time until committed vs plain Orbax to the
same bucket, restore vs plain Orbax and vs TensorStore alone from the same bucket.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import json
import os
import pathlib
import shutil
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
REPO = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
BUCKET = "ckpt-bench"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dir", default="/tmp/ckpt-bench")
    parser.add_argument("--train-steps", type=int, default=36)
    parser.add_argument("--only", default="12345", help="which figures to measure, e.g. 14")
    parser.add_argument("--storage", choices=["local", "gs"], default="local",
                        help="gs: figures 1, 3 and 4 in a bucket of a local GCS-protocol server")
    return parser.parse_args()


def start_gcs_server(root: pathlib.Path) -> None:
    """fake-gcs-server (the `test` extra) on 127.0.0.1, with the bucket BUCKET; set up before
    `storage` is imported, which points every client at it."""
    sys.path.insert(0, str(REPO / "tests"))
    from gcs_server import GCSServer

    root.mkdir(parents=True, exist_ok=True)
    server = GCSServer(root).start()
    atexit.register(server.stop)
    os.environ["STORAGE_EMULATOR_HOST"] = server.url
    server.create_bucket(BUCKET)


ARGS = parse_args()
if ARGS.storage == "gs":
    start_gcs_server(pathlib.Path(ARGS.dir) / "gcs-server")

from train import process  # noqa: E402

with process.started() as KEPT:  # as `python -m train` sets up its process
    import jax
    import numpy as np
    import orbax.checkpoint as ocp
    import tensorstore as ts

    import configs
    import storage
    from checkpoint import Checkpointer
    from observe import metrics_log
    from sharding import make_mesh, shardings_of
    from train import run
    from train.optimizer import make_optimizer
    from train.process.collector import StartUp
    from train.state import init_state, state_target

BIG_MODEL = ["model.vocab_size=32000", "model.embed_dim=640", "model.num_layers=10",
             "model.num_heads=10", "model.num_kv_heads=10", "model.head_dim=64",
             "model.mlp_dim=1792"]


def quiet(_: str) -> None:
    pass


def in_turns(contenders: dict[str, Callable[[], Any]], repeats: int) -> dict[str, list[Any]]:
    """Each contender's results, measured one of each per round, so that a noisy disk's and
    host cache's drift during the benchmark falls on all of them alike."""
    results: dict[str, list[Any]] = {name: [] for name in contenders}
    for _ in range(repeats):
        for name, measure in contenders.items():
            results[name].append(measure())
    return results


def medians(results: dict[str, list[float]]) -> dict[str, float]:
    return {name: statistics.median(values) for name, values in results.items()}


def build(config, devices=None):
    """A state like a trained one: every float (Adam moments too) random, so nothing is
    all zeros for TensorStore to skip or compress away."""
    mesh = make_mesh(config.mesh, devices)
    tx = make_optimizer(config.optim, config.train.steps)
    target = state_target(config, mesh, tx)

    def randomised():
        state = init_state(config, tx)
        leaves, treedef = jax.tree.flatten(state)
        keys = jax.random.split(jax.random.key(0), len(leaves))
        leaves = [0.02 * jax.random.normal(k, x.shape, x.dtype)
                  if jax.numpy.issubdtype(x.dtype, jax.numpy.floating) else x
                  for k, x in zip(keys, leaves, strict=True)]
        return jax.tree.unflatten(treedef, leaves)

    state = jax.jit(randomised, out_shardings=shardings_of(target))()
    return jax.block_until_ready(state), target


def state_bytes(state) -> int:
    return sum(x.nbytes for x in jax.tree.leaves(state))


def host_copy(state) -> list[np.ndarray]:
    """Every addressable shard of the state, copied into host memory."""
    return [np.array(shard.data, copy=True)
            for leaf in jax.tree.leaves(state) for shard in leaf.addressable_shards]


def write_and_fsync(path: pathlib.Path, shards: list[np.ndarray]) -> None:
    with open(path, "wb") as f:
        for shard in shards:
            f.write(memoryview(np.ascontiguousarray(shard)).cast("B"))
        f.flush()
        os.fsync(f.fileno())


def memory_copy_seconds(state) -> float:
    started = time.perf_counter()
    copies = host_copy(state)
    elapsed = time.perf_counter() - started
    del copies
    return elapsed


def fresh(path: pathlib.Path) -> pathlib.Path:
    if storage.is_remote(path):
        if storage.path(path).exists():
            storage.path(path).rmtree()
        return storage.path(path)
    shutil.rmtree(path, ignore_errors=True)
    return path


def drop_page_cache() -> bool:
    try:
        os.sync()
        pathlib.Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def ours_save(state, config, path) -> tuple[float, float]:
    ckpt = Checkpointer(fresh(path), config.checkpoint, report=quiet)
    started = time.perf_counter()
    blocked = ckpt.save(1, state, {"next_index": 1}, configs.to_dict(config))
    ckpt.wait()
    total = time.perf_counter() - started
    ckpt.close()
    return blocked, total


def orbax_save(state, path, async_save: bool) -> tuple[float, float]:
    options = ocp.CheckpointManagerOptions(enable_async_checkpointing=async_save)
    manager = ocp.CheckpointManager(fresh(path), options=options)
    started = time.perf_counter()
    manager.save(1, args=ocp.args.StandardSave(state))
    blocked = time.perf_counter() - started
    manager.wait_until_finished()
    total = time.perf_counter() - started
    manager.close()
    return blocked, total


def raw_write(state, path) -> float:
    fresh(path).mkdir(parents=True)
    shards = [np.asarray(shard.data) for leaf in jax.tree.leaves(state)
              for shard in leaf.addressable_shards]
    started = time.perf_counter()
    write_and_fsync(path / "raw.bin", shards)
    return time.perf_counter() - started


def raw_read(path) -> float:
    drop_page_cache()
    started = time.perf_counter()
    with open(path / "raw.bin", "rb") as f:
        while f.read(1 << 24):
            pass
    return time.perf_counter() - started


def ours_restore(config, path, target) -> float:
    ckpt = Checkpointer(path, config.checkpoint, report=quiet)
    drop_page_cache()
    started = time.perf_counter()
    jax.block_until_ready(ckpt.restore(1, target).state)
    elapsed = time.perf_counter() - started
    ckpt.close()
    return elapsed


def orbax_restore(path, target) -> float:
    manager = ocp.CheckpointManager(path)
    drop_page_cache()
    started = time.perf_counter()
    jax.block_until_ready(manager.restore(1, args=ocp.args.StandardRestore(target)))
    elapsed = time.perf_counter() - started
    manager.close()
    return elapsed


def tensorstore_restore(path, target) -> float:
    """The same arrays read into the same shardings with TensorStore alone (no Orbax, no
    checksums, Orbax's layout read directly): what any reader of this format can do here."""
    state = storage.path(path) / "1" / "state"
    base = (os.fspath(state) if storage.is_remote(state) else pathlib.Path(state).as_uri()) + "/"
    context = ts.Context({"cache_pool": {"total_bytes_limit": 0}})
    arrays = [(".".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))))
                        for k in keys), leaf)
              for keys, leaf in jax.tree_util.tree_flatten_with_path(target)[0]
              if leaf.shape]  # Orbax keeps scalars in its metadata, not in TensorStore
    drop_page_cache()
    started = time.perf_counter()
    opened = [(leaf, ts.open({"driver": "zarr", "kvstore": {
        "driver": "ocdbt", "base": base, "path": f"{name}/"}}, context=context, open=True))
        for name, leaf in arrays]
    reads = []
    for leaf, store in opened:  # every read is issued before any is waited for
        shards = leaf.sharding.addressable_devices_indices_map(leaf.shape).items()
        reads.append((leaf, [(device, store.result()[index].read()) for device, index in shards]))
    restored = [jax.make_array_from_single_device_arrays(
        leaf.shape, leaf.sharding, [jax.device_put(read.result(), device)
                                    for device, read in shards]) for leaf, shards in reads]
    jax.block_until_ready(restored)
    return time.perf_counter() - started


class BareSaves:
    """While active, the train loop's saves do only what any save must: copy the state to
    host memory (the loop waits for that), then write the bytes to a new file and fsync it
    in a background thread, keeping the last `keep` files as the checkpoint policy does.
    No Orbax, no TensorStore: the floor of what a save costs."""

    def __init__(self, directory: pathlib.Path, keep: int = 3):
        self.directory = fresh(directory)
        self.directory.mkdir(parents=True)
        self.keep = keep
        self.writer: threading.Thread | None = None

    def save(self, step: int, state, *_) -> float:
        self.wait()
        jax.block_until_ready(state)
        started = time.perf_counter()
        shards = host_copy(state)
        blocked = time.perf_counter() - started
        self.writer = threading.Thread(target=self._write, args=(step, shards))
        self.writer.start()
        return blocked

    def _write(self, step: int, shards: list[np.ndarray]) -> None:
        write_and_fsync(self.directory / f"{step}.bin", shards)
        written = sorted(self.directory.iterdir(), key=lambda p: int(p.stem))
        for old in written[:-self.keep]:
            old.unlink()

    def wait(self) -> None:
        if self.writer is not None:
            self.writer.join()

    def __enter__(self) -> BareSaves:
        self.saved = Checkpointer.save, Checkpointer.wait
        Checkpointer.save, Checkpointer.wait = self.save, self.wait
        return self

    def __exit__(self, *_) -> None:
        self.wait()
        Checkpointer.save, Checkpointer.wait = self.saved


SAVE_EVERY = 5
WARM_UP_STEPS = 15
"""Figure 2 leaves out the steps up to here: the first steps warm up, and the first saves
grow the heap to hold a save's buffers next to the step's (page faults paid once a run)."""


def training_cost(workdir: pathlib.Path, steps: int, repeats: int) -> dict[str, float]:
    """Median steps/s of bench-20m with async saves every 5 steps, with bare saves (the
    floor) every 5 steps, and without checkpoints, in the steady state of a long run."""
    rates = {"ours": [], "bare": [], "none": []}
    for kind in list(rates) * repeats:
        run_dir = fresh(workdir / f"train-{kind}")
        every = 0 if kind == "none" else SAVE_EVERY
        config = configs.load("bench-20m", [
            f"train.steps={steps}", f"checkpoint.every={every}", "train.eval_batches=0",
            f"train.log_every={SAVE_EVERY}", "mesh.data=1", "mesh.fsdp=-1",
            f"run_dir={run_dir}", "train.compile_cache=false"])
        with BareSaves(workdir / "bare-saves") if kind == "bare" else contextlib.nullcontext():
            run(config)
        rates[kind].append(steady_steps_per_s(run_dir))
    return medians(rates)


def steady_steps_per_s(run_dir: pathlib.Path) -> float:
    """Steps/s over whole save cycles after the warm-up, from the run's own metrics log.

    A record every SAVE_EVERY steps covers SAVE_EVERY steps and exactly one save (its
    blocking and the previous save's background write); the end-of-run save is left out.
    """
    lines = (run_dir / metrics_log.FILENAME).read_text().splitlines()
    records = list(map(json.loads, lines))[:-1]  # the last is logged before the final save
    step_ms = [record["step_ms"] for record in records
               if record["step"] % SAVE_EVERY == 0 and record["step"] > WARM_UP_STEPS]
    if not step_ms:
        raise RuntimeError(f"no save cycle after step {WARM_UP_STEPS} in {run_dir}: "
                           "use more --train-steps")
    return 1e3 / statistics.mean(step_ms)


def restart_seconds(run_dir: pathlib.Path, cache_dir: pathlib.Path) -> float:
    """Process start -> first completed step after restoring from run_dir's checkpoint."""
    command = [sys.executable, "-m", "train", "--config", "bench-20m", f"run_dir={run_dir}",
               "train.steps=100", "train.stop_after=1", "train.eval_batches=0",
               "checkpoint.every=0", f"train.compile_cache_dir={cache_dir}"]
    # One device, as on a single-accelerator host: 8 fake devices would make the first
    # step itself (not the restart) most of the time measured.
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
    started = time.perf_counter()
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, env=env,
                               stderr=subprocess.STDOUT, text=True)
    elapsed, output = None, []
    for line in process.stdout:
        output.append(line)
        if line.startswith("step ") and elapsed is None:
            elapsed = time.perf_counter() - started
    process.wait()
    if process.returncode or elapsed is None:
        raise RuntimeError(f"restart run failed: {' '.join(command)}\n{''.join(output[-20:])}")
    return elapsed


def restart_cost(workdir: pathlib.Path, repeats: int) -> dict[str, float]:
    """Median seconds to the first step after restore: with an empty cache, a filled one,
    and one holding XLA's compiled programs but no saved step."""
    run_dir = fresh(workdir / "restart")
    run(configs.load("bench-20m", ["train.steps=100", "train.stop_after=1",
                                   "train.eval_batches=0", f"run_dir={run_dir}",
                                   "train.compile_cache=false"]), devices=jax.devices()[:1])
    times = {"cold": [], "warm": [], "xla": []}
    for _ in range(repeats):
        cache = fresh(workdir / "restart-cache")
        for kind, seconds in times.items():
            if kind == "xla":
                shutil.rmtree(cache / "train_steps")
            shutil.rmtree(run_dir / "checkpoints" / "2", ignore_errors=True)
            seconds.append(restart_seconds(run_dir, cache))
    return {kind: statistics.median(seconds) for kind, seconds in times.items()}


def on_built_state(measure: Callable[..., None], config, work: pathlib.Path,
                   repeats: int) -> None:
    """`measure(config, state, target, work, repeats)` on the ~1.1 GB state, with Python's
    collector as `train.run` has it when its loop saves: what start-up made is frozen
    (train/process/collector.py)."""
    with StartUp() as startup:
        state, target = build(config)
        startup.done()
        measure(config, state, target, work, repeats)


def measure_save_and_restore(config, state, target, work: pathlib.Path, repeats: int) -> None:
    gb = state_bytes(state) / 1e9
    params = sum(x.size for x in jax.tree.leaves(state.params)) / 1e6
    print(f"state: {params:.1f}M parameters + Adam moments = {gb:.2f} GB on "
          f"{jax.device_count()} devices (fsdp=8); medians of {repeats}; "
          f"page cache dropped before reads: {drop_page_cache()}")

    saves = in_turns({
        "copy": lambda: memory_copy_seconds(state),
        "ours": lambda: ours_save(state, config, work / "ours"),
        "orbax async": lambda: orbax_save(state, work / "orbax-async", True),
        "orbax sync": lambda: orbax_save(state, work / "orbax-sync", False),
        "raw": lambda: raw_write(state, work / "raw")}, repeats)
    copy, raw = statistics.median(saves["copy"]), statistics.median(saves["raw"])
    ours_blocked = statistics.median(b for b, _ in saves["ours"])
    ours_total = statistics.median(t for _, t in saves["ours"])
    orbax_blocked = statistics.median(b for b, _ in saves["orbax async"])
    orbax_sync = statistics.median(t for _, t in saves["orbax sync"])
    print("\n1. loop blocking per async save")
    print(f"   ours {ours_blocked:.3f} s | plain Orbax async {orbax_blocked:.3f} s | "
          f"one memory copy {copy:.3f} s | ours / copy = {ours_blocked / copy:.2f}x "
          "(target <= 1.2x)")
    print("\n3. save throughput until the write has finished")
    print(f"   ours {gb / ours_total:.2f} GB/s | plain Orbax sync {gb / orbax_sync:.2f} GB/s | "
          f"raw write+fsync {gb / raw:.2f} GB/s | ours / Orbax = {orbax_sync / ours_total:.2f} "
          "(target >= 0.9)")

    small = configs.load(None, [*BIG_MODEL, "mesh.data=2", "mesh.tensor=2"])
    _, target4 = build(small, jax.devices()[:4])
    # The raw file was written last: read it last in each round, after other reads have
    # pushed it out of whatever cache below the page cache (the VM host's) still holds it.
    rounds = in_turns({
        "same": lambda: ours_restore(config, work / "ours", target),
        "other": lambda: ours_restore(config, work / "ours", target4),
        "plain": lambda: orbax_restore(work / "orbax-sync", target),
        "plain4": lambda: orbax_restore(work / "orbax-sync", target4),
        "tensorstore": lambda: tensorstore_restore(work / "ours", target),
        "raw": lambda: raw_read(work / "raw")}, repeats)
    reads = medians(rounds)
    read, same, other = reads["raw"], reads["same"], reads["other"]
    plain, plain4, bare = reads["plain"], reads["plain4"], reads["tensorstore"]
    print("\n4. restore throughput")
    print(f"   same mesh: ours {gb / same:.2f} GB/s | plain Orbax {gb / plain:.2f} GB/s | "
          f"TensorStore alone {gb / bare:.2f} GB/s | raw read {gb / read:.2f} GB/s | "
          f"ours / raw = {read / same:.2f} (target >= 0.7), ours / Orbax = {plain / same:.2f} "
          f"(target >= 0.9), TensorStore alone / raw = {read / bare:.2f}")
    print(f"   8 -> 4 devices: ours {gb / other:.2f} GB/s | plain Orbax {gb / plain4:.2f} GB/s")
    # The page cache is dropped before each read, but a VM host may cache the disk below
    # it: the rounds' spread shows when the raw reference was served from there.
    print("   raw read per round: " + ", ".join(f"{gb / t:.2f}" for t in rounds["raw"])
          + " GB/s; ours same mesh per round: "
          + ", ".join(f"{gb / t:.2f}" for t in rounds["same"]) + " GB/s")


def measure_in_bucket(config, state, target, work: pathlib.Path, repeats: int) -> None:
    """Figures 1, 3 and 4 for a bucket, each next to its local-disk or plain-Orbax twin."""
    gb = state_bytes(state) / 1e9
    bucket = f"gs://{BUCKET}"
    print(f"state: {gb:.2f} GB on {jax.device_count()} devices (fsdp=8); bucket on "
          f"fake-gcs-server at {os.environ['STORAGE_EMULATOR_HOST']}; medians of {repeats}")
    saves = in_turns({
        "ours local": lambda: ours_save(state, config, work / "ours"),
        "ours gs": lambda: ours_save(state, config, f"{bucket}/ours"),
        "orbax gs": lambda: orbax_save(state, f"{bucket}/orbax", True)}, repeats)
    blocked = {name: statistics.median(b for b, _ in runs) for name, runs in saves.items()}
    total = {name: statistics.median(t for _, t in runs) for name, runs in saves.items()}
    print("\n1. loop blocking per async save")
    print(f"   ours in the bucket {blocked['ours gs']:.3f} s | ours on local disk "
          f"{blocked['ours local']:.3f} s | plain Orbax async in the bucket "
          f"{blocked['orbax gs']:.3f} s | bucket / local = "
          f"{blocked['ours gs'] / blocked['ours local']:.2f}x (target <= 1.2x)")
    print("\n3. save until committed")
    print(f"   ours {gb / total['ours gs']:.2f} GB/s ({total['ours gs']:.1f} s) | plain Orbax "
          f"{gb / total['orbax gs']:.2f} GB/s | ours / Orbax = "
          f"{total['orbax gs'] / total['ours gs']:.2f} (target >= 0.9) | ours on local disk "
          f"{gb / total['ours local']:.2f} GB/s")
    reads = medians(in_turns({
        "ours": lambda: ours_restore(config, f"{bucket}/ours", target),
        "orbax": lambda: orbax_restore(f"{bucket}/orbax", target),
        "tensorstore": lambda: tensorstore_restore(f"{bucket}/ours", target)}, repeats))
    print("\n4. restore from the bucket (same mesh)")
    print(f"   ours {gb / reads['ours']:.2f} GB/s | plain Orbax {gb / reads['orbax']:.2f} GB/s | "
          f"TensorStore alone {gb / reads['tensorstore']:.2f} GB/s | ours / Orbax = "
          f"{reads['orbax'] / reads['ours']:.2f} (target >= 0.9)")


def main() -> None:
    args = ARGS
    print(f"host memory kept between steps: {KEPT}")
    work = pathlib.Path(args.dir)
    if args.storage == "gs":
        on_built_state(measure_in_bucket, configs.load(
            None, [*BIG_MODEL, "mesh.data=1", "mesh.fsdp=8"]), work, args.repeats)
        return
    if set(args.only) & set("134"):
        config = configs.load(None, [*BIG_MODEL, "mesh.data=1", "mesh.fsdp=8"])
        on_built_state(measure_save_and_restore, config, work, args.repeats)
    if "2" in args.only:
        rate = training_cost(work, args.train_steps, args.repeats)
        print("\n2. what checkpointing costs training (bench-20m, 8 devices fsdp, save every 5, "
              f"steps {WARM_UP_STEPS + 1}-{(args.train_steps - 1) // SAVE_EVERY * SAVE_EVERY})")
        print(f"   with async saves {rate['ours']:.3f} steps/s | with bare saves (host copy + "
              f"write + fsync, the floor) {rate['bare']:.3f} | without {rate['none']:.3f} | "
              f"ours / without = {rate['ours'] / rate['none']:.3f} (target >= 0.97), "
              f"bare / without = {rate['bare'] / rate['none']:.3f}")
    if "5" in args.only:
        restart = restart_cost(work, args.repeats)
        print("\n5. restart to first step after restore (bench-20m, 1 process, 1 device)")
        print(f"   cold {restart['cold']:.2f} s | warm cache {restart['warm']:.2f} s | XLA's "
              f"cache alone (no saved step) {restart['xla']:.2f} s | warm / cold = "
              f"{restart['warm'] / restart['cold']:.2f} (target <= 0.5), XLA's alone / cold = "
              f"{restart['xla'] / restart['cold']:.2f}")


if __name__ == "__main__":
    main()
