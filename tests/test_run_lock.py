"""One training process per run directory: a second is refused, a killed one frees it."""

import os
import re
import signal
import subprocess
import sys
import threading
import time

import pytest

import storage
from conftest import TINY_OVERRIDES, tiny_config
from train import run
from train.__main__ import main
from train.process.run_lock import RunDirInUseError, held

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHORT = ("checkpoint.every=0", "train.eval_batches=0")


def test_a_second_run_on_the_same_run_dir_is_refused_naming_the_first(tmp_path):
    with held(tmp_path, 0):
        with pytest.raises(RunDirInUseError, match=rf"in use .*\(pid {os.getpid()} on "):
            run(tiny_config(*SHORT, f"run_dir={tmp_path}"))
    assert run(tiny_config(*SHORT, f"run_dir={tmp_path}")).final_step == 6  # released
    other_process = tmp_path / "other"
    with held(other_process, 1):  # each process of a multi-process run has its own lock
        assert run(tiny_config(*SHORT, f"run_dir={other_process}")).final_step == 6


def test_the_cli_refuses_a_held_run_dir_and_a_killed_holder_leaves_no_lock(tmp_path, capsys):
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from train.process.run_lock import held\n"
         f"with held({str(tmp_path)!r}, 0):\n print('held', flush=True); time.sleep(600)"],
        cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert main([*TINY_OVERRIDES, *SHORT, f"run_dir={tmp_path}"]) == 2
        err = capsys.readouterr().err
        assert f"error: run_dir {tmp_path} is in use by another training process (pid " \
               f"{holder.pid} on " in err
        assert "Traceback" not in err
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert run(tiny_config(*SHORT, f"run_dir={tmp_path}")).final_step == 6


def test_a_lock_in_a_bucket_refuses_a_second_run_is_renewed_and_released(bucket, monkeypatch):
    monkeypatch.setenv("IO_FIRST_LM_LOCK_LEASE_S", "0.9")
    run_dir = f"{bucket}/run"
    lock = storage.path(run_dir) / "run.0.lock"
    with held(run_dir, 0):
        holder, lease, token = lock.read_text().splitlines()
        assert re.fullmatch(rf"pid {os.getpid()} on \S+ since \d{{4}}-\d\d-\d\dT[\d:]+", holder)
        assert lease == "lease 0.9 s" and re.fullmatch(r"token [0-9a-f]{32}", token)
        with pytest.raises(RunDirInUseError) as refused:
            with held(run_dir, 0):
                pass
        assert str(refused.value) == (
            f"run_dir {run_dir} is in use by another training process ({holder}; lock {lock}); "
            "stop it first, or choose another run_dir")
        generation = _generation(lock)
        time.sleep(0.5)  # past a third of the lease: renewed since, still ours
        assert _generation(lock) > generation
        assert lock.read_text().splitlines() == [holder, lease, token]
    assert not lock.exists()  # released
    with held(run_dir, 0):  # free again
        assert lock.read_text().splitlines()[2] != token


def test_a_lock_left_in_a_bucket_by_a_killed_run_expires_after_the_lease(bucket, monkeypatch):
    monkeypatch.setenv("IO_FIRST_LM_LOCK_LEASE_S", "1")
    run_dir = f"{bucket}/run"
    lock = storage.path(run_dir) / "run.0.lock"
    lost = "pid 1 on a-lost-vm since 2026-12-01T00:00:00"
    lock.write_text(f"{lost}\nlease 1 s\ntoken 0123\n")  # nobody renews it
    with pytest.raises(RunDirInUseError, match=re.escape(f"({lost}; lock {lock})")):
        with held(run_dir, 0):
            pass
    time.sleep(1.2)
    reports = []
    with held(run_dir, 0, report=reports.append):
        assert lock.read_text().startswith(f"pid {os.getpid()} on ")
    assert len(reports) == 1 and reports[0].startswith(
        f"warning: taking over the lock of a run that stopped renewing it ({lost}); lock {lock} "
        "last renewed 1 s ago, lease 1 s")
    assert not lock.exists()


def test_of_two_runs_taking_over_a_stale_lock_one_wins(bucket, monkeypatch):
    monkeypatch.setenv("IO_FIRST_LM_LOCK_LEASE_S", "1")
    run_dir = f"{bucket}/run"
    lock = storage.path(run_dir) / "run.0.lock"
    lock.write_text("pid 1 on a-lost-vm since 2026-12-01T00:00:00\n")  # no lease: ours counts
    time.sleep(1.1)
    both_tried, outcomes = threading.Barrier(2, timeout=10), []

    def contend():
        try:
            with held(run_dir, 0, report=lambda _: None):
                outcomes.append(("won", lock.read_text()))
                both_tried.wait()
        except RunDirInUseError as e:
            outcomes.append(("refused", str(e)))
            both_tried.wait()

    contenders = [threading.Thread(target=contend) for _ in range(2)]
    for t in contenders:
        t.start()
    for t in contenders:
        t.join()
    assert sorted(kind for kind, _ in outcomes) == ["refused", "won"]
    won, refused = dict(outcomes)["won"], dict(outcomes)["refused"]
    assert f"({won.splitlines()[0]}; lock {lock})" in refused  # the winner, not the lost run
    assert not lock.exists()


def test_a_run_whose_lock_was_taken_over_is_warned_and_keeps_going(bucket, monkeypatch):
    from google.api_core import exceptions
    from google.cloud.storage import Blob

    monkeypatch.setenv("IO_FIRST_LM_LOCK_LEASE_S", "0.6")
    upload, failures = Blob.upload_from_string, []

    def flaky(self, *args, **kwargs):  # the bucket does not answer the first renewal
        if kwargs.get("if_generation_match") and not failures:
            failures.append(1)
            raise exceptions.ServiceUnavailable("the bucket is away")
        return upload(self, *args, **kwargs)

    monkeypatch.setattr(Blob, "upload_from_string", flaky)
    run_dir = f"{bucket}/run"
    lock = storage.path(run_dir) / "run.0.lock"
    reports = []
    with held(run_dir, 0, report=reports.append):
        time.sleep(0.5)  # one renewal failed, the next went through
        assert reports == [f"warning: could not renew the run lock {lock} (503 the bucket is "
                           "away); trying again"]
        generation = _generation(lock)
        time.sleep(0.3)
        assert _generation(lock) > generation
        lock.write_text("pid 2 on another-vm since 2026-12-01T00:00:00\n")  # taken over
        time.sleep(0.4)
    assert reports[1:] == [f"warning: the lock {lock} was taken over by another run (pid 2 on "
                           "another-vm since 2026-12-01T00:00:00); this run no longer holds "
                           "its run_dir"]
    assert lock.read_text().startswith("pid 2 on another-vm")  # the other run's, not deleted


def _generation(lock) -> int:
    from google.cloud import storage as gcs_client

    bucket, name = storage.paths.bucket_and_name(lock)
    return gcs_client.Client().bucket(bucket).get_blob(name).generation
