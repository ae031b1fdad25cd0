"""Step benchmark: tokens/s and MFU of the full train step, per preset, layout and dtype.

    python benchmarks/step.py [--presets tiny,bench-20m] [--steps 6] [--dtypes float32,bfloat16]

The whole step is timed (forward, backward, AdamW update; state donated), with random
tokens already on the devices, so the input pipeline is not part of it. Model FLOPs are
counted by the formula in observe/flops.py; on CPU the peak is large matmuls measured in
this same run, per dtype (the best of two sizes, ten times each). Figures are medians
over the timed steps. The 8 devices are fake CPU devices sharing this host's cores: the
layouts compare the cost of the partitioned programs (collectives included), not more
hardware.
On a GPU or TPU host, run it there; the peak is then the spec-sheet figure.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import pathlib
import statistics
import sys
import time

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
REPO = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from train import process  # noqa: E402

with process.started() as KEPT:  # as `python -m train` sets up its process
    import jax
    import numpy as np

    import configs
    import sharding
    from observe import flops
    from train.compile.step import compile_train_step
    from train.optimizer import make_optimizer
    from train.state import init_state, state_target

# Layout name -> (devices, mesh overrides).
LAYOUTS = {
    "1 device": (1, ["mesh.data=1"]),
    "data 8": (8, ["mesh.data=8"]),
    "fsdp 8": (8, ["mesh.data=1", "mesh.fsdp=8"]),
    "fsdp 4 x tensor 2": (8, ["mesh.data=1", "mesh.fsdp=4", "mesh.tensor=2"]),
}


def time_step(config: configs.Config, devices: list[jax.Device], steps: int) -> dict[str, float]:
    """Median seconds per step of the compiled train step, and its compile time."""
    mesh = sharding.make_mesh(config.mesh, devices)
    config = dataclasses.replace(
        config, model=configs.resolve_auto(config.model, devices[0].platform))
    tx = make_optimizer(config.optim, config.train.steps)
    target = state_target(config, mesh, tx)
    state = jax.jit(functools.partial(init_state, config, tx),
                    out_shardings=sharding.shardings_of(target))()
    compiled = compile_train_step(config, mesh, tx, target)
    batch = random_batch(config, sharding.batch_sharding(mesh, config.mesh.rules))
    for _ in range(2):  # warm-up
        state, metrics = compiled.fn(state, batch)
    jax.block_until_ready(metrics)
    seconds = []
    for _ in range(steps):
        started = time.perf_counter()
        state, metrics = compiled.fn(state, batch)
        jax.block_until_ready(metrics)
        seconds.append(time.perf_counter() - started)
    return {"step_s": statistics.median(seconds), "compile_s": compiled.seconds}


def random_batch(config: configs.Config, batch_sharding: jax.sharding.Sharding) -> dict:
    rows, length = config.train.batch_size, config.data.seq_len
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, config.model.vocab_size, (rows, length + 1), dtype=np.int32)
    host = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
            "weights": np.ones((rows, length), np.float32),
            "segment_ids": np.ones((rows, length), np.int32),
            "positions": np.broadcast_to(np.arange(length, dtype=np.int32), (rows, length))}
    return {name: jax.device_put(value, batch_sharding) for name, value in host.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", default="tiny,bench-20m")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--layouts", default=",".join(LAYOUTS))
    parser.add_argument("--steps", type=int, default=6, help="timed steps per configuration")
    parser.add_argument("overrides", nargs="*", help="extra key=value config overrides")
    args = parser.parse_args()
    print(f"host memory kept between steps: {KEPT}")
    devices = jax.devices()
    platform = devices[0].platform
    dtypes = args.dtypes.split(",")
    peaks = {}
    for dtype in dtypes:
        if platform == "cpu":
            peaks[dtype] = flops.matmul_peak(dtype)  # measured afresh, not the cached one
            print(f"matmul peak {dtype}: {peaks[dtype] / 1e9:.1f} GFLOP/s "
                  f"(1024^3 and 2048^3 matmuls on this CPU, best of 10 each)")
    print(f"{jax.device_count()} {platform} device(s): {devices[0].device_kind}")
    header = (f"{'preset':<11} {'layout':<18} {'dtype':<9} {'step ms':>9} {'tokens/s':>10} "
              f"{'GFLOP/s':>9} {'MFU':>7} {'compile s':>9}")
    print(header)
    print("-" * len(header))
    for preset in args.presets.split(","):
        for layout in args.layouts.split(","):
            count, mesh_overrides = LAYOUTS[layout]
            for dtype in dtypes:
                config = configs.load(preset, [*mesh_overrides, f"model.dtype={dtype}",
                                               "train.compile_cache=false", *args.overrides])
                used = devices[:count]
                timing = time_step(config, used, args.steps)
                tokens = config.train.batch_size * config.data.seq_len
                achieved = tokens * flops.flops_per_token(config.model, config.data.seq_len)
                achieved /= timing["step_s"]
                peak = peaks.get(dtype) or flops.peak_flops(used, dtype)[0]
                print(f"{preset:<11} {layout:<18} {dtype:<9} {1e3 * timing['step_s']:>9.1f} "
                      f"{tokens / timing['step_s']:>10,.0f} {achieved / 1e9:>9.1f} "
                      f"{100 * achieved / peak:>6.1f}% {timing['compile_s']:>9.1f}", flush=True)


if __name__ == "__main__":
    main()
