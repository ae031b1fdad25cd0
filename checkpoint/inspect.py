"""`python -m checkpoint.inspect RUN_DIR [--config PRESET_OR_FILE] [key=value ...]`.

Lists the run's checkpoints (step, size on disk, complete or not, checksums)
and the config diff between the latest complete one and the current config,
resolved exactly as `python -m train` would resolve it.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import pathlib
import sys

import orbax.checkpoint as ocp

import configs
from checkpoint import integrity
from checkpoint.compat import config_diff
from checkpoint.manager import TMP_SUFFIX, checkpoint_dir


@dataclasses.dataclass(frozen=True)
class StepInfo:
    step: int
    path: pathlib.Path
    size_bytes: int
    complete: bool
    integrity: str  # "ok", "unverified", "incomplete" or the damage found


def _size(path: pathlib.Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _integrity(path: pathlib.Path, step: int, complete: bool) -> str:
    if not complete:
        return "incomplete"
    if not integrity.has_checksums(path):
        return "unverified"
    try:
        integrity.verify(path, step)
    except integrity.DamagedCheckpointError as e:
        return f"DAMAGED: {e}"
    return "ok"


def list_steps(checkpoint_dir: pathlib.Path) -> list[StepInfo]:
    """Every step directory, finished or still (or forever) being written."""
    infos = []
    for path in checkpoint_dir.iterdir() if checkpoint_dir.is_dir() else []:
        name, complete = path.name, True
        if TMP_SUFFIX in name:
            name, complete = name.split(TMP_SUFFIX)[0], False
        if path.is_dir() and name.isdigit():
            step = int(name)
            infos.append(StepInfo(step, path, _size(path), complete,
                                  _integrity(path, step, complete)))
    return sorted(infos, key=lambda info: (info.step, info.complete))


def saved_config(checkpoint_dir: pathlib.Path, step: int) -> dict:
    logging.getLogger("absl").setLevel(logging.ERROR)  # read-only mode warns about itself
    manager = ocp.CheckpointManager(
        checkpoint_dir, options=ocp.CheckpointManagerOptions(read_only=True),
        item_names=("config",))
    try:
        args = ocp.args.Composite(config=ocp.args.JsonRestore())
        return dict(manager.restore(step, args=args).config)
    finally:
        manager.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m checkpoint.inspect",
                                     description="List a run's checkpoints.")
    parser.add_argument("run_dir")
    parser.add_argument("--config", default=None, help="preset or JSON file to compare with")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args(argv)
    directory = checkpoint_dir(args.run_dir)
    infos = list_steps(directory)
    if not infos:
        print(f"no checkpoints in {directory}", file=sys.stderr)
        return 1
    print(f"{'step':>8}  {'size':>10}  {'state':<10}  checksums")
    for info in infos:
        state = "complete" if info.complete else "partial"
        print(f"{info.step:>8}  {info.size_bytes / 1e6:>7.1f} MB  {state:<10}  {info.integrity}")
    complete = [i.step for i in infos if i.complete]
    if not complete:
        return 0
    try:
        current = configs.load(args.config, [f"run_dir={args.run_dir}", *args.overrides])
    except configs.ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        saved = saved_config(directory, complete[-1])
    except Exception as e:  # Orbax and its JSON reader raise many types
        print(f"\nconfig of step {complete[-1]} could not be read: {str(e)[:300]}",
              file=sys.stderr)
        return 1
    diff = config_diff(saved, configs.to_dict(current))
    print(f"\nconfig of step {complete[-1]} vs the current config:")
    print("\n".join(f"  {line}" for line in diff) if diff else "  identical")
    return 0


if __name__ == "__main__":
    sys.exit(main())
