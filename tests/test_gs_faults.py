"""A gs:// run whose server goes away mid-save, or answers with 503s and delays."""

import os
import re

import pytest
from gcs_proxy import FaultyProxy
from test_train_process_on_gs import (
    LONG,
    assert_same_state,
    final_state,
    finish,
    start_train,
)

from checkpoint import checkpoint_dir, complete_steps
from conftest import SAVED_RUN, tiny_config, wait_for_line
from gcs_server import emulator_env
from train import run

CONFIG = tiny_config(*LONG)


@pytest.fixture(scope="module")
def local_run(tmp_path_factory):
    """(step, state) of the whole run, uninterrupted, on local disk."""
    run_dir = tmp_path_factory.mktemp("local")
    run(tiny_config(*LONG, f"run_dir={run_dir}"))
    return final_state(run_dir, CONFIG)


@pytest.mark.slow
def test_a_server_stopped_mid_save_is_one_named_error_and_the_run_resumes_after(
        gcs_server, bucket, local_run):
    run_dir = f"{bucket}/run"
    # Three tries (~3 s) instead of six (~31 s) per request: the same path, sooner.
    env = dict(os.environ, IO_FIRST_LM_GCS_TRIES="3")
    process = start_train(run_dir, env=env)
    wait_for_line(process, r"checkpoint step 4: committed")
    lines = wait_for_line(process, r"checkpoint step \d+: loop blocked")
    saving = int(lines[-1].split()[2].rstrip(":"))  # its write goes on in the background
    gcs_server.stop()
    try:
        out = finish(process, timeout=120)
    finally:
        gcs_server.start()
    assert process.returncode == 2, out[-3000:]
    errors = [line for line in out.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, out[-3000:]
    failed = int(re.match(r"error: checkpoint step (\d+) could not be written to ", errors[0])
                 .group(1))
    assert saving <= failed and errors[0].startswith(
        f"error: checkpoint step {failed} could not be written to {run_dir}/checkpoints: ")
    assert "Connect call failed" in errors[0] or "Connection refused" in errors[0]
    assert "Traceback" not in out
    latest = int(re.search(r"the latest complete checkpoint is step (\d+);", out).group(1))
    complete = complete_steps(checkpoint_dir(run_dir))
    assert 4 <= latest < failed and latest in complete and failed not in complete

    resumed = start_train(run_dir, env=env)
    out = finish(resumed)
    assert resumed.returncode == 0, out[-3000:]
    assert f"resumed from checkpoint step {complete[-1]} in {run_dir}" in out
    step, state = final_state(run_dir, CONFIG)
    assert step == local_run[0] == 24
    assert_same_state(local_run[1], state)


@pytest.mark.slow
def test_503s_and_delays_are_retried_and_every_step_restores_right(
        gcs_server, bucket, saved_run):
    """Six steps, saved every two: through a proxy failing a tenth of the requests with 503
    up to step 4, then resumed through one delaying each by 50 ms."""
    run_dir = f"{bucket}/run"
    with FaultyProxy(gcs_server.url, fail_fraction=0.1, seed=19) as proxy:
        first = start_train(run_dir, *SAVED_RUN, "train.stop_after=4",
                            env=emulator_env(proxy.url))
        out = finish(first)
    assert first.returncode == 0, out[-3000:]
    assert proxy.failed >= 3, (proxy.requests, proxy.failed)  # each retried
    assert complete_steps(checkpoint_dir(run_dir)) == [2, 4]
    with FaultyProxy(gcs_server.url, delay_s=0.05) as proxy:
        resumed = start_train(run_dir, *SAVED_RUN, env=emulator_env(proxy.url))
        out = finish(resumed)
    assert resumed.returncode == 0, out[-3000:]
    assert f"resumed from checkpoint step 4 in {run_dir}" in out
    config = tiny_config(*SAVED_RUN)
    run(tiny_config(*SAVED_RUN, f"run_dir={saved_run}"))  # the same run, on local disk
    for step in (2, 4, 6):  # every step in the bucket restores the local run's values
        assert_same_state(final_state(saved_run, config, step)[1],
                          final_state(run_dir, config, step)[1])
