"""What a failed restore or save leaves behind, kept off the terminal.

When a restore fails (say, on a damaged file), Orbax closes its event loop while
TensorStore still finishes the reads it had issued. Each of them then fails to hand its
result to the closed loop, which Python prints as "RuntimeError: Event loop is closed"
with a traceback; those that failed as well are logged again by asyncio as "Future (or
Task) exception was never retrieved". Orbax's read coroutines that were never finished
raise again when the collector closes them ("Exception ignored in: <coroutine ...>").
One damaged file gives hundreds of lines of them, at any later moment, after the run has
reported the step and file and fallen back. A write that fails (a full disk) leaves the
same behind, once per array, and Orbax logs the failure from several threads, each time
with its traceback. The failure is reported once, by the caller;
its aftermath is dropped here, and Orbax's log lines about it keep their message but not
their traceback. Every other error still reaches Python's hook and the logs as it was.

Two calls, because one patches process-wide hooks and the other does not: the commands
(`train.run`, `python -m generate`, `python -m hf.convert`) `install()` the filters once,
as part of setting up their process; the checkpoint code only `watch`es the directories it
reads and writes. A notebook that restores by hand can call `install()` itself.
"""

from __future__ import annotations

import logging
import pathlib
import re
import sys
import traceback
from typing import Any

_directories: set[str] = set()  # checkpoint directories read or written in this process
_UNRETRIEVED = re.compile(r"\w+ exception was never retrieved")  # Future, Task, _GatheringFuture


def watch(directory: str | pathlib.Path) -> None:
    """Count failures on `directory` among ours: their aftermath is dropped once installed."""
    _directories.add(str(directory))


def install() -> None:
    """Drop the aftermath of failed restores and saves on watched directories from now on
    (Python's unraisable hook and two log filters); calling it again does nothing."""
    if not getattr(sys.unraisablehook, "drops_checkpoint_aftermath", False):
        sys.unraisablehook = _dropping_aftermath(sys.unraisablehook)
    for logger, dropping in ((logging.getLogger("asyncio"), _unretrieved_errors_of_ours),
                             (logging.getLogger("absl"), _traceback_of_ours_dropped)):
        if dropping not in logger.filters:
            logger.addFilter(dropping)


def _dropping_aftermath(previous: Any) -> Any:
    def hook(unraisable: Any) -> None:
        error = unraisable.exc_value
        if not (_is_callback_to_closed_loop(error) or _is_closed_read_of_ours(error)):
            previous(unraisable)

    hook.drops_checkpoint_aftermath = True
    return hook


def _is_callback_to_closed_loop(error: BaseException | None) -> bool:
    """Whether `error` is a callback handed to an event loop after it closed."""
    return (isinstance(error, RuntimeError) and str(error) == "Event loop is closed"
            and any(frame.f_code.co_name == "call_soon_threadsafe"
                    for frame, _ in traceback.walk_tb(error.__traceback__)))


def _is_closed_read_of_ours(error: BaseException | None) -> bool:
    """Whether `error` came from a read of our checkpoints closed before it finished."""
    return (isinstance(error, Exception) and isinstance(error.__cause__, GeneratorExit)
            and _names_our_directory(error))


def _unretrieved_errors_of_ours(record: logging.LogRecord) -> bool:
    """False (drop) for asyncio's report of an unretrieved error on our checkpoints."""
    if not _UNRETRIEVED.match(str(record.msg)):
        return True
    return not _names_our_directory(record.exc_info[1] if record.exc_info else None)


def _traceback_of_ours_dropped(record: logging.LogRecord) -> bool:
    """Keep the record (Orbax's own account of a failure), without a traceback of ours."""
    if _names_our_directory(record.exc_info[1] if record.exc_info else None):
        record.exc_info, record.exc_text = None, None
    return True


def _names_our_directory(error: BaseException | None) -> bool:
    return any(directory in str(error) for directory in _directories)
