"""The process a run lives in.

`started()` is the one place where a process is set up before JAX: `python -m train` and
the benchmarks import everything else inside it. Three things cannot wait for the imports:
- the platform (`platforms`): a host with libtpu installed but no TPU chips is kept on the
  CPU before JAX reads JAX_PLATFORMS, which also tells `host_memory` it is a CPU host;
- host memory (`host_memory`): malloc's settings must be chosen before JAX, Orbax and
  TensorStore start their threads, since each thread picks its malloc arena when it starts;
- the cyclic garbage collector (`collector`): the imports make hundreds of thousands of
  lasting objects and almost no garbage, so collections during them only scan; it is
  paused through them and what they made is frozen after.
Joining a multi-host job (`distributed.initialize`) needs the config, so it comes next,
before the first JAX call that starts a backend. While a run trains, the process holds
its run directory's lock (`run_lock`) and watches for preemption (`preemption`).

Only the standard library is imported here, so that importing this package starts nothing.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from train.process import collector, host_memory, platforms


@contextlib.contextmanager
def started() -> Iterator[bool]:
    """`with started() as kept:` import the libraries in the block; `kept` says whether freed
    host memory is kept in the process (CPU hosts)."""
    platforms.skip_absent_tpu()
    kept = host_memory.keep_freed_memory()
    with collector.imports_paused():
        yield kept


def describe(kept: bool) -> str:
    """What `started()` chose, for the run's log."""
    memory = ("freed memory kept in the process (malloc: one arena, no mmap, no trim)"
              if kept else "malloc's defaults")
    return f"platform: {platforms.describe()}; host memory: {memory}"
