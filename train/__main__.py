"""`python -m train [--config PRESET_OR_FILE] [key=value ...]`."""

from __future__ import annotations

import gc

gc.disable()  # imports make ~0.15 M lasting objects and no garbage: see train/collector.py

from train import host_memory  # noqa: E402

# First, before JAX, Orbax and TensorStore start their threads (each picks its malloc
# arena when it starts).
host_memory.keep_freed_memory()

import argparse  # noqa: E402
import sys  # noqa: E402

import checkpoint  # noqa: E402
import configs  # noqa: E402
import input as data_input  # noqa: E402
import sharding  # noqa: E402
from train import distributed  # noqa: E402
from train.loop import run  # noqa: E402
from train.run_lock import RunDirInUseError  # noqa: E402

USER_ERRORS = (configs.ConfigError, data_input.DataError, sharding.MeshError,
               checkpoint.CheckpointError, RunDirInUseError)

gc.freeze()  # what the imports made is never scanned again
gc.enable()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m train", description="Train a decoder-only language model.")
    parser.add_argument("--config", default=None,
                        help="preset name or JSON config file (default: tiny)")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="override config fields, e.g. model.num_layers=2 train.steps=50")
    args = parser.parse_args(argv)
    try:
        config = configs.load(args.config, args.overrides)
        distributed.initialize(config.distributed)  # before anything starts a JAX backend
        run(config)
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
