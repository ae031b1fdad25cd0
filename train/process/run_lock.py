"""One training process per run directory at a time.

Two runs started on the same run directory (a job restarted while the old one still runs,
a notebook cell run twice in two kernels) would both resume from its latest checkpoint,
then write the same steps and interleave one metrics log. Each process of a run holds an
advisory lock on `<run_dir>/run.<process index>.lock` while it trains; a second one is
refused, naming the holder. The kernel releases the lock when its holder exits, however it
exits (kill -9 included), so no stale lock is ever left to clear by hand.

A bucket has no locks: in a gs:// run dir the lock is the object `<run_dir>/run.<i>.lock`,
created only if absent (generation precondition 0), naming its holder and its lease, and kept
by a lease: the live run rewrites it every third of `LEASE_SECONDS` (60 s;
`IO_FIRST_LM_LOCK_LEASE_S` sets another) and deletes it when it ends. A killed run (kill -9,
a lost VM) leaves its lock behind, and it expires after the lease: 60 s after its last
renewal a new run takes it over, conditionally on its generation, so of two runs taking it
over one wins. A run whose lock was taken over (it could not renew it for a lease) is told
so by a warning and keeps training; a renewal the bucket did not answer is tried again the
next period.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import os
import pathlib
import socket
import threading
import uuid
from collections.abc import Callable, Iterator

import storage

LEASE_SECONDS = 60.0


class RunDirInUseError(RuntimeError):
    """Another process trains in the same run directory. In a bucket, `lease_left_s` says how
    long until its lock expires if its holder stops renewing it (a killed run's lock)."""

    def __init__(self, message: str, lease_left_s: float | None = None):
        super().__init__(message)
        self.lease_left_s = lease_left_s


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


def _in_use(path: object, holder: str, lease_left_s: float | None = None) -> RunDirInUseError:
    run_dir = os.fspath(path).rsplit("/", 1)[0]
    return RunDirInUseError(
        f"run_dir {run_dir} is in use by another training process ({holder}; lock {path}); "
        "stop it first, or choose another run_dir", lease_left_s)


def _lease_seconds() -> float:
    return float(os.environ.get("IO_FIRST_LM_LOCK_LEASE_S", LEASE_SECONDS))


# The lock object's text: the holder as the error names it, then `lease <seconds> s`, then a
# token of this `held` alone, by which a run knows its own lock (a write whose answer was lost
# and that the client retried is refused by its own precondition: the object is ours anyway).
def _lock_text(holder: str, lease: float, token: str) -> str:
    return f"{holder}\nlease {lease:g} s\ntoken {token}\n"


def _parse(text: str) -> tuple[str, float | None, str | None]:
    """(holder, lease in seconds or None, token or None) of a lock object's text."""
    holder, lease, token = "", None, None
    for i, line in enumerate(text.strip().splitlines()):
        if i == 0:
            holder = line.strip()
        elif line.startswith("lease "):
            with contextlib.suppress(ValueError):
                lease = float(line.removeprefix("lease ").removesuffix(" s"))
        elif line.startswith("token "):
            token = line.removeprefix("token ").strip()
    return holder or "a process that has not said which", lease, token


class _Lease:
    """The lock object at `path`, while this run holds it: `generation` is that of its last
    write, `lost` says another run has taken it over."""

    def __init__(self, path: object, lease: float, report: Callable[[str], None]):
        from google.api_core import exceptions
        from google.cloud.storage.retry import DEFAULT_RETRY

        bucket_name, name = storage.paths.bucket_and_name(path)
        self.path, self.lease, self.report = path, lease, report
        self.blob = storage.paths.gcs_client().bucket(bucket_name).blob(name)
        self.token = uuid.uuid4().hex
        self.text = _lock_text(_holder(), lease, self.token)
        self.generation: int | None = None
        self.lost = False
        self._errors = exceptions
        # Each request (and the client's retries of it) gives up within a renewal period: a
        # renewal the bucket does not answer is tried again the next one.
        self._retry = DEFAULT_RETRY.with_timeout(max(lease / 3, 1.0))

    def _write(self, if_generation_match: int) -> None:
        self.blob.upload_from_string(self.text, if_generation_match=if_generation_match,
                                     retry=self._retry, timeout=max(self.lease / 3, 1.0))
        self.generation = self.blob.generation

    def _current(self):
        """(text, generation, updated) of the lock object as it is now, or None if absent."""
        blob = self.blob.bucket.blob(self.blob.name)
        try:
            blob.reload(retry=self._retry)
            generation, updated = blob.generation, blob.updated
            text = blob.download_as_text(if_generation_match=generation, retry=self._retry)
        except (self._errors.NotFound, self._errors.PreconditionFailed):
            return None  # deleted or rewritten between the two requests: look again
        # The download names the generation it read (some GCS emulators ignore the
        # precondition): the text of a newer lock must not pass for the stale one's.
        if blob.generation not in (None, generation):
            return None
        return text, generation, updated

    def _ours(self, current) -> bool:
        if current is not None and _parse(current[0])[2] == self.token:
            self.generation = current[1]
            return True
        return False

    def take(self) -> None:
        """Create the lock object, or take over a stale one, or raise RunDirInUseError."""
        for _ in range(5):
            try:
                self._write(if_generation_match=0)
                return
            except self._errors.PreconditionFailed:
                pass
            current = self._current()
            if current is None:
                continue  # released meanwhile: create it again
            if self._ours(current):
                return
            text, generation, updated = current
            holder, holder_lease, _ = _parse(text)
            # Stale is judged by the object's `updated` time, set by the bucket's clock at its
            # last renewal, against this host's clock: one look, where watching the generation
            # stay unchanged for a whole lease would make every new run wait a lease before
            # taking over a killed run's lock. Hosts that keep time by NTP agree within far
            # less than the margin this leaves (a live holder renews every third of its lease,
            # so its lock is never older than a third; stale means older than a whole lease).
            # The holder's own lease counts: it renews by that one.
            lease = holder_lease or self.lease
            age = (datetime.datetime.now(datetime.UTC) - updated).total_seconds()
            if age <= lease:
                raise _in_use(self.path, holder, lease - age)
            self.report(f"warning: taking over the lock of a run that stopped renewing it "
                        f"({holder}); lock {self.path} last renewed {age:.0f} s ago, lease "
                        f"{lease:g} s")
            try:
                self._write(if_generation_match=generation)
                return
            except self._errors.PreconditionFailed:
                # Another run took it over first (its fresh lock refuses this one next time
                # round), or this run did, its answer lost.
                if self._ours(self._current()):
                    return
        current = self._current()
        raise _in_use(self.path, _parse(current[0])[0] if current else "a run that keeps "
                      "taking and releasing it")

    def renew(self, stop: threading.Event) -> None:
        """Rewrite the lock every third of the lease, while it is still ours."""
        while not stop.wait(self.lease / 3):
            try:
                self._write(if_generation_match=self.generation)
                continue
            except self._errors.PreconditionFailed:
                pass
            except self._errors.GoogleAPIError as e:  # the bucket unreachable: next period
                self.report(f"warning: could not renew the run lock {self.path} ({e}); "
                            "trying again")
                continue
            try:
                current = self._current()
            except self._errors.GoogleAPIError as e:
                self.report(f"warning: could not renew the run lock {self.path} ({e}); "
                            "trying again")
                continue
            if self._ours(current):
                continue  # our own write retried: it went through
            self.lost = True
            other = _parse(current[0])[0] if current else "deleted or being rewritten"
            self.report(f"warning: the lock {self.path} was taken over by another run "
                        f"({other}); this run no longer holds its run_dir")
            return

    def release(self) -> None:
        if self.lost:
            return
        try:
            self.blob.delete(if_generation_match=self.generation, retry=self._retry)
        except (self._errors.NotFound, self._errors.PreconditionFailed):
            pass  # taken over after the last renewal: it is another run's now
        except self._errors.GoogleAPIError as e:
            self.report(f"warning: could not release the lock {self.path} ({e}); it expires "
                        f"after {self.lease:g} s")


@contextlib.contextmanager
def _leased(path: storage.Path, report: Callable[[str], None]) -> Iterator[None]:
    """The lock object at `path`, taken and renewed for the block, deleted after it."""
    lock = _Lease(path, _lease_seconds(), report)
    lock.take()
    stop = threading.Event()
    renewer = threading.Thread(target=lock.renew, args=(stop,), name="run-lock-lease",
                               daemon=True)
    renewer.start()
    try:
        yield
    finally:
        stop.set()
        renewer.join()
        lock.release()
