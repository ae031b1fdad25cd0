"""Every preset on the smallest TPU slice it fits, compiled here for that slice.

    python benchmarks/slices.py [--presets tiny,llama-1b] [--generation v5e]
                                [--also llama-1b@v5e-16,llama-7b@v5e-256]

For each preset: the smallest slice of the generation (1, 4, 8, ... chips) whose chips
hold the train and eval steps, found by compiling (a binary search from the slices that
could hold the optimizer state); then the slices named in --also (the slices the large
presets are for). Each row: layout, GiB a chip, compile time on this host, collective
bytes a chip a step and their time at the chip's ICI bandwidth against the step's FLOP
time at the bf16 peak, and the bytes against the FSDP minimum (bf16 parameters gathered
for the forward and again for the backward, the gradient reduce-scattered once: three
times the parameters in bf16) where the parameters are split over chips. A markdown table
for README's "Before you rent a slice".
"""

from __future__ import annotations

import argparse
import math
import os
import pathlib
import sys

REPO = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("JAX_PLATFORMS", "cpu")  # as `python -m train.aot`: see train/aot.py
from train import process  # noqa: E402

with process.started():
    import jax

    import configs
    import model
    from configs import presets
    from sharding import topology
    from train import aot
    from train.compile import chips

SIZES = (1, 4, 8, 16, 32, 64, 128, 256)
STATE_BYTES_PER_PARAMETER = 12  # float32 parameters and AdamW's two moments


def parameters(config: configs.Config) -> int:
    return sum(math.prod(x.shape) for x in jax.tree.leaves(model.abstract_params(config.model)))


def smallest_fit(preset: str, generation: str) -> aot.SliceCompile:
    """Binary search over the slice sizes that could hold the optimizer state."""
    usable = chips.CHIPS[generation].usable_bytes
    config = configs.load(preset, [])
    state = parameters(config) * STATE_BYTES_PER_PARAMETER
    # the presets split their batch over every chip (mesh.data or mesh.fsdp = -1)
    sizes = [n for n in SIZES if n * usable >= state and config.train.batch_size % n == 0]
    best = None
    low, high = 0, len(sizes) - 1
    while low <= high:
        middle = (low + high) // 2
        name = f"{generation}-{sizes[middle]}"
        try:
            result = aot.compile_for_slice(configs.load(preset, []), topology.parse(name))
        except aot.OutOfMemory as e:
            print(f"  {preset} on {name}: {str(e)[:160]}", file=sys.stderr)
            low = middle + 1
            continue
        print(f"  {preset} on {name}: fits", file=sys.stderr)
        best, high = result, middle - 1
    if best is None:
        raise SystemExit(f"{preset} fits no {generation} slice up to {SIZES[-1]} chips")
    return best


def row(preset: str, result: aot.SliceCompile) -> str:
    ici = result.communication.total("ici")
    shape = result.mesh.shape
    layout = ", ".join(f"{axis} {shape[axis]}" for axis in shape if shape[axis] > 1) or "1 chip"
    split = shape["fsdp"] * shape["tensor"] > 1
    minimum = 3 * 2 * parameters(result.config)
    versus = f"{ici.bytes / minimum:.2f}x" if split else "-"
    ici_ms = result.communication.seconds("ici", result.chip.ici_bytes_per_s) * 1e3
    return (f"| {preset} | {result.tpu_slice.accelerator_type} | {layout}, remat "
            f"{result.config.model.remat} | {result.memory.total / 2**30:.2f} | "
            f"{result.train_seconds:.0f} | {ici.bytes / 2**30:.2f} | {versus} | "
            f"{ici_ms:.1f} | {result.flop_seconds() * 1e3:.1f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", default=",".join(presets.names()))
    parser.add_argument("--generation", default="v5e", choices=sorted(chips.CHIPS))
    parser.add_argument("--also", default="llama-1b@v5e-16,llama-7b@v5e-256",
                        help="PRESET@SLICE pairs to compile besides the smallest fits")
    args = parser.parse_args()
    rows = [row(p, smallest_fit(p, args.generation)) for p in args.presets.split(",") if p]
    for pair in filter(None, args.also.split(",")):
        preset, name = pair.split("@")
        rows.append(row(preset, aot.compile_for_slice(configs.load(preset, []),
                                                      topology.parse(name))))
    print(f"jax {jax.__version__}, libtpu's compiler on this host; per chip, one train step")
    print("| preset | slice | layout | GiB a chip | compile s | collective GiB | "
          "vs FSDP minimum | ICI ms | FLOP ms |")
    print("|---|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
