"""When periodic work is due: the one place the loop asks "is it time at this step"."""

from __future__ import annotations


def itstime(step: int, every: int, *, last: bool = False, first: bool = False) -> bool:
    """Due at every `every`-th step (0: never), at step 1 if `first`, and whenever `last`
    (the run's final step, or the one a preemption stops at). Steps count from 1."""
    return last or (first and step == 1) or (every > 0 and step % every == 0)
