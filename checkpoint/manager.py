"""Orbax checkpoints of {train state, data position, resolved config}, saved asynchronously.

Orbax writes a step into a temporary directory and renames it into place only
when complete, so a process killed mid-write never leaves a "latest" step that
is half written. After the rename we add checksums (see `integrity`). What only
reads checkpoints (steps, saved configs, parameters) is in `reader`.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import os
import pathlib
import re
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import jax
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as policies

import storage
from checkpoint import aftermath, integrity, reader
from checkpoint.reader import TMP_SUFFIX, CheckpointError, verified_restore
from configs.schema import CheckpointConfig

T = TypeVar("T")


def _bound_tensorstore_retries() -> None:
    """TensorStore (Orbax's array writer) tries a Cloud Storage request 32 times by default,
    its backoff growing to 32 s: a dead bucket would hold a save for about a quarter of an
    hour. Its tries and backoff are made those of the other clients (`storage.gcs_tries`,
    ~31 s by default). Orbax builds every TensorStore context from these two templates."""
    from orbax.checkpoint._src.serialization import tensorstore_utils

    retries = {"max_retries": storage.paths.gcs_tries(), "initial_delay": "1s",
               "max_delay": "16s"}
    # Private names (orbax-checkpoint 0.12): tests/test_storage.py fails if they go away.
    for name in ("_BASE_TS_CONTEXT", "_DEFAULT_OCDBT_TS_CONTEXT"):
        template = getattr(tensorstore_utils, name, None)
        if isinstance(template, dict):
            template["gcs_request_retries"] = retries


_bound_tensorstore_retries()


@dataclasses.dataclass(frozen=True)
class Restored:
    step: int
    state: Any
    data_position: dict[str, Any]
    config: dict[str, Any]


@dataclasses.dataclass
class _InFlight:
    step: int
    started: float


class Checkpointer:
    """Save and restore run checkpoints under `directory`."""

    def __init__(self, directory: str | pathlib.Path, cfg: CheckpointConfig,
                 report: Callable[[str], None] = print):
        self.directory = storage.path(directory)
        self.cfg = cfg
        self.report = report
        # Orbax finalises saves one at a time, in order: the oldest entry is the one
        # its post-finalisation callback is about.
        self._in_flight: collections.deque[_InFlight] = collections.deque()
        self._lock = threading.Lock()
        self._closed = False
        self._last_started: int | None = None  # the step whose save began last
        self.blocked_seconds = 0.0
        """Total time callers were blocked by saves, for the goodput report."""
        self._watchers: list[threading.Thread] = []
        keep: list[Any] = [policies.LatestN(cfg.keep)]
        if cfg.keep_every:
            keep.append(policies.EveryNSteps(cfg.keep_every))
        # Orbax calls back only for asynchronous saves; `save` calls it for synchronous ones.
        async_options = (ocp.AsyncOptions(post_finalization_callback=self._on_written)
                         if cfg.async_save else None)
        options = ocp.CheckpointManagerOptions(
            preservation_policy=policies.AnyPreservationPolicy(keep),
            enable_async_checkpointing=cfg.async_save, create=True, async_options=async_options)
        handlers = {
            "state": _state_handler(cfg.compress),
            "data": ocp.JsonCheckpointHandler(),
            "config": ocp.JsonCheckpointHandler(),
        }
        self._manager = ocp.CheckpointManager(self.directory, options=options,
                                              item_handlers=handlers)
        # The newest step known complete, for the error of a failed save in a bucket: the
        # listing that would say may fail for the reason the save did (the bucket is down).
        # Orbax lists the steps when it starts, then counts each step it begins to save, so
        # only its first answer is taken; the steps reported committed follow.
        self._latest_known: int | None = self._manager.latest_step()
        aftermath.watch(self.directory)  # a failed write is reported once, by `_write_errors`

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def save(self, step: int, state: Any, data_position: dict[str, Any],
             config: dict[str, Any]) -> float:
        """Start saving; returns the seconds the caller was blocked (device-to-host copy).

        Steps still queued on the device are waited for first and not counted:
        the loop would wait for them at its next metrics fetch anyway.
        """
        if step in self._manager.all_steps():
            return 0.0
        jax.block_until_ready(state)
        args = ocp.args.Composite(
            state=ocp.args.PyTreeSave(state),
            data=ocp.args.JsonSave(data_position),
            config=ocp.args.JsonSave(config))
        started = time.perf_counter()
        # Orbax finalises a step on the primary process only (it alone calls back), so
        # only there are checksums written: one writer per shared step directory.
        primary = jax.process_index() == 0
        with self._write_errors(self._last_started):  # the previous save, still writing
            self._manager.wait_until_finished()
        if primary:
            with self._lock:
                self._in_flight.append(_InFlight(step, started))
        self._last_started = step
        with self._write_errors(step):
            self._manager.save(step, args=args, force=True)
            if primary and not self.cfg.async_save:
                self._on_written()
        blocked = time.perf_counter() - started
        self.blocked_seconds += blocked
        self.report(f"checkpoint step {step}: loop blocked {1e3 * blocked:.1f} ms")
        return blocked

    def _on_written(self) -> None:
        """Runs once a save's data is on disk: add checksums, then watch for the commit.

        Orbax calls this just before it renames the temporary directory into
        place, so the checksums become visible atomically with the step.
        """
        with self._lock:
            if not self._in_flight:
                return
            in_flight = self._in_flight.popleft()
        size = integrity.write_checksums(self._unfinished_dir(in_flight.step))
        watcher = threading.Thread(target=self._report_when_committed, args=(in_flight, size),
                                   daemon=True)
        watcher.start()
        self._watchers.append(watcher)

    def _report_when_committed(self, in_flight: _InFlight, size: int) -> None:
        """Report once the step is complete: from then on it can be resumed from."""
        step_dir = self.directory / str(in_flight.step)
        # On disk the step's final name appears with it; on Cloud Storage, its commit file.
        # Each look at a bucket is a request: look there twice a second, not 200 times.
        final, interval = ((step_dir / reader.COMMITTED, 0.5) if storage.is_remote(step_dir)
                           else (step_dir / integrity.MANIFEST, 0.005))
        try:
            while not final.exists():
                if self._closed:
                    return
                time.sleep(interval)
        except Exception:  # the bucket unreachable: the save's own error says so, once
            return
        with self._lock:
            self._latest_known = max(in_flight.step, self._latest_known or -1)
        elapsed = time.perf_counter() - in_flight.started
        self.report(f"checkpoint step {in_flight.step}: committed {elapsed:.2f} s after the "
                    f"save started ({size / 1e6:.1f} MB)")

    def _unfinished_dir(self, step: int) -> storage.Path:
        """Where step `step` is being written: Orbax's temporary directory, else the final one."""
        pending = sorted(self.directory.glob(f"{step}{TMP_SUFFIX}*"))
        return pending[-1] if pending else self.directory / str(step)

    def restore(self, step: int, target: Any) -> Restored:
        """Read step `step` into `target`'s structure, each array straight into its sharding."""
        restore_args = ocp.checkpoint_utils.construct_restore_args(target)
        args = ocp.args.Composite(
            state=ocp.args.PyTreeRestore(item=target, restore_args=restore_args),
            data=ocp.args.JsonRestore(),
            config=ocp.args.JsonRestore())
        restored = verified_restore(self.directory, step, self.report,
                                    lambda: self._manager.restore(step, args=args))
        return Restored(step, restored.state, dict(restored.data), dict(restored.config))

    def restore_latest(self, target: Any, fallback: bool,
                       newest: int | None = None) -> Restored | None:
        """The newest step (up to `newest`) that restores; with `fallback`, damaged steps
        are skipped, newest first."""
        found = self.newest_readable(lambda step: self.restore(step, target), fallback, newest)
        return found[1] if found else None

    def newest_readable(self, read: Callable[[int], T], fallback: bool,
                        newest: int | None = None) -> tuple[int, T] | None:
        """`(step, read(step))` for the newest step (up to `newest`) that `read` does not
        refuse with a CheckpointError; with `fallback`, older steps are tried in turn."""
        for step in reversed(self.all_steps()):
            if newest is not None and step > newest:
                continue
            try:
                return step, read(step)
            except CheckpointError as e:
                if not fallback:
                    raise CheckpointError(
                        f"{e}\nset checkpoint.fallback=true to resume from the previous "
                        "complete checkpoint instead") from e
                self.report(f"warning: {e}; falling back to the previous checkpoint")
        return None

    def read_config(self, step: int) -> dict[str, Any]:
        """Only the resolved config saved with a step (see `reader.saved_config`)."""
        return reader.saved_config(self.directory, step)

    def wait(self) -> None:
        """Block until background writes have finished."""
        with self._write_errors(self._last_started):
            self._manager.wait_until_finished()

    def close(self) -> None:
        try:
            with self._write_errors(self._last_started):
                self._manager.close()
        finally:
            self._closed = True  # a save that failed never commits: stop watching for it
            for watcher in self._watchers:
                watcher.join(timeout=1.0)

    @contextlib.contextmanager
    def _write_errors(self, step: int | None) -> Iterator[None]:
        """Orbax's report of a failed write of `step` (disk full, no permission, ...) as a
        CheckpointError naming the step, the directory, the cause and what remains.

        Orbax reports a failure once, at the next wait or save, and takes later saves:
        one that finds room again commits with its own checksums.
        """
        try:
            yield
        except Exception as e:  # Orbax and TensorStore raise many types
            if step is None:  # no save was started: not a write that failed
                raise
            with self._lock:  # the failed step is never finalised: no checksums for it
                self._in_flight = collections.deque(
                    f for f in self._in_flight if f.step != step)
            raise CheckpointError(self._describe_failure(step, e)) from e

    def _describe_failure(self, step: int, error: Exception) -> str:
        if storage.is_remote(self.directory):
            latest = self._latest_known  # no listing of a bucket that may be down
        else:
            try:
                latest = self._manager.latest_step()
            except Exception:  # the listing may fail for the same reason the write did
                latest = None
        remains = (f"the latest complete checkpoint is step {latest}" if latest is not None
                   else "no checkpoint of this run is complete")
        return (f"checkpoint step {step} could not be written to {self.directory}: "
                f"{_cause(error)}\n{remains}; nothing written before it was touched")


def _cause(error: Exception) -> str:
    """The error's message on one line, led by the operating system's words when
    TensorStore gives an errno (its own message ends with it, after two long paths)."""
    text = " ".join(str(error).split()) or type(error).__name__
    errno = re.search(r"os_error_code='?(\d+)", text)
    if errno:
        text = f"{os.strerror(int(errno.group(1)))} ({text[:400]})"
    return text[:600]


def _state_handler(compress: bool) -> ocp.PyTreeCheckpointHandler:
    """Orbax's handler for the train state.

    Orbax's default splits each replicated array into slices, one per replica, so
    that several hosts share its write; it cuts those slices on the device while the
    loop waits. A single process writes every shard itself, so there it saves
    unsliced, and the loop waits only for the copy (README, Performance).
    """
    if jax.process_count() > 1:
        return ocp.PyTreeCheckpointHandler(use_compression=compress)
    handlers = ocp.type_handlers
    scalar = handlers.ScalarHandler()
    registry = handlers.create_type_handler_registry(
        (int, scalar), (float, scalar), (bytes, scalar), (np.number, scalar),
        (np.ndarray, handlers.NumpyHandler()), (str, handlers.StringHandler()),
        (jax.Array, handlers.ArrayHandler(use_replica_parallel=False)))
    return ocp.PyTreeCheckpointHandler(use_compression=compress, type_handler_registry=registry)
