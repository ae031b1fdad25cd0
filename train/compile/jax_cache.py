"""The persistent XLA compilation cache, and whether a compile was served from it."""

from __future__ import annotations

import os
import pathlib

import jax

import storage

_HIT_EVENT = "/jax/compilation_cache/cache_hits"
_hits = 0


def _count(event: str, **kwargs: object) -> None:
    global _hits
    if event == _HIT_EVENT:
        _hits += 1


jax.monitoring.register_event_listener(_count)


def enable(directory: str | pathlib.Path) -> str:
    """Cache compiled programs in `directory`; returns the directory actually in use.

    JAX opens its cache once per process, so a second run in the same process
    keeps the first run's directory.
    """
    current = jax.config.jax_compilation_cache_dir
    if not current:
        directory = storage.path(directory)  # JAX reads and writes gs:// itself
        directory.mkdir(parents=True, exist_ok=True)
        jax.config.update("jax_compilation_cache_dir", os.fspath(directory))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
        current = str(directory)
    return current


def hits() -> int:
    """Compilations served from the persistent cache so far in this process."""
    return _hits
