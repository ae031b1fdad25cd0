"""One training process per run directory: a second is refused, a killed one frees it."""

import os
import signal
import subprocess
import sys

import pytest

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
