"""One training process per run directory at a time.

Two runs started on the same run directory (a job restarted while the old one still runs,
a notebook cell run twice in two kernels) would both resume from its latest checkpoint,
then write the same steps and interleave one metrics log. Each process of a run holds an
advisory lock on `<run_dir>/run.<process index>.lock` while it trains; a second one is
refused, naming the holder. The kernel releases the lock when its holder exits, however it
exits (kill -9 included), so no stale lock is ever left to clear by hand.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import os
import pathlib
import socket
from collections.abc import Callable, Iterator


class RunDirInUseError(RuntimeError):
    """Another process trains in the same run directory."""


@contextlib.contextmanager
def held(run_dir: str | pathlib.Path, process_index: int,
         report: Callable[[str], None] = print) -> Iterator[None]:
    """Hold the run directory's lock for the block, or raise RunDirInUseError."""
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
        now = datetime.datetime.now().isoformat(timespec="seconds")
        lock.write(f"pid {os.getpid()} on {socket.gethostname()} since {now}")
        lock.flush()
        yield
