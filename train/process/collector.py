"""Python's cyclic garbage collector, kept off start-up and away from what start-up made.

Start-up (imports, building the state, tracing the step) makes hundreds of thousands of
long-lived objects and almost no garbage, yet the collections that find the little there
is scan all of them, a real share of a warm restart (README, Performance). So the
collector is paused through a command's imports (`imports_paused`) and while a run
starts (`StartUp`); when training begins, what start-up made is frozen (collections during
the loop no longer scan it) and the collector resumes for the loop's own garbage. When the
run ends, the frozen objects become collectable again: a notebook calling `run` many times
keeps nothing.
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator
from types import TracebackType


@contextlib.contextmanager
def imports_paused() -> Iterator[None]:
    """The collector off for the block (a command's imports); what the block made is then
    frozen for the life of the process, and the collector resumes."""
    gc.disable()
    try:
        yield
    finally:
        gc.freeze()
        gc.enable()


class StartUp:
    """`with StartUp() as startup:` pauses the collector; `startup.done()` when training
    begins; leaving the block restores the collector as it was."""

    def __enter__(self) -> StartUp:
        self.was_enabled = gc.isenabled()
        gc.disable()
        self.frozen = False
        return self

    def done(self) -> None:
        gc.freeze()
        self.frozen = True
        if self.was_enabled:
            gc.enable()

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 traceback: TracebackType | None) -> None:
        if self.frozen:
            gc.unfreeze()
        if self.was_enabled:
            gc.enable()
