"""What a person watching a run sees: the terminal bar and log lines, TensorBoard events next
to metrics.jsonl, and profiler traces of chosen steps."""

import gzip
import io
import json
import sys
import threading

import numpy as np
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from configs import ConfigError
from configs.schema import ProfileConfig
from conftest import tiny_config
from observe import metrics_log, profiling, report, tensorboard_log
from observe.progress import CLEAR_LINE, Console, StepBar, eta_seconds, format_duration
from train import run


class FakeStream(io.StringIO):
    """A text stream that says whether it is a terminal."""

    def __init__(self, tty: bool):
        super().__init__()
        self.tty = tty

    def isatty(self) -> bool:
        return self.tty


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _screen(raw: str) -> list[str]:
    """The lines a terminal keeps: of each line, what follows its last carriage-return-erase."""
    return [line.rpartition(CLEAR_LINE)[2] for line in raw.split("\n")]


def test_eta_is_the_steps_left_at_the_mean_rate_so_far():
    assert eta_seconds(done=50, left=150, elapsed=10.0) == 30.0
    assert eta_seconds(done=0, left=10, elapsed=5.0) is None
    assert [format_duration(s) for s in (None, 0, 30, 61.4, 3725)] == [
        "?", "0:00", "0:30", "1:01", "1:02:05"]
    # A run resumed at step 100 of 300, 50 steps done in 10 s: 5 steps/s, 150 left, 30 s.
    bar = StepBar(first=100, end=300, started=0.0, loss=2.5)
    bar.step, bar.at = 150, 10.0
    assert bar.text(columns=200) == (
        " 25% [=====>              ] 150/300 | 5.00 steps/s | ETA 0:30 | loss 2.5000")
    assert len(bar.text(columns=30)) == 29  # never wraps, or it could not be redrawn


def test_terminal_gets_a_bar_redrawn_in_place_below_whole_log_lines():
    stream, clock = FakeStream(tty=True), FakeClock()
    console = Console(stream, min_redraw_s=0.1, clock=clock, columns=200)
    console.start_bar(0, 4)
    clock.now = 1.0
    console.update_bar(1)
    console.update_bar(loss=3.0)  # within 0.1 s of the last draw: kept for the next one
    console.say("step 1 | loss 3.0")
    clock.now = 2.0
    console.update_bar(4)  # the last step is always drawn
    console.end_bar()
    console.say("done")

    bar0 = "  0% [>                   ] 0/4 | - steps/s | ETA ?"
    bar1 = " 25% [=====>              ] 1/4 | 1.00 steps/s | ETA 0:03"
    bar4 = "100% [====================] 4/4 | 2.00 steps/s | ETA 0:00 | loss 3.0000"
    assert stream.getvalue() == (
        CLEAR_LINE + bar0 + CLEAR_LINE + bar1 + CLEAR_LINE + "step 1 | loss 3.0\n"
        + CLEAR_LINE + bar1 + " | loss 3.0000" + CLEAR_LINE + bar4 + CLEAR_LINE + "done\n")
    assert _screen(stream.getvalue()) == ["step 1 | loss 3.0", "done", ""]


def test_not_a_terminal_gets_plain_lines_only():
    stream = FakeStream(tty=False)
    console = Console(stream, min_redraw_s=0.0)

    class NeverWaited:
        def block_until_ready(self):
            raise AssertionError("no bar, so no step is waited on")

    with console.bar(0, 4) as steps:
        steps.dispatched(1, NeverWaited())
        console.update_bar(2, loss=3.0)
        console.say("step 2 | loss 3.0")
    console.say("done")
    assert stream.getvalue() == "step 2 | loss 3.0\ndone\n"


def test_bar_moves_when_a_step_has_finished_not_when_it_was_dispatched():
    stream = FakeStream(tty=True)
    console = Console(stream, min_redraw_s=0.0, columns=200)

    class Pending:
        def __init__(self):
            self.finished = threading.Event()

        def block_until_ready(self):
            self.finished.wait(timeout=10)

    step_one, step_two = Pending(), Pending()
    with console.bar(0, 4) as steps:
        steps.dispatched(1, step_one)
        steps.dispatched(2, step_two)
        threading.Event().wait(0.2)
        assert "1/4" not in stream.getvalue()  # dispatched, not finished
        step_one.finished.set()
        while "1/4" not in stream.getvalue():
            threading.Event().wait(0.01)
        assert "2/4" not in stream.getvalue()
        step_two.finished.set()
    assert "2/4" in stream.getvalue()  # leaving the block waits for the steps dispatched


@pytest.mark.parametrize("tty", [pytest.param(True, marks=pytest.mark.slow), False])
def test_run_prints_log_lines_whole_with_a_bar_only_on_a_terminal(tmp_path, monkeypatch, tty):
    stream = FakeStream(tty)
    monkeypatch.setattr(sys, "stdout", stream)
    run(tiny_config("train.log_every=2", "train.eval_batches=0", "checkpoint.every=0",
                    f"run_dir={tmp_path}"))
    raw = stream.getvalue()
    lines = _screen(raw)
    logged = [line for line in lines if line.startswith("step ")]
    assert [line.split("|")[0] for line in logged] == [
        "step      1 ", "step      2 ", "step      4 ", "step      6 "]
    assert all(line.endswith(" ms") for line in logged)
    assert not any("steps/s" in line for line in lines)  # no bar is left on screen
    if tty:
        assert "100% [====================] 6/6 |" in raw and CLEAR_LINE in raw
    else:
        assert "\r" not in raw and "\x1b" not in raw


def _tensorboard_scalars(run_dir) -> dict[str, list[tuple[int, float, float]]]:
    """Tag -> [(step, value, wall time)], as TensorBoard itself reads the event files."""
    events = EventAccumulator(str(run_dir / tensorboard_log.DIRNAME))
    events.Reload()
    return {tag: [(e.step, e.value, e.wall_time) for e in events.Scalars(tag)]
            for tag in events.Tags()["scalars"]}


def _expected_scalars(records) -> dict[str, list[tuple[int, float, float]]]:
    """The same from metrics.jsonl; TensorBoard keeps scalars as float32."""
    expected: dict[str, list] = {}
    for record in records:
        for tag, value in tensorboard_log.scalars(record).items():
            expected.setdefault(tag, []).append(
                (record["step"], float(np.float32(value)), record["time"]))
    return expected


def test_tensorboard_events_equal_metrics_jsonl_across_a_resume(tmp_path):
    common = ("train.log_every=1", "train.eval_batches=1", f"run_dir={tmp_path}")
    run(tiny_config(*common, "train.stop_after=2"))
    run(tiny_config(*common))
    records = metrics_log.read(tmp_path)
    scalars = _tensorboard_scalars(tmp_path)

    assert scalars == _expected_scalars(records)
    assert [step for step, _, _ in scalars["train/loss"]] == [1, 2, 3, 4, 5, 6]
    assert [step for step, _, _ in scalars["eval/default corpus/eval_perplexity"]] == [2, 6]
    assert {tag.removeprefix("train/") for tag in scalars if tag.startswith("train/")} == {
        "loss", "lr", "grad_norm", "tokens_per_s", "mfu", "step_ms", "data_wait_ms",
        "data_wait_pct", "checkpoint_blocked_ms"}
    assert scalars["train/loss"][5][1] == pytest.approx(records[-2]["loss"], rel=1e-6)


def test_tensorboard_sees_each_record_at_once_and_writers_of_one_second_coexist(tmp_path):
    first = tensorboard_log.TensorBoardLog(tmp_path)
    first.write({"step": 1, "loss": 2.5, "time": 100.0})
    assert _tensorboard_scalars(tmp_path) == {"train/loss": [(1, 2.5, 100.0)]}  # still open

    second = tensorboard_log.TensorBoardLog(tmp_path)  # a restart within the same second
    second.write({"step": 2, "dataset": "web", "eval_loss": 1.25, "time": 101.0})
    first.close()
    second.close()
    assert len(list((tmp_path / tensorboard_log.DIRNAME).iterdir())) == 2
    assert _tensorboard_scalars(tmp_path) == {"train/loss": [(1, 2.5, 100.0)],
                                              "eval/web/eval_loss": [(2, 1.25, 101.0)]}


def test_profile_window_is_clipped_to_the_steps_an_invocation_trains():
    config = ProfileConfig(start_step=2, steps=2)
    assert profiling.window(config, start=0, end=6) == (2, 3)
    assert profiling.window(config, start=2, end=6) == (3, 3)  # resumed inside the window
    assert profiling.window(config, start=3, end=6) is None  # resumed past it
    assert profiling.window(config, start=0, end=2) == (2, 2)  # stop_after cuts it
    assert profiling.window(ProfileConfig(start_step=2, steps=0), start=0, end=6) is None


def test_profile_config_is_validated():
    with pytest.raises(ConfigError, match="profile.steps must be >= 0"):
        tiny_config("profile.steps=-1")
    with pytest.raises(ConfigError, match="profile.start_step counts steps .* from 1"):
        tiny_config("profile.start_step=0", "profile.steps=2")
    with pytest.raises(ConfigError, match=r"past the last step of the run, train.steps \(6\)"):
        tiny_config("profile.start_step=7", "profile.steps=1")
    assert tiny_config("profile.start_step=0").profile.steps == 0  # off: start_step unused


def _step_executions(trace_events: list[dict]) -> int:
    """Executions of the compiled train step: one event each (per-device copies are '[i] ...')."""
    return sum(1 for e in trace_events if e.get("ph") == "X"
               and e.get("name", "").startswith("CommonPjRtLoadedExecutable::Execute")
               and e["name"].endswith("(jit_train_step)"))


@pytest.mark.slow
def test_profile_traces_exactly_the_chosen_steps_and_not_again_after_resume(tmp_path, capsys):
    common = ("profile.start_step=2", "profile.steps=2", "train.eval_batches=0",
              f"run_dir={tmp_path}")
    run(tiny_config(*common, "train.stop_after=4"))
    traces = list((tmp_path / "profile" / "plugins" / "profile").iterdir())
    assert len(traces) == 1
    xplanes = list(traces[0].glob("*.xplane.pb"))
    assert len(xplanes) == 1 and xplanes[0].stat().st_size > 0
    with gzip.open(traces[0] / "perfetto_trace.json.gz") as f:
        events = json.load(f)["traceEvents"]
    assert _step_executions(events) == 2  # steps 2 and 3, nothing before or after
    out = capsys.readouterr().out
    assert f"profile: tracing steps 2-3 into {tmp_path / 'profile'}" in out
    assert f"profile: trace written to {traces[0]}" in out

    run(tiny_config(*common))  # resumes at step 4, past the window
    assert list((tmp_path / "profile" / "plugins" / "profile").iterdir()) == traces
    assert "profile: steps 2-3 are outside this run's steps 5-6; not traced" in (
        capsys.readouterr().out)


def test_eval_every_reports_held_out_loss_during_the_run_in_every_view(tmp_path):
    result = run(tiny_config("train.steps=6", "train.eval_every=2", "train.eval_batches=1",
                             "checkpoint.every=0", f"run_dir={tmp_path}"))
    evals = [r for r in metrics_log.read(tmp_path) if "eval_loss" in r]
    assert [r["step"] for r in evals] == [2, 4, 6]  # the end's evaluation is step 6's
    assert evals[-1]["eval_loss"] == result.eval_loss
    assert len({r["eval_loss"] for r in evals}) == 3  # measured anew each time
    scalars = _tensorboard_scalars(tmp_path)
    assert [step for step, _, _ in scalars["eval/default corpus/eval_loss"]] == [2, 4, 6]
    history = report.read(tmp_path)  # what the PNG report plots
    assert [r["step"] for r in history.evals["default corpus"]] == [2, 4, 6]
    goodput = json.loads((tmp_path / "goodput.json").read_text())
    assert goodput["evaluation"] > 0


def test_bar_shows_the_latest_held_out_loss():
    bar = StepBar(first=0, end=10, started=0.0)
    bar.loss, bar.eval_loss = 2.5, 2.75
    assert "loss 2.5000 | held-out 2.7500" in bar.text(200)
