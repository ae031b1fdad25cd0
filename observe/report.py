"""`python -m observe.report RUN_DIR [--out FILE]`: a PNG of a run's curves from its metrics.jsonl.

Panels: train loss with held-out loss per dataset, tokens/s, and data wait as a share of
step time. From a notebook: `observe.report.plot(run_dir)` writes the PNG and returns its
path; `observe.report.figure(run_dir)` returns the matplotlib Figure itself.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import pathlib
import sys
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

import storage
from observe.metrics_log import FILENAME

DEFAULT_OUT = "report.png"
_NUMBER = (int, float)


class ReportError(Exception):
    """metrics.jsonl is missing, empty or unreadable; the message names the file (and line)."""


@dataclasses.dataclass(frozen=True)
class History:
    """A run's records, one per step: a resumed run's re-done steps replace the earlier ones."""

    train: list[dict[str, Any]]
    """Train records, sorted by step."""
    evals: dict[str, list[dict[str, Any]]]
    """Eval records of each dataset, sorted by step."""


def read(run_dir: str | pathlib.Path) -> History:
    """The latest record of every step of `RUN_DIR/metrics.jsonl`."""
    path = storage.path(run_dir) / FILENAME
    records = _parse(path)
    train = _latest_per_step(r for r in records if "loss" in r)
    if not train:
        raise ReportError(f"{path} has no train records (no record with a 'loss')")
    datasets = sorted({r["dataset"] for r in records if "eval_loss" in r})
    evals = {name: _latest_per_step(r for r in records
                                    if "eval_loss" in r and r["dataset"] == name)
             for name in datasets}
    return History(train, evals)


def _parse(path: storage.Path) -> list[dict[str, Any]]:
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ReportError(f"{path} not found: is this a run directory?") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ReportError(f"{path} could not be read: {e}") from None
    records = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise ReportError(f"{path} line {number} is not valid JSON ({e.msg}): "
                              f"{line[:80]!r}") from None
        problem = _problem(record)
        if problem:
            raise ReportError(f"{path} line {number} is not a metrics record: {problem}")
        records.append(record)
    if not records:
        raise ReportError(f"{path} is empty")
    return records


def _problem(record: Any) -> str | None:
    """What makes a parsed line unusable, or None. Records of other kinds are let through."""
    if not isinstance(record, dict):
        return f"a JSON {type(record).__name__}, not an object"
    if not isinstance(record.get("step"), int) or isinstance(record["step"], bool):
        return f"'step' is {record.get('step')!r}, not an integer"
    if "eval_loss" in record and not isinstance(record.get("dataset"), str):
        return "an eval record without a 'dataset' name"
    for key in ("loss", "eval_loss", "tokens_per_s", "data_wait_pct"):
        value = record.get(key, 0)
        if not isinstance(value, _NUMBER) or isinstance(value, bool):
            return f"'{key}' is {value!r}, not a number"
    return None


def _latest_per_step(records: Any) -> list[dict[str, Any]]:
    # Later lines win: a run resumed from an earlier checkpoint appends its re-done steps.
    by_step = {record["step"]: record for record in records}
    return [by_step[step] for step in sorted(by_step)]


def _series(records: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    """Steps and values of the records that have `key` (older files may lack a field)."""
    kept = [r for r in records if key in r]
    return [r["step"] for r in kept], [float(r[key]) for r in kept]


def figure(run_dir: str | pathlib.Path) -> Figure:
    """Loss, tokens/s and data-wait panels over steps, sharing the step axis."""
    history = read(run_dir)
    fig = Figure(figsize=(8, 9), layout="constrained")
    FigureCanvasAgg(fig)  # rendered off-screen: no display, no pyplot global state
    loss_ax, speed_ax, wait_ax = fig.subplots(3, 1, sharex=True)
    loss_ax.plot(*_series(history.train, "loss"), label="train")
    for name, records in history.evals.items():
        loss_ax.plot(*_series(records, "eval_loss"), "o--", label=f"eval: {name}")
    loss_ax.set(ylabel="loss", title=storage.path(run_dir).name)
    loss_ax.legend()
    speed_ax.plot(*_series(history.train, "tokens_per_s"), label="tokens/s")
    speed_ax.set(ylabel="tokens / s")
    wait_ax.plot(*_series(history.train, "data_wait_pct"), label="data wait %")
    wait_ax.set(ylabel="data wait, % of step time", xlabel="step")
    for ax in (loss_ax, speed_ax, wait_ax):
        ax.grid(alpha=0.3)
    speed_ax.set_ylim(bottom=0)
    wait_ax.set_ylim(bottom=0)
    return fig


def plot(run_dir: str | pathlib.Path, out: str | pathlib.Path | None = None) -> storage.Path:
    """Write the report PNG (default `RUN_DIR/report.png`; a gs:// URL too); returns its path."""
    path = storage.path(out if out is not None else storage.path(run_dir) / DEFAULT_OUT)
    fig = figure(run_dir)
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=100)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(png.getvalue())
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m observe.report",
        description="Plot loss, tokens/s and data wait of a run from RUN_DIR/metrics.jsonl.")
    parser.add_argument("run_dir", metavar="RUN_DIR")
    parser.add_argument("--out", default=None, help=f"PNG to write (default RUN_DIR/{DEFAULT_OUT})")
    args = parser.parse_args(argv)
    try:
        path = plot(args.run_dir, args.out)
    except ReportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {path} ({path.stat().length:,} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
