"""Reading a run's checkpoints: which steps there are, a step's saved config, its parameters.

Everything here but `restore_params` looks at directory names and small JSON files
only, never at array data, so picking a step costs the same however many steps are
kept. Array files are checked against their checksums when they are read, by
`verified_restore`, or when a person asks (`python -m checkpoint.inspect --verify`).
The trainer (`Checkpointer`), `generate`, `checkpoint.inspect` and the Hugging Face
converter all read through here.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import gc
import pathlib
from collections.abc import Callable, Iterator
from typing import Any

import orbax.checkpoint as ocp

import storage
from checkpoint import aftermath, integrity

SUBDIR = "checkpoints"  # a run's checkpoints live in <run_dir>/checkpoints
TMP_SUFFIX = ".orbax-checkpoint-tmp"  # Orbax's name for a step still being written on disk
COMMITTED = "commit_success.txt"  # on Cloud Storage, the object Orbax writes last instead
CONFIG, STATE = "config", "state"  # the items `Checkpointer` saves a step's config and state as


class CheckpointError(ValueError):
    """A checkpoint cannot be used with the current run."""


@dataclasses.dataclass(frozen=True)
class StepDir:
    step: int
    path: storage.Path
    complete: bool


def checkpoint_dir(run_dir: str | pathlib.Path) -> storage.Path:
    """Where the checkpoints of the run in `run_dir` (a local path or gs:// URL) are kept."""
    return storage.path(run_dir) / SUBDIR


def step_dirs(directory: str | pathlib.Path) -> list[StepDir]:
    """Every step directory, finished or still (or forever) being written, in step order.

    On disk Orbax writes a step under `<step>.orbax-checkpoint-tmp-*` and renames it to
    `<step>` once every file is written, so the name alone says whether a step is complete.
    Cloud Storage has no rename: the step is written in place and complete once Orbax has
    written its `commit_success.txt`, one small read a step.
    """
    directory = storage.path(directory)
    remote = storage.is_remote(directory)
    found = []
    for path in directory.iterdir() if directory.is_dir() else []:
        name, complete = path.name, True
        if TMP_SUFFIX in name:
            name, complete = name.split(TMP_SUFFIX)[0], False
        if name.isdigit() and path.is_dir():
            if remote:
                complete = (path / COMMITTED).exists()
            found.append(StepDir(int(name), path, complete))
    return sorted(found, key=lambda s: (s.step, s.complete))


def complete_steps(directory: str | pathlib.Path) -> list[int]:
    """The complete steps, oldest first."""
    return [s.step for s in step_dirs(directory) if s.complete]


def latest_complete_step(directory: str | pathlib.Path, step: int | None = None) -> int:
    """`step` if it is complete, by default the latest complete step; else a CheckpointError
    naming the directory and the steps there are."""
    complete = complete_steps(directory)
    if not complete:
        raise CheckpointError(f"no complete checkpoint in {directory}")
    if step is None:
        return complete[-1]
    if step not in complete:
        raise CheckpointError(f"no complete checkpoint step {step} in {directory}; complete "
                              f"steps: {complete}")
    return step


def saved_config(directory: str | pathlib.Path, step: int) -> dict[str, Any]:
    """The resolved config saved with a step, its own files checked against their checksums.

    Only the config's files (a few kB) are checked: a flipped bit in them would give a
    config that parses and differs. A step without checksums (saved before they existed)
    is read as it is.
    """
    directory = storage.path(directory)
    step_dir = directory / str(step)
    try:
        if integrity.has_checksums(step_dir):
            integrity.verify(step_dir, step, under=f"{CONFIG}/")
    except integrity.DamagedCheckpointError as e:
        raise CheckpointError(str(e)) from e
    try:
        return dict(ocp.JsonCheckpointHandler().restore(step_dir / CONFIG))
    except Exception as e:  # a step without checksums: the missing file or the JSON error
        raise CheckpointError(f"checkpoint step {step} in {directory}: its saved config "
                              f"could not be read ({str(e)[:300]})") from e


def restore_params(directory: str | pathlib.Path, step: int, target: Any) -> Any:
    """Only the parameters of a step (no optimizer state is read), into `target`'s shardings."""
    directory = storage.path(directory)
    item = {"params": target}
    args = ocp.args.PyTreeRestore(
        item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item),
        partial_restore=True)
    reader = ocp.PyTreeCheckpointer()  # one item of one step: no CheckpointManager needed
    try:
        restored = verified_restore(
            directory, step, print,
            lambda: reader.restore(directory / str(step) / STATE, args=args),
            what="parameters of checkpoint")
    finally:
        reader.close()
    return restored["params"]


def verify_step(directory: storage.Path, step: int, report: Callable[[str], None]) -> None:
    """CheckpointError naming the step and file unless the step's files match its checksums."""
    step_dir = directory / str(step)
    if not integrity.has_checksums(step_dir):
        report(f"warning: checkpoint step {step} has no checksums; not verified")
        return
    try:
        integrity.verify(step_dir, step)
    except integrity.DamagedCheckpointError as e:
        raise CheckpointError(str(e)) from e


@contextlib.contextmanager
def collector_paused() -> Iterator[None]:
    """Python's cyclic garbage collector off for the block, then as it was.

    A restore makes many short-lived objects (Orbax's futures and tasks, a set per
    shard) and keeps almost none, yet they trigger collections that scan everything the
    process holds, JAX's objects included, for nothing worth freeing (README,
    Performance). `train.run` restores inside its start-up, where the collector is
    paused already.
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def verified_restore(directory: storage.Path, step: int, report: Callable[[str], None],
                     restore: Callable[[], Any], what: str = "checkpoint") -> Any:
    """`restore()` of step `step`, its files checked against their checksums meanwhile.

    Both read the same files, so whichever comes second finds them in the page
    cache: the check costs no second read from disk. A damaged file explains a
    failed restore best, so its error is the one raised, once: the tracebacks a failed
    restore would print later are dropped where the command installed `aftermath`.
    """
    aftermath.watch(directory)
    with collector_paused(), \
            concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="verify") as pool:
        verified = pool.submit(verify_step, directory, step, report)
        try:
            restored = restore()
        except Exception as e:  # Orbax and TensorStore raise many types; name the step.
            verified.result()
            raise CheckpointError(f"{what} step {step} in {directory} could not be restored: "
                                  f"{str(e)[:500]}") from e
        verified.result()
    return restored
