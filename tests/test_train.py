import contextlib
import io
import json
import os
import re
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from checkpoint import checkpoint_dir, complete_steps
from conftest import TINY_OVERRIDES, tiny_config
from observe import goodput, metrics_log
from train import run
from train.__main__ import main

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _train_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "train", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=300)


@pytest.mark.slow
def test_python_m_train_runs_and_loss_falls(tmp_path, capsys):
    result = _train_cli(*TINY_OVERRIDES, "model.embed_dim=64", "train.steps=40",
                        "train.log_every=10", "optim.learning_rate=1e-2", f"run_dir={tmp_path}")
    assert result.returncode == 0, result.stderr[-3000:]
    losses = [float(x) for x in re.findall(r"^step +\d+ \| loss ([\d.]+)", result.stdout, re.M)]
    assert len(losses) == 5  # steps 1, 10, 20, 30, 40
    assert losses[-1] < losses[0] - 1.0
    assert "tok/s" in result.stdout and "eval: held-out loss" in result.stdout
    assert (tmp_path / "checkpoints" / "40").is_dir()

    # The command's own function, in this process: one interpreter start less.
    assert main([*TINY_OVERRIDES, "train.steps=40", "model.embed_dim=64",
                 "optim.learning_rate=1e-2", f"run_dir={tmp_path}"]) == 0
    assert "resumed from checkpoint step 40" in capsys.readouterr().out


def test_cli_reports_user_errors_without_traceback(tmp_path, capsys):
    assert main([f"run_dir={tmp_path}", f"data.path={tmp_path / 'missing'}"]) == 2
    err = capsys.readouterr().err
    assert "error: data.path" in err and "does not exist" in err
    assert "Traceback" not in err


@pytest.mark.slow
def test_resumed_run_ends_bit_identical_to_uninterrupted_run(tmp_path):
    # With dropout: its masks come from (seed, step), which a resumed run restores.
    common = ("train.steps=6", "checkpoint.every=3", "train.eval_batches=0",
              "model.embed_dropout=0.1", "model.attention_dropout=0.1",
              "model.residual_dropout=0.1")
    whole = run(tiny_config(*common, f"run_dir={tmp_path / 'whole'}"))

    stopped = tiny_config(*common, f"run_dir={tmp_path / 'split'}", "train.stop_after=3")
    first = run(stopped)
    assert first.final_step == 3
    second = run(tiny_config(*common, f"run_dir={tmp_path / 'split'}"))
    assert second.start_step == 3 and second.final_step == 6

    for a, b in zip(jax.tree.leaves(whole.state), jax.tree.leaves(second.state), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert whole.losses[6] == second.losses[6]


@pytest.mark.slow
def test_resume_on_fewer_devices_continues_with_the_same_batches(tmp_path):
    """Elastic resume: a run checkpointed on 8 devices continues on 2 or 1 device with the
    same global batches, so its losses follow the uninterrupted 8-device run."""
    common = ("checkpoint.every=2", "train.log_every=1", "train.eval_batches=0")
    whole = run(tiny_config(*common, "mesh.data=1", "mesh.fsdp=8", f"run_dir={tmp_path / 'w'}"))
    for devices in (2, 1):
        run_dir = tmp_path / f"on{devices}"  # the 8-device run as it was at its step-2 save
        shutil.copytree(tmp_path / "w", run_dir)
        for later in (4, 6):
            shutil.rmtree(run_dir / "checkpoints" / str(later))
        resumed = run(tiny_config(*common, "mesh.data=1", "mesh.fsdp=-1", f"run_dir={run_dir}"),
                      devices=jax.devices()[:devices])
        assert resumed.start_step == 2
        np.testing.assert_allclose([resumed.losses[s] for s in (3, 4, 5, 6)],
                                   [whole.losses[s] for s in (3, 4, 5, 6)], rtol=1e-5)


@pytest.mark.slow
def test_grain_worker_processes_give_the_same_run_and_resume_with_another_count(tmp_path):
    common = ("checkpoint.every=2", "train.log_every=1", "train.eval_batches=0")
    threads = run(tiny_config(*common, f"run_dir={tmp_path / 'threads'}"))
    first = run(tiny_config(*common, "data.workers=2", "train.stop_after=2",
                            f"run_dir={tmp_path / 'workers'}"))
    resumed = run(tiny_config(*common, "data.workers=1", f"run_dir={tmp_path / 'workers'}"))
    assert first.losses[2] == threads.losses[2]
    assert resumed.start_step == 2
    assert [resumed.losses[s] for s in (3, 4, 5, 6)] == [threads.losses[s] for s in (3, 4, 5, 6)]


@pytest.fixture(scope="module")
def logged_run(tmp_path_factory):
    """A tiny run stopped after step 2 and resumed to its end (step 6): logs every 2 steps,
    saves every 2, evaluates at the end. The run dir, the records the first part wrote, the
    resumed part's RunResult and what it printed."""
    run_dir = tmp_path_factory.mktemp("logged_run")
    common = ("train.log_every=2", "checkpoint.every=2", "train.eval_batches=1",
              f"run_dir={run_dir}")
    run(tiny_config(*common, "train.stop_after=2"))
    first = metrics_log.read(run_dir)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        result = run(tiny_config(*common))
    return run_dir, first, result, printed.getvalue()


def test_metrics_jsonl_records_logged_steps_and_eval_and_appends_on_restart(logged_run):
    run_dir, first, result, _ = logged_run
    records = metrics_log.read(run_dir)
    assert records[:len(first)] == first  # appended, never overwritten
    steps = [r["step"] for r in records if "loss" in r]
    assert steps == [1, 2, 4, 6]
    assert records[-1]["eval_loss"] == result.eval_loss and records[-1]["step"] == 6
    assert {r["step"]: r["loss"] for r in records if "loss" in r}[6] == result.losses[6]
    assert all(r["tokens_per_s"] > 0 and r["data_wait_pct"] >= 0 for r in records if "loss" in r)


def test_goodput_report_accounts_for_the_whole_wall_time(logged_run):
    run_dir, _, _, printed = logged_run
    figures = json.loads((run_dir / "goodput.json").read_text())
    parts = {k: v for k, v in figures.items() if k != "total"}
    assert set(parts) == set(goodput.CATEGORIES)
    assert abs(sum(parts.values()) - figures["total"]) < 1e-6
    assert all(v >= 0 for v in parts.values())
    for category in ("initialisation", "compilation", "productive steps",
                     "checkpoint blocking", "evaluation"):
        assert parts[category] > 0, category
    assert "goodput:" in printed


def test_log_lines_carry_the_checkpoint_blocking_of_their_interval(logged_run):
    records = {r["step"]: r for r in metrics_log.read(logged_run[0]) if "loss" in r}
    assert records[1]["checkpoint_blocked_ms"] == 0.0  # no save before step 1's line
    assert records[4]["checkpoint_blocked_ms"] > 0.0  # the step-4 save
    # The last line of each part waits for its own save: step 2 (stop_after), step 6 (end).
    assert records[2]["checkpoint_blocked_ms"] > 0.0
    assert records[6]["checkpoint_blocked_ms"] > 0.0


def test_a_non_finite_last_loss_stops_the_run_before_its_state_is_saved(tmp_path):
    # A learning rate of 1e30: step 2's gradient is not finite, so step 3's loss is NaN.
    config = tiny_config("train.steps=3", "checkpoint.every=100", "optim.warmup_steps=0",
                         "optim.learning_rate=1e30", "train.eval_batches=0",
                         f"run_dir={tmp_path}")
    with pytest.raises(FloatingPointError, match=r"loss is nan at step 3; stopping"):
        run(config)
    assert complete_steps(checkpoint_dir(tmp_path)) == []
