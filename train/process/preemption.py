"""Stop and save requests from signals: SIGTERM/SIGINT stop after the step, SIGUSR1 saves.

TPU VMs and cloud GPUs are preempted with SIGTERM. The loop finishes the step
it is in, saves, waits for the write, and exits 0. A second SIGTERM/SIGINT
exits at once: the write in progress is in a temporary directory and never
becomes the latest checkpoint, so nothing already saved is lost.
"""

from __future__ import annotations

import os
import signal
import threading
from types import FrameType

import jax
from jax.experimental import multihost_utils

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Preemption:
    """Installs the handlers for the duration of a `with` block (main thread only)."""

    def __init__(self) -> None:
        self.stop_signal: int | None = None
        self._save_requested = False
        self._previous: dict[int, object] = {}

    def __enter__(self) -> Preemption:
        # Multi-process runs leave SIGTERM to JAX's preemption service, whose sync
        # point makes every process stop at the same step.
        if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
            for sig in (*STOP_SIGNALS, signal.SIGUSR1):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if signum == signal.SIGUSR1:
            self._save_requested = True
        elif self.stop_signal is not None:
            os._exit(128 + signum)  # second stop signal: leave now, saved steps are safe
        else:
            self.stop_signal = signum
            print(f"received {signal.Signals(signum).name}: finishing the step, saving, then "
                  "exiting; send it again to exit at once", flush=True)

    def should_stop(self, step: int) -> bool:
        """True on every process once any process was told to stop (at the same step)."""
        if jax.process_count() > 1:
            return multihost_utils.reached_preemption_sync_point(step)
        return self.stop_signal is not None

    def take_save_request(self) -> bool:
        requested, self._save_requested = self._save_requested, False
        return requested
