"""`profile.start_step` / `profile.steps`: a JAX profiler trace of a window of steps, written
to `<run_dir>/profile/` for TensorBoard's profile plugin or ui.perfetto.dev.
"""

from __future__ import annotations

import os
import pathlib
import shutil
import tempfile
from collections.abc import Callable
from typing import Any

import jax

import storage
from configs.schema import ProfileConfig

DIRNAME = "profile"


def window(config: ProfileConfig, start: int, end: int) -> tuple[int, int] | None:
    """The steps (first, last) to trace in an invocation that trains steps start+1..end.

    Steps are numbered as on the log line: the first step of a run is 1. A resumed run traces
    only the part of the window it has not trained yet; None when nothing of it is left.
    """
    if config.steps == 0:
        return None
    first = max(config.start_step, start + 1)
    last = min(config.start_step + config.steps - 1, end)
    return (first, last) if first <= last else None


class StepProfiler:
    """Starts the trace before the window's first step and stops it after the last one.

    A context manager: leaving it early (preemption, an error) stops a running trace, so
    what was traced is written and a notebook can trace again.
    """

    def __init__(self, config: ProfileConfig, run_dir: str | pathlib.Path, start: int,
                 end: int, report: Callable[[str], None]):
        self.directory = storage.path(run_dir) / DIRNAME
        # The profiler writes local files: for a gs:// run dir, into a local temporary
        # folder (made when the trace starts), copied up when the trace stops.
        self._local: pathlib.Path | None = (
            None if storage.is_remote(self.directory) else pathlib.Path(self.directory))
        self.report = report
        chief = jax.process_index() == 0  # one trace per run, like the other logs
        planned = window(config, start, end)
        self.window = planned if chief else None
        self.tracing = False
        if chief and config.steps and planned is None:
            report(f"profile: steps {config.start_step}-{config.start_step + config.steps - 1} "
                   f"are outside this run's steps {start + 1}-{end}; not traced")

    def __enter__(self) -> StepProfiler:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.tracing:
            self._stop()

    def before_step(self, step: int, state: Any) -> None:
        """Call before fetching step `step`'s batch; starts the trace at the window's start."""
        if self.window is None or step != self.window[0]:
            return
        jax.block_until_ready(state)  # earlier steps finish outside the trace
        if storage.is_remote(self.directory):
            self._local = pathlib.Path(tempfile.mkdtemp(prefix="profile-"))
        self._local.mkdir(parents=True, exist_ok=True)
        jax.profiler.start_trace(str(self._local), create_perfetto_trace=True)
        self.tracing = True
        first, last = self.window
        self.report(f"profile: tracing steps {first}-{last} into {self.directory}")

    def after_step(self, step: int, outputs: Any) -> None:
        """Call after dispatching step `step`; stops the trace after the window's last step."""
        if self.tracing and step == self.window[1]:
            jax.block_until_ready(outputs)  # dispatch is asynchronous: wait for the real work
            self._stop()

    def _stop(self) -> None:
        jax.profiler.stop_trace()
        self.tracing = False
        # jax writes into plugins/profile/<timestamp>/ under the directory it was given.
        runs = list((self._local / "plugins" / "profile").iterdir())
        latest = self.directory / max(runs, key=os.path.getmtime).relative_to(self._local)
        if storage.is_remote(self.directory):
            try:  # the same relative layout under <run_dir>/profile/ in the bucket
                for name in storage.files_under(self._local):
                    (self.directory / name).write_bytes((self._local / name).read_bytes())
            finally:
                shutil.rmtree(self._local, ignore_errors=True)
                self._local = None
        self.report(f"profile: trace written to {latest} (TensorBoard: --logdir "
                    f"{self.directory}; Perfetto: open {latest / 'perfetto_trace.json.gz'} in "
                    "ui.perfetto.dev)")
