"""Keep freed host memory in the process, so that XLA:CPU steps stop page-faulting.

XLA:CPU allocates all of a step's temporaries as one block, hundreds of MB for a small
model. glibc serves a block that big with a fresh `mmap` and returns it with `munmap` when
the step ends, so every step page-faults the whole block in again as newly zeroed pages,
in the kernel. With one malloc arena (a thread arena cannot hold the block and falls back
to `mmap`), no `mmap` and no trimming, the block is reused from one step to the next
(README, Performance, has what it saved).

Accelerator hosts keep glibc's defaults: their step memory lives on the device.
"""

from __future__ import annotations

import ctypes
import importlib.util
import os
import sys

# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8
_SETTINGS = ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, -1))  # -1: never trim

_ACCELERATOR_PLUGINS = ("libtpu", "jax_cuda12_plugin", "jax_cuda13_plugin", "jax_rocm7_plugin")


def keep_freed_memory() -> bool:
    """Apply the settings above if JAX will run on the CPU of a Linux/glibc host.

    Call it before JAX starts its backend (its threads pick their arena when they start).
    Returns whether the settings were applied.
    """
    if not sys.platform.startswith("linux") or not cpu_backend_expected():
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # another C library (musl): leave it alone
        return False
    return all(mallopt(option, value) == 1 for option, value in _SETTINGS)


def cpu_backend_expected() -> bool:
    """True if JAX is asked for the CPU (JAX_PLATFORMS) or has no accelerator plugin."""
    platforms = os.environ.get("JAX_PLATFORMS", "")
    if platforms:
        return platforms.split(",")[0].strip() == "cpu"
    return not any(importlib.util.find_spec(name) for name in _ACCELERATOR_PLUGINS)
