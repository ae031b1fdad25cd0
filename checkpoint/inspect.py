"""`python -m checkpoint.inspect RUN_DIR [--verify] [--config PRESET_OR_FILE] [key=value ...]`.

Lists the run's checkpoints (step, size on disk, complete or not, checksums)
and the config diff between the latest complete one and the current config,
resolved exactly as `python -m train` would resolve it. With `--verify`, every
file of every complete step is read and checked against its checksum ("ok" or
the damage found); without, the column says whether checksums were recorded.
This is the tool for people; code reads checkpoints through `checkpoint.reader`.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

import configs
import storage
from checkpoint import integrity, reader
from checkpoint.compat import config_diff


@dataclasses.dataclass(frozen=True)
class StepInfo:
    step: int
    path: storage.Path
    size_bytes: int
    complete: bool
    integrity: str  # "ok", "recorded", "unverified", "incomplete" or the damage found


def _size(path: storage.Path) -> int:
    return sum(storage.files_under(path).values())


def _integrity(found: reader.StepDir, verify: bool) -> str:
    """The checksum column: checking reads every file of the step, so only on request."""
    if not found.complete:
        return "incomplete"
    if not integrity.has_checksums(found.path):
        return "unverified"
    if not verify:
        return "recorded"
    try:
        integrity.verify(found.path, found.step)
    except integrity.DamagedCheckpointError as e:
        return f"DAMAGED: {e}"
    return "ok"


def list_steps(checkpoint_dir: storage.Path, verify: bool = False) -> list[StepInfo]:
    """Every step directory, finished or still (or forever) being written; with `verify`,
    each complete step's files checked against their checksums."""
    return [StepInfo(found.step, found.path, _size(found.path), found.complete,
                     _integrity(found, verify)) for found in reader.step_dirs(checkpoint_dir)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m checkpoint.inspect",
                                     description="List a run's checkpoints.")
    parser.add_argument("run_dir")
    parser.add_argument("--config", default=None, help="preset or JSON file to compare with")
    parser.add_argument("--verify", action="store_true",
                        help="check every file of every complete step against its checksum "
                             "(reads all of them)")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_intermixed_args(argv)  # options may follow RUN_DIR, as documented
    directory = reader.checkpoint_dir(args.run_dir)
    infos = list_steps(directory, args.verify)
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
        saved = reader.saved_config(directory, complete[-1])
    except reader.CheckpointError as e:
        print(f"\nconfig of step {complete[-1]} could not be read: {e}", file=sys.stderr)
        return 1
    diff = config_diff(saved, configs.to_dict(current))
    print(f"\nconfig of step {complete[-1]} vs the current config:")
    print("\n".join(f"  {line}" for line in diff) if diff else "  identical")
    return 0


if __name__ == "__main__":
    sys.exit(main())
