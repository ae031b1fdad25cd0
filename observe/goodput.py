"""Where a run's wall time went: initialisation, compilation, productive steps, data wait,
checkpoint blocking, evaluation, and the rest (idle)."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import pathlib
import time
from collections.abc import Iterator

import jax

import storage

CATEGORIES = ("initialisation", "compilation", "productive steps", "data wait",
              "checkpoint blocking", "evaluation", "idle")
FILENAME = "goodput.json"


@dataclasses.dataclass
class Phase:
    """A measured stretch of one category: its own seconds, less the phases inside it."""

    category: str
    seconds: float = 0.0
    nested: float = 0.0


class Goodput:
    """Seconds per category since construction; `idle` is whatever the others do not cover.

    Phases nest: the time of a phase inside another (a save inside the step loop) counts
    for the inner one only.
    """

    def __init__(self) -> None:
        self.started = time.perf_counter()
        self.seconds = dict.fromkeys(CATEGORIES[:-1], 0.0)
        self._open: list[Phase] = []

    @contextlib.contextmanager
    def phase(self, category: str) -> Iterator[Phase]:
        """Measure the block as `category`; the yielded Phase holds its seconds afterwards."""
        phase = Phase(category)
        self._open.append(phase)
        started = time.perf_counter()
        try:
            yield phase
        finally:
            elapsed = time.perf_counter() - started
            self._open.remove(phase)
            phase.seconds = max(0.0, elapsed - phase.nested)
            self.seconds[category] += phase.seconds
            if self._open:
                self._open[-1].nested += elapsed

    def attribute(self, category: str, seconds: float) -> None:
        """Count seconds measured elsewhere (inside the open phase) as `category`."""
        self.seconds[category] += seconds
        if self._open:
            self._open[-1].nested += seconds

    def report(self) -> dict[str, float]:
        total = time.perf_counter() - self.started
        breakdown = dict(self.seconds)
        breakdown["idle"] = max(0.0, total - sum(breakdown.values()))
        return {"total": total, **breakdown}

    def save_and_print(self, run_dir: str | pathlib.Path, say) -> dict[str, float]:
        figures = self.report()
        if jax.process_index() == 0:
            path = storage.path(run_dir) / FILENAME
            path.parent.mkdir(parents=True, exist_ok=True)
            storage.write_atomically(path, json.dumps(figures, indent=1))
        total = max(figures["total"], 1e-9)
        lines = [f"goodput: {100 * figures['productive steps'] / total:.1f}% of "
                 f"{figures['total']:.1f} s wall time"]
        lines += [f"  {name:<20} {figures[name]:8.2f} s {100 * figures[name] / total:6.1f}%"
                  for name in CATEGORIES]
        say("\n".join(lines))
        return figures
