"""One training process per run directory: a second is refused, a killed one frees it."""

import os
import re
import signal
import subprocess
import sys
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
    monkeypatch.setenv("IO_FIRST_LM_LOCK_LEASE_S", "0.6")
    run_dir = f"{bucket}/run"
    lock = storage.path(run_dir) / "run.0.lock"
    with held(run_dir, 0):
        holder = lock.read_text()
        assert holder.startswith(f"pid {os.getpid()} on ")
        with pytest.raises(RunDirInUseError, match=rf"in use .*\({re.escape(holder)}; lock "
                                                   rf"{re.escape(os.fspath(lock))}\)"):
            with held(run_dir, 0):
                pass
        generation = _generation(lock)
        time.sleep(0.5)  # past a third of the lease: renewed since
        assert _generation(lock) > generation
    assert not lock.exists()  # released


def test_a_lock_left_in_a_bucket_by_a_killed_run_expires_after_the_lease(bucket, monkeypatch):
    monkeypatch.setenv("IO_FIRST_LM_LOCK_LEASE_S", "1")
    run_dir = f"{bucket}/run"
    lock = storage.path(run_dir) / "run.0.lock"
    lock.write_text("pid 1 on a-lost-vm since 2026-12-01T00:00:00")  # nobody renews it
    with pytest.raises(RunDirInUseError, match="a-lost-vm"):
        with held(run_dir, 0):
            pass
    time.sleep(1.2)
    reports = []
    with held(run_dir, 0, report=reports.append):
        assert lock.read_text().startswith(f"pid {os.getpid()} on ")
    assert "stopped renewing it" in reports[0] and "a-lost-vm" in reports[0]


def _generation(lock) -> int:
    from google.cloud import storage as gcs_client

    bucket, _, name = os.fspath(lock).removeprefix("gs://").partition("/")
    return gcs_client.Client().bucket(bucket).get_blob(name).generation
