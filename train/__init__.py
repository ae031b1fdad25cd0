"""The training loop: `run(config)` for notebooks, `python -m train` for the command line.

`run` is imported on first use, so that `python -m train` can set up its process
(`train.process`) before JAX and the checkpoint libraries start their threads.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from train.loop import RunResult, run

__all__ = ["RunResult", "run"]


def __getattr__(name: str):
    if name in __all__:
        from train import loop
        return getattr(loop, name)
    raise AttributeError(f"module 'train' has no attribute {name!r}")
