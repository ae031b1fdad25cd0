"""`python -m train [--config PRESET_OR_FILE] [key=value ...]`."""

from __future__ import annotations

import argparse
import os
import sys

from train import process

with process.started() as KEPT:  # before JAX and the checkpoint libraries: see train/process
    import checkpoint
    import configs
    import input as data_input
    import sharding
    from train.loop import run, say
    from train.process import distributed
    from train.process.run_lock import RunDirInUseError

USER_ERRORS = (configs.ConfigError, data_input.DataError, sharding.MeshError,
               checkpoint.CheckpointError, RunDirInUseError)


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
        say(process.describe(KEPT))
        run(config)
    except USER_ERRORS as e:
        print(f"error: {e}{_expiry(e)}", file=sys.stderr)
        return 2
    return 0


def _expiry(error: Exception) -> str:
    """When a run dir in a bucket is refused: when its lock expires if nobody renews it."""
    left = getattr(error, "lease_left_s", None)
    if left is None:
        return ""
    return (f"; its lock expires in {max(left, 0):.1f} s unless its holder renews it (a "
            "killed run's lock is taken over then)")


if __name__ == "__main__":
    code = main()
    if code:
        # A failed run may leave library threads behind (Orbax's, waiting up to minutes for
        # a save that a dead bucket will never finish): what the user needs is printed and
        # every `with` block has closed, so nothing is left to wait for.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)
