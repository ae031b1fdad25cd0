"""One training process per run directory at a time.

Two runs started on the same run directory (a job restarted while the old one still runs,
a notebook cell run twice in two kernels) would both resume from its latest checkpoint,
then write the same steps and interleave one metrics log. Each process of a run holds an
advisory lock on `<run_dir>/run.<process index>.lock` while it trains; a second one is
refused, naming the holder. The kernel releases the lock when its holder exits, however it
exits (kill -9 included), so no stale lock is ever left to clear by hand.

A bucket has no locks: in a gs:// run dir the lock is an object created only if absent
(generation precondition 0) and kept by a lease. The live run rewrites it every third of
`LEASE_SECONDS` (60 s; `IO_FIRST_LM_LOCK_LEASE_S` sets another) and deletes it when it
ends; the lock of a run that stopped renewing it (kill -9, a lost VM) is taken over once
it is older than the lease, conditionally on its generation, so of two runs taking it
over one wins.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import os
import pathlib
import socket
import threading
from collections.abc import Callable, Iterator

import storage

LEASE_SECONDS = 60.0


class RunDirInUseError(RuntimeError):
    """Another process trains in the same run directory."""


@contextlib.contextmanager
def held(run_dir: str | pathlib.Path, process_index: int,
         report: Callable[[str], None] = print) -> Iterator[None]:
    """Hold the run directory's lock for the block, or raise RunDirInUseError."""
    if storage.is_remote(run_dir):
        with _leased(storage.path(run_dir) / f"run.{process_index}.lock", report):
            yield
        return
    run_dir = pathlib.Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / f"run.{process_index}.lock"
    with open(path, "a+") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            holder = lock.read().strip() or "a process that has not said which yet"
            raise RunDirInUseError(
                f"run_dir {run_dir} is in use by another training process ({holder}; lock "
                f"{path}); stop it first, or choose another run_dir") from None
        except OSError as e:  # a filesystem without locks (some network mounts)
            report(f"warning: cannot lock {path} ({e}); nothing stops a second run from "
                   "using this run_dir at the same time")
        lock.truncate(0)
        lock.write(_holder())
        lock.flush()
        yield


def _holder() -> str:
    now = datetime.datetime.now().isoformat(timespec="seconds")
    return f"pid {os.getpid()} on {socket.gethostname()} since {now}"


def _in_use(path: object, holder: str) -> RunDirInUseError:
    run_dir = os.fspath(path).rsplit("/", 1)[0]
    return RunDirInUseError(
        f"run_dir {run_dir} is in use by another training process ({holder}; lock {path}); "
        "stop it first, or choose another run_dir")


def _lease_seconds() -> float:
    return float(os.environ.get("IO_FIRST_LM_LOCK_LEASE_S", LEASE_SECONDS))


@contextlib.contextmanager
def _leased(path: storage.Path, report: Callable[[str], None]) -> Iterator[None]:
    """The lock object at `path`, taken and renewed for the block, deleted after it."""
    from google.api_core import exceptions
    from google.cloud import storage as gcs_client

    bucket_name, _, name = os.fspath(path).removeprefix(storage.paths.GCS_PREFIX).partition("/")
    blob = gcs_client.Client().bucket(bucket_name).blob(name)
    lease, holder = _lease_seconds(), _holder()
    try:
        blob.upload_from_string(holder, if_generation_match=0)
    except exceptions.PreconditionFailed:
        blob.reload()
        age = (datetime.datetime.now(datetime.UTC) - blob.updated).total_seconds()
        previous = blob.download_as_text()
        if age <= lease:
            raise _in_use(path, previous) from None
        report(f"warning: taking over the lock {path} of a run that stopped renewing it "
               f"{age:.0f} s ago ({previous})")
        try:
            blob.upload_from_string(holder, if_generation_match=blob.generation)
        except exceptions.PreconditionFailed:  # another run took it over first
            blob.reload()
            raise _in_use(path, blob.download_as_text()) from None
    stop = threading.Event()
    renewer = threading.Thread(target=_renew, args=(blob, holder, lease, stop, report),
                               name="run-lock-lease", daemon=True)
    renewer.start()
    try:
        yield
    finally:
        stop.set()
        renewer.join()
        try:
            blob.delete(if_generation_match=blob.generation)
        except exceptions.GoogleAPIError as e:
            report(f"warning: could not release the lock {path} ({e}); it expires after "
                   f"{lease:.0f} s")


def _renew(blob, holder: str, lease: float, stop: threading.Event,
           report: Callable[[str], None]) -> None:
    """Rewrite the lock every third of the lease, only while it is still ours."""
    from google.api_core import exceptions

    while not stop.wait(lease / 3):
        try:
            blob.upload_from_string(holder, if_generation_match=blob.generation)
        except exceptions.PreconditionFailed:
            report(f"warning: the lock {blob.name} was taken over by another run; this run "
                   "no longer holds its run_dir")
            return
        except exceptions.GoogleAPIError as e:  # the bucket unreachable: try again later
            report(f"warning: could not renew the run lock ({e})")
