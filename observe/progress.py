"""The run's console: plain message lines, and on a terminal a progress bar kept below them.

On a terminal the bar (steps done/total, steps/s, ETA, last logged loss) is redrawn in place
and every message is printed above it. Anywhere else (CI, a log file, a notebook) only the
plain lines are written: no carriage returns, no escape codes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import queue
import shutil
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, TextIO

CLEAR_LINE = "\r\x1b[K"  # back to column 0, then erase to the end of the line
BAR_WIDTH = 20


def eta_seconds(done: int, left: int, elapsed: float) -> float | None:
    """Seconds until `left` more steps are done, at the mean rate of the `done` steps so far."""
    if done <= 0 or elapsed <= 0:
        return None
    return left * elapsed / done


def format_duration(seconds: float | None) -> str:
    """`M:SS` or `H:MM:SS`; `?` while unknown."""
    if seconds is None:
        return "?"
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


@dataclasses.dataclass
class StepBar:
    """Progress of one invocation's steps, from `first` (already done) to `end`, as one line."""

    first: int
    """Step the invocation started from (a resumed run starts past 0)."""
    end: int
    """Last step of this invocation."""
    started: float
    """Clock reading when the bar started; rate and ETA count from here."""
    step: int = dataclasses.field(init=False)
    """Last finished step."""
    at: float = dataclasses.field(init=False)
    """Clock reading when `step` finished: the rate does not decay while nothing runs."""
    loss: float | None = None
    """Loss of the last logged step."""
    eval_loss: float | None = None
    """The latest held-out loss."""

    def __post_init__(self) -> None:
        self.step, self.at = self.first, self.started

    def text(self, columns: int) -> str:
        done, left = self.step - self.first, self.end - self.step
        elapsed = self.at - self.started
        total = max(self.end - self.first, 1)
        filled = BAR_WIDTH * done // total
        bar = ("=" * filled + ">" + " " * BAR_WIDTH)[:BAR_WIDTH]
        parts = [f"{100 * done / total:3.0f}% [{bar}] {self.step}/{self.end}",
                 f"{done / elapsed:.2f} steps/s" if done and elapsed > 0 else "- steps/s",
                 f"ETA {format_duration(eta_seconds(done, left, elapsed))}"]
        if self.loss is not None:
            parts.append(f"loss {self.loss:.4f}")
        if self.eval_loss is not None:
            parts.append(f"held-out {self.eval_loss:.4f}")
        return " | ".join(parts)[:max(columns - 1, 0)]  # a wrapped line cannot be redrawn


class Console:
    """Writes message lines; on a terminal also a step bar below them. Thread-safe: checkpoint
    threads report while the loop redraws."""

    def __init__(self, stream: TextIO | None = None, min_redraw_s: float = 0.1,
                 clock: Callable[[], float] = time.perf_counter, columns: int | None = None):
        self._stream = stream  # None: sys.stdout at each write, as pytest and notebooks swap it
        self._min_redraw_s = min_redraw_s
        self._clock = clock
        self._columns = columns
        self._lock = threading.Lock()
        self._bar: StepBar | None = None
        self._shown = False  # whether a bar line is on screen now
        self._drawn_at = -float("inf")

    @property
    def stream(self) -> TextIO:
        return self._stream or sys.stdout

    def is_terminal(self) -> bool:
        isatty = getattr(self.stream, "isatty", None)
        return bool(isatty and isatty())

    def say(self, message: str) -> None:
        """A message line; above the bar when one is shown."""
        with self._lock:
            self._erase()
            self.stream.write(message + "\n")
            if self._bar is not None:
                self._draw()
            self.stream.flush()

    @contextlib.contextmanager
    def bar(self, first: int, end: int, show: bool = True) -> Iterator[StepWatcher]:
        """A bar over steps first..end while inside, moved by the yielded watcher as steps
        finish; removed however the block ends."""
        if show:
            self.start_bar(first, end)
        watcher = StepWatcher(self if self._bar is not None else None)
        try:
            yield watcher
        finally:
            watcher.close()
            self.end_bar()

    def start_bar(self, first: int, end: int) -> None:
        """Show a bar over steps first..end; does nothing unless the stream is a terminal."""
        if not self.is_terminal():
            return
        with self._lock:
            self._bar = StepBar(first, end, self._clock())
            self._draw()
            self.stream.flush()

    def update_bar(self, step: int | None = None, loss: float | None = None,
                   eval_loss: float | None = None) -> None:
        """Record progress; redrawn at most every min_redraw_s, and always at the last step."""
        with self._lock:
            if self._bar is None:
                return
            if step is not None:
                self._bar.step, self._bar.at = step, self._clock()
            if loss is not None:
                self._bar.loss = loss
            if eval_loss is not None:
                self._bar.eval_loss = eval_loss
            due = self._clock() - self._drawn_at >= self._min_redraw_s
            if due or self._bar.step == self._bar.end:
                self._draw()
                self.stream.flush()

    def end_bar(self) -> None:
        """Remove the bar; later messages are plain lines."""
        with self._lock:
            self._erase()
            self._bar = None
            self.stream.flush()

    def _draw(self) -> None:
        columns = self._columns or shutil.get_terminal_size().columns
        self.stream.write(CLEAR_LINE + self._bar.text(columns))
        self._shown, self._drawn_at = True, self._clock()

    def _erase(self) -> None:
        if self._shown:
            self.stream.write(CLEAR_LINE)
            self._shown = False


class StepWatcher:
    """Moves the bar as steps finish on the device rather than as they are dispatched.

    Dispatch is asynchronous and runs ahead until the loop next fetches a value, so counting
    dispatched steps makes the bar jump and its rate lie. A thread waits on each step's output
    in turn (the wait releases the GIL) and reports it done.
    """

    def __init__(self, console: Console | None):
        self._console = console  # None: no bar shown, nothing to watch
        self._queue: queue.SimpleQueue[tuple[int, Any] | None] = queue.SimpleQueue()
        self._thread = None
        if console is not None:
            self._thread = threading.Thread(target=self._watch, name="step-watcher", daemon=True)
            self._thread.start()

    def dispatched(self, step: int, output: Any) -> None:
        """Step `step` was dispatched; `output` (a jax.Array) is ready when it has finished."""
        if self._thread is not None:
            self._queue.put((step, output))

    def close(self) -> None:
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join()
            self._thread = None

    def _watch(self) -> None:
        while (item := self._queue.get()) is not None:
            step, output = item
            try:
                output.block_until_ready()
            except Exception:  # the loop sees the step's failure itself; stop showing progress
                return
            self._console.update_bar(step)
