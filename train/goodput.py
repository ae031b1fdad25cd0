"""Where a run's wall time went: initialisation, compilation, productive steps, data wait,
checkpoint blocking, evaluation, and the rest (idle)."""

from __future__ import annotations

import json
import pathlib
import time

import jax

CATEGORIES = ("initialisation", "compilation", "productive steps", "data wait",
              "checkpoint blocking", "evaluation", "idle")
FILENAME = "goodput.json"


class Goodput:
    """Seconds per category since construction; `idle` is whatever the others do not cover."""

    def __init__(self) -> None:
        self.started = time.perf_counter()
        self.seconds = dict.fromkeys(CATEGORIES[:-1], 0.0)

    def add(self, category: str, seconds: float) -> None:
        self.seconds[category] += seconds

    def report(self) -> dict[str, float]:
        total = time.perf_counter() - self.started
        breakdown = dict(self.seconds)
        breakdown["idle"] = max(0.0, total - sum(breakdown.values()))
        return {"total": total, **breakdown}

    def save_and_print(self, run_dir: str | pathlib.Path, say) -> dict[str, float]:
        figures = self.report()
        if jax.process_index() == 0:
            path = pathlib.Path(run_dir) / FILENAME
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(figures, indent=1))
        total = max(figures["total"], 1e-9)
        lines = [f"goodput: {100 * figures['productive steps'] / total:.1f}% of "
                 f"{figures['total']:.1f} s wall time"]
        lines += [f"  {name:<20} {figures[name]:8.2f} s {100 * figures[name] / total:6.1f}%"
                  for name in CATEGORIES]
        say("\n".join(lines))
        return figures
