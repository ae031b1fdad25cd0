"""`python -m train` as a process on a gs:// run dir: stopped, killed, refused, resumed."""

import os
import random
import re
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

import storage
from checkpoint import Checkpointer, checkpoint_dir, complete_steps
from conftest import (
    TINY_OVERRIDES,
    tiny_config,
    wait_for_line,
    without_shared_compile_cache,
)
from sharding import make_mesh, with_shardings
from train import run
from train.__main__ import main
from train.optimizer import make_optimizer
from train.state import abstract_state, state_shardings

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LONG = ("train.steps=24", "checkpoint.every=2", "train.log_every=1", "train.eval_batches=0")
LEASE_S = 3.0

# `python -m train`, with an audit hook that names every connection or name lookup the
# Python clients (gcsfs, google-cloud-storage, google-auth) make to anywhere but 127.0.0.1.
# TensorStore connects from C++, past the hook: TENSORSTORE_GCS_HTTP_URL points it here.
LOCAL_ONLY = (
    "import runpy, sys\n"
    "def hook(event, args):\n"
    "    if event == 'socket.connect' and isinstance(args[1], tuple):\n"
    "        host = args[1][0]\n"
    "    elif event == 'socket.getaddrinfo':\n"
    "        host = args[0]\n"
    "    else:\n"
    "        return\n"
    "    if host not in ('127.0.0.1', 'localhost', b'127.0.0.1', b'localhost', None):\n"
    "        print(f'LEFT 127.0.0.1: {event} {args[:2]}', file=sys.stderr, flush=True)\n"
    "sys.addaudithook(hook)\n"
    "sys.argv[0] = 'train'\n"
    "runpy.run_module('train', run_name='__main__')\n")


def start_train(run_dir, *overrides, env=None) -> subprocess.Popen:
    """`python -m train` on `run_dir` (LONG, a short lease), its output piped."""
    env = dict(os.environ if env is None else env, IO_FIRST_LM_LOCK_LEASE_S=str(LEASE_S))
    return subprocess.Popen(
        [sys.executable, "-c", LOCAL_ONLY, *TINY_OVERRIDES, *LONG, f"run_dir={run_dir}",
         *overrides], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env=env)


def finish(process, timeout=180) -> str:
    out, _ = process.communicate(timeout=timeout)
    assert "LEFT 127.0.0.1" not in out, out
    return out


def final_state(run_dir, config, step=None):
    """(step, state) of the run's checkpoint `step`, by default its latest complete one."""
    mesh = make_mesh(config.mesh)
    tx = make_optimizer(config.optim, config.train.steps)
    target = with_shardings(abstract_state(config, tx), state_shardings(config, mesh, tx))
    ckpt = Checkpointer(checkpoint_dir(run_dir), config.checkpoint, report=lambda _: None)
    try:
        restored = (ckpt.restore_latest(target, fallback=False) if step is None
                    else ckpt.restore(step, target))
    finally:
        ckpt.close()
    return restored.step, restored.state


def assert_same_state(a, b) -> None:
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.slow
def test_a_cli_run_in_a_bucket_is_stopped_refused_killed_and_resumed_to_the_local_run(
        bucket, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("IO_FIRST_LM_LOCK_LEASE_S", str(LEASE_S))
    run_dir = f"{bucket}/run"
    first = start_train(run_dir)
    wait_for_line(first, r"checkpoint step \d+: committed")
    # A second run on the same run dir, while the first trains: refused, naming it.
    assert main([*TINY_OVERRIDES, *LONG, f"run_dir={run_dir}"]) == 2
    err = capsys.readouterr().err
    assert f"error: run_dir {run_dir} is in use by another training process (pid {first.pid} " \
           f"on " in err
    assert "Traceback" not in err

    first.send_signal(signal.SIGTERM)
    out = finish(first)
    assert first.returncode == 0, out[-3000:]
    stopped = int(re.search(r"stopped by signal 15 after step (\d+);", out).group(1))
    assert 2 <= stopped < 24 and complete_steps(checkpoint_dir(run_dir))[-1] == stopped

    # Resumed, then killed a seeded random moment after a later step was committed.
    rng = random.Random(19)
    second = start_train(run_dir)
    lines = wait_for_line(second, r"checkpoint step \d+: committed")
    assert f"resumed from checkpoint step {stopped} in {run_dir}/checkpoints" in "".join(lines)
    time.sleep(rng.uniform(0.0, 0.3))
    second.kill()
    killed_at = time.monotonic()
    finish(second)
    assert second.returncode == -signal.SIGKILL, "the run ended before it was killed"
    # Its lock is left behind: refused while its lease runs, naming the holder and time left.
    assert main([*TINY_OVERRIDES, *LONG, f"run_dir={run_dir}"]) == 2
    err = capsys.readouterr().err
    left = float(re.search(r"its lock expires in ([\d.]+) s unless its holder renews it",
                           err).group(1))
    assert f"(pid {second.pid} on " in err and 0 < left <= LEASE_S

    time.sleep(max(0.0, killed_at + LEASE_S + 0.2 - time.monotonic()))
    third = start_train(run_dir, env=without_shared_compile_cache())  # XLA's cache: the bucket
    out = finish(third)
    assert third.returncode == 0, out[-3000:]
    assert f"compilation cache: {run_dir}/compile_cache" in out
    assert "saved executables are kept on local disk only" in out
    assert any(name.startswith("jit_train_step-")
               for name in storage.files_under(f"{run_dir}/compile_cache"))
    assert f"warning: taking over the lock of a run that stopped renewing it (pid {second.pid} " \
           in out
    assert "checkpoint step 24: committed" in out

    config = tiny_config(*LONG, f"run_dir={tmp_path}")
    run(config)  # the same run, uninterrupted, on local disk
    step_local, local = final_state(tmp_path, config)
    step_bucket, in_bucket = final_state(run_dir, config)
    assert step_local == step_bucket == 24
    assert_same_state(local, in_bucket)
