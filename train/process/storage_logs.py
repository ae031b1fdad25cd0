"""Storage clients' own logs of a request that failed, kept to one line each.

When a bucket stops answering, gcsfs logs every request that ran out of tries with its
traceback, and Orbax logs the same error again from each of its save threads: dozens of
lines, while the run itself reports the failure once, naming the checkpoint step and the
cause (`checkpoint.Checkpointer`). Their messages stay; their tracebacks are dropped.
"""

from __future__ import annotations

import logging


def _connection_failure(error: BaseException | None) -> bool:
    """Whether `error` is a request that could not reach the storage server."""
    while error is not None:
        if isinstance(error, ConnectionError) or type(error).__module__.startswith(
                ("aiohttp", "requests", "urllib3", "google.api_core", "gcsfs")):
            return True
        error = error.__cause__
    return False


def _without_traceback(record: logging.LogRecord) -> bool:
    if record.exc_info and _connection_failure(record.exc_info[1]):
        record.exc_info, record.exc_text = None, None
    return True


def install() -> None:
    """Drop the tracebacks of failed storage requests from gcsfs's and Orbax's logs."""
    for name in ("gcsfs", "absl"):
        logger = logging.getLogger(name)
        if _without_traceback not in logger.filters:
            logger.addFilter(_without_traceback)
