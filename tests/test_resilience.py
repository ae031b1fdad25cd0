"""Checkpoints under stress: preemption, kill -9, damaged files, cache restarts."""

import contextlib
import gc
import os
import random
import resource
import signal
import subprocess
import sys
import time
import warnings

import jax
import numpy as np
import pytest

import configs
from checkpoint import Checkpointer, CheckpointError, aftermath, restore_params
from checkpoint.inspect import main as inspect_main
from conftest import (
    SAVED_RUN,
    TINY_OVERRIDES,
    corrupt_largest_state_file,
    tiny_config,
    wait_for_line,
    without_shared_compile_cache,
)
from sharding import make_mesh, with_shardings
from train import run
from train.optimizer import make_optimizer
from train.state import abstract_state, init_state, state_shardings

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LONG = ("train.steps=40", "checkpoint.every=2", "train.log_every=1", "train.eval_batches=1")


def _start(run_dir, *overrides, env=None):
    return subprocess.Popen(
        [sys.executable, "-m", "train", *TINY_OVERRIDES, *LONG, f"run_dir={run_dir}",
         *overrides], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env=env)


def _final_params(run_dir, config):
    ckpt = Checkpointer(run_dir / "checkpoints", config.checkpoint)
    step = ckpt.latest_step()
    ckpt.close()
    mesh = make_mesh(config.mesh)
    tx = make_optimizer(config.optim, config.train.steps)
    shardings = state_shardings(config, mesh, tx)
    target = with_shardings(abstract_state(config, tx), shardings).params
    return step, restore_params(run_dir / "checkpoints", step, target)


@pytest.mark.slow
def test_sigusr1_saves_at_the_next_step_and_sigterm_finishes_the_step_saves_and_exits_0(
        tmp_path):
    process = _start(tmp_path, "checkpoint.every=1000")  # no scheduled save in 40 steps
    wait_for_line(process, r"step +\d")
    process.send_signal(signal.SIGUSR1)
    lines = wait_for_line(process, r"checkpoint step \d+: loop blocked")
    requested = int(lines[-1].split()[2].rstrip(":"))
    process.send_signal(signal.SIGTERM)
    out, _ = process.communicate(timeout=120)
    assert process.returncode == 0, out[-2000:]
    assert 0 < requested < 40 and (tmp_path / "checkpoints" / str(requested)).is_dir()
    assert "stopped by signal 15 after step" in out
    assert "goodput:" in out and (tmp_path / "goodput.json").is_file()
    stopped = int(out.split("stopped by signal 15 after step ")[1].split(";")[0])
    assert requested <= stopped < 40
    ckpt = Checkpointer(tmp_path / "checkpoints", tiny_config().checkpoint)
    assert ckpt.latest_step() == stopped
    ckpt.close()
    resumed = run(tiny_config(*LONG, "train.stop_after=2", f"run_dir={tmp_path}"))
    assert resumed.start_step == stopped and resumed.final_step == stopped + 2


@pytest.mark.slow
def test_second_signal_exits_at_once_and_keeps_saved_checkpoints(tmp_path):
    process = _start(tmp_path)
    wait_for_line(process, "checkpoint step 4: committed")
    process.send_signal(signal.SIGTERM)
    wait_for_line(process, "received SIGTERM")
    process.send_signal(signal.SIGTERM)
    out, _ = process.communicate(timeout=120)
    assert process.returncode == 128 + signal.SIGTERM, out[-2000:]
    resumed = run(tiny_config(*LONG, "train.stop_after=1", f"run_dir={tmp_path}"))
    assert resumed.start_step >= 4


@pytest.mark.slow
def test_kill9_at_random_moments_resumes_bit_identical(tmp_path):
    config = tiny_config(*LONG, f"run_dir={tmp_path / 'whole'}")
    run(config)
    rng = random.Random(0)
    # Each run is killed a random moment after its checkpoint of a random later step has
    # been committed (steps take ~10 ms here, so a fixed wait could outlast the run).
    for target in sorted(rng.sample(range(4, 34, 2), 2)):
        process = _start(tmp_path / "killed")
        wait_for_line(process, rf"checkpoint step ({'|'.join(map(str, range(target, 40, 2)))})"
                                r": committed")
        time.sleep(rng.uniform(0.0, 0.15))
        process.kill()
        process.communicate(timeout=60)
        assert process.returncode == -signal.SIGKILL, "the run ended before it was killed"
    finished = run(tiny_config(*LONG, f"run_dir={tmp_path / 'killed'}"))
    assert finished.final_step == 40 and finished.start_step > 0
    step_a, whole = _final_params(tmp_path / "whole", config)
    step_b, killed = _final_params(tmp_path / "killed", config)
    assert step_a == step_b == 40
    for a, b in zip(jax.tree.leaves(whole), jax.tree.leaves(killed), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_damaged_file_names_step_and_file_and_can_fall_back(saved_run):
    tmp_path, common = saved_run, (*SAVED_RUN, f"run_dir={saved_run}")
    damaged = corrupt_largest_state_file(tmp_path / "checkpoints" / "4")
    with pytest.raises(CheckpointError, match=rf"(?s)step 4: file {damaged}.*CRC32.*"
                                              r"checkpoint\.fallback=true"):
        run(tiny_config(*common))
    resumed = run(tiny_config(*common, "checkpoint.fallback=true"))
    assert resumed.start_step == 2 and resumed.final_step == 6


@pytest.mark.parametrize("manifest", ['{"broken', '["a list"]', '{"state/x": {"size": "1"}}'])
def test_a_damaged_checksum_file_is_named_and_can_fall_back(saved_run, manifest):
    tmp_path, common = saved_run, (*SAVED_RUN, f"run_dir={saved_run}")
    damaged = tmp_path / "checkpoints" / "4" / "checksums.json"
    damaged.write_text(manifest)
    with pytest.raises(CheckpointError, match=rf"step 4: its checksum file {damaged} is unre"):
        run(tiny_config(*common))
    resumed = run(tiny_config(*common, "checkpoint.fallback=true"))
    assert resumed.start_step == 2 and resumed.final_step == 6


@pytest.mark.parametrize("checksummed", [True, False])
def test_a_damaged_saved_config_is_named_and_can_fall_back(saved_run, checksummed):
    tmp_path, common = saved_run, (*SAVED_RUN, f"run_dir={saved_run}")
    step_dir = tmp_path / "checkpoints" / "4"
    if not checksummed:  # as written before checksums existed
        (step_dir / "checksums.json").unlink()
    (step_dir / "config" / "metadata").write_text('{"model": ')
    expected = (rf"step 4: file {step_dir / 'config' / 'metadata'} has" if checksummed else
                rf"step 4 in {step_dir.parent}: its saved config could not be read")
    with pytest.raises(CheckpointError, match=rf"(?s){expected}.*checkpoint\.fallback=true"):
        run(tiny_config(*common))
    resumed = run(tiny_config(*common, "checkpoint.fallback=true"))
    assert resumed.start_step == 2 and resumed.final_step == 6


def test_truncated_file_is_named(saved_run):
    tmp_path = saved_run
    files = sorted((p for p in (tmp_path / "checkpoints" / "4").rglob("*") if p.is_file()),
                   key=lambda p: p.stat().st_size)
    with open(files[-1], "r+b") as f:
        f.truncate(10)
    # Orbax fails on the truncated file while the checksums are verified beside it: the
    # error names the file all the same.
    with pytest.raises(CheckpointError, match=rf"step 4: file {files[-1]} has 10 bytes"):
        run(tiny_config(*SAVED_RUN, f"run_dir={tmp_path}"))


def test_params_only_restore_onto_another_mesh(saved_run):
    written_step, written = _final_params(saved_run, tiny_config(*SAVED_RUN))  # its mesh
    step, params = _final_params(saved_run, tiny_config("mesh.data=4", "mesh.tensor=2"))
    assert step == written_step == 4
    for a, b in zip(jax.tree.leaves(written), jax.tree.leaves(params), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    embed = params["embed_VxD"].sharding
    assert tuple(embed.spec) == ("tensor", "fsdp") and dict(embed.mesh.shape)["data"] == 4


@pytest.mark.slow
def test_keep_last_n_plus_every_kth_permanently(tmp_path):
    run(tiny_config("train.steps=8", "checkpoint.every=1", "checkpoint.keep=2",
                    "checkpoint.keep_every=4", "train.eval_batches=0", f"run_dir={tmp_path}"))
    assert sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir()) == [4, 7, 8]


@pytest.mark.slow
def test_async_save_blocks_less_than_the_whole_write(tmp_path):
    config = tiny_config("model.embed_dim=256", "model.mlp_dim=1024")
    mesh = make_mesh(config.mesh)
    tx = make_optimizer(config.optim, 10)
    state = jax.jit(lambda: init_state(config, tx),
                    out_shardings=state_shardings(config, mesh, tx))()
    jax.block_until_ready(state)
    ckpt = Checkpointer(tmp_path, config.checkpoint, report=lambda _: None)
    started = time.perf_counter()
    blocked = ckpt.save(1, state, {"next_index": 1}, configs.to_dict(config))
    committed_on_return = (tmp_path / "1").exists()  # Orbax renames a step in when done
    ckpt.wait()
    total = time.perf_counter() - started
    ckpt.close()
    assert not committed_on_return  # the loop got control back before the write ended
    assert (tmp_path / "1" / "checksums.json").is_file()
    assert 0 < blocked < total


@pytest.mark.slow
def test_restart_reads_the_compiled_step_from_the_cache(tmp_path):
    outputs = []
    for _ in range(2):
        process = _start(tmp_path, "train.stop_after=3", env=without_shared_compile_cache())
        outputs.append(process.communicate(timeout=120)[0])
        assert process.returncode == 0, outputs[-1][-1000:]
        # XLA's cache is the run's too: without the saved executable a restart still skips
        # compiling (tests/test_restart.py reads a step back from it).
        assert list((tmp_path / "compile_cache").glob("jit_train_step-*-cache"))
    assert "train step compiled in" in outputs[0]
    assert "train step loaded as a saved executable (no tracing) in" in outputs[1]
    assert [int(line.split()[1]) for text in outputs for line in text.splitlines()
            if line.startswith("step ")] == [1, 2, 3, 4, 5, 6]


def test_inspect_lists_steps_completeness_and_config_diff(saved_run, capsys):
    tmp_path = saved_run
    (tmp_path / "checkpoints" / "6.orbax-checkpoint-tmp-1").mkdir()

    def inspect(*args):
        code = inspect_main([str(tmp_path), *TINY_OVERRIDES, *args])
        captured = capsys.readouterr()
        rows = [line.split() for line in captured.out.splitlines()
                if line.strip()[:1].isdigit()]
        return code, captured, [(r[0], r[3], r[4]) for r in rows]

    for verify, checksums in (((), "recorded"), (("--verify",), "ok")):
        code, captured, rows = inspect(*verify, "model.num_layers=3")
        assert code == 0
        assert rows == [("2", "complete", checksums), ("4", "complete", checksums),
                        ("6", "partial", "incomplete")]
        assert "model.num_layers: checkpoint 2, config 3" in captured.out
        assert "checkpoint.every: checkpoint 2, config 3" in captured.out

    step_dir = tmp_path / "checkpoints" / "4"
    (step_dir / "config" / "metadata").write_text('{"model": ')
    code, captured, _ = inspect()
    assert code == 1  # the config is checked against its checksum before it is read
    assert (f"config of step 4 could not be read: checkpoint step 4: file "
            f"{step_dir / 'config' / 'metadata'} has 10 bytes") in captured.err
    code, captured, _ = inspect("--verify")
    assert "DAMAGED: checkpoint step 4: file" in captured.out  # its checksum names the file
    (step_dir / "checksums.json").unlink()  # as written before checksums existed
    code, captured, _ = inspect()
    assert code == 1
    assert "config of step 4 could not be read: checkpoint step 4 in " in captured.err
    assert "its saved config could not be read (Expecting value" in captured.err


def test_half_written_later_step_is_ignored_on_resume(saved_run):
    tmp_path, common = saved_run, (*SAVED_RUN, f"run_dir={saved_run}")
    partial = tmp_path / "checkpoints" / "6.orbax-checkpoint-tmp-99"
    (partial / "state").mkdir(parents=True)
    (partial / "state" / "junk").write_bytes(b"half a write")
    resumed = run(tiny_config(*common))
    assert resumed.start_step == 4 and resumed.final_step == 6


def test_synchronous_saves_are_committed_checksummed_and_resumable(tmp_path):
    common = ("checkpoint.every=2", "checkpoint.async_save=false", "train.eval_batches=0",
              f"run_dir={tmp_path}")
    first = run(tiny_config(*common, "train.stop_after=2"))
    assert (tmp_path / "checkpoints" / "2" / "checksums.json").is_file()
    resumed = run(tiny_config(*common))
    assert first.final_step == 2 and resumed.start_step == 2 and resumed.final_step == 6


def test_damaged_final_step_falls_back_and_finishes_training(saved_run):
    corrupt_largest_state_file(saved_run / "checkpoints" / "4")
    resumed = run(tiny_config(*SAVED_RUN, f"run_dir={saved_run}", "checkpoint.fallback=true"))
    assert resumed.start_step == 2 and resumed.final_step == 6


@contextlib.contextmanager
def _files_limited_to(size):
    """Writes past `size` bytes of a file fail with EFBIG, as writes to a full disk fail
    (a process limit: no root or small filesystem needed)."""
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # else the signal kills us
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (size, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, handler)


@pytest.mark.slow
def test_a_failed_write_is_one_error_naming_step_directory_and_cause(tmp_path, monkeypatch):
    unraisable = []  # what Python would print as "Exception ignored in: ..."
    monkeypatch.setattr(sys, "unraisablehook", lambda u: unraisable.append(u.exc_value))
    aftermath.install()  # as the commands and `train.run` do
    config = tiny_config()
    mesh = make_mesh(config.mesh)
    tx = make_optimizer(config.optim, 10)
    shardings = state_shardings(config, mesh, tx)
    state = jax.jit(lambda: init_state(config, tx), out_shardings=shardings)()
    saved_config = configs.to_dict(config)
    ckpt = Checkpointer(tmp_path, config.checkpoint, report=lambda _: None)
    ckpt.save(1, state, {"next_index": 1}, saved_config)
    ckpt.wait()
    with _files_limited_to(64 * 1024):  # the state's data files are larger
        ckpt.save(2, state, {"next_index": 2}, saved_config)  # the write fails meanwhile
        with pytest.raises(CheckpointError) as failed:
            ckpt.wait()
    message = str(failed.value)
    assert f"checkpoint step 2 could not be written to {tmp_path}: File too large (" in message
    assert "the latest complete checkpoint is step 1" in message
    target = with_shardings(abstract_state(config, tx), shardings)
    assert ckpt.restore_latest(target, fallback=False).step == 1

    ckpt.save(3, state, {"next_index": 3}, saved_config)  # room again: saving goes on
    ckpt.close()  # the failure was raised once, not again
    del ckpt, failed  # what holds the failed write's coroutines and callbacks
    _collect_failed_writes()  # TensorStore's late callbacks into Orbax's closed loop report
    assert not unraisable  # (test_checkpoint.py checks the same for asyncio's log)
    assert (tmp_path / "3" / "checksums.json").is_file()  # its own, not step 2's
    assert not list(tmp_path.glob("2*/checksums.json"))
    reopened = Checkpointer(tmp_path, config.checkpoint, report=lambda _: None)
    restored = reopened.restore_latest(target, fallback=False)
    reopened.close()
    assert restored.step == 3 and restored.data_position == {"next_index": 3}
    for a, b in zip(jax.tree.leaves(restored.state), jax.tree.leaves(state), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.slow
def test_a_run_whose_save_fails_exits_2_with_one_error_and_no_tracebacks(tmp_path):
    # As _files_limited_to, for the whole run: its first save (step 2) cannot be written.
    limited = ("import resource, runpy, signal, sys; signal.signal(signal.SIGXFSZ, "
               "signal.SIG_IGN); resource.setrlimit(resource.RLIMIT_FSIZE, (65536, "
               "resource.getrlimit(resource.RLIMIT_FSIZE)[1])); sys.argv[0] = 'train'; "
               "runpy.run_module('train', run_name='__main__')")
    result = subprocess.run(
        [sys.executable, "-c", limited, *TINY_OVERRIDES, "train.steps=4", "checkpoint.every=2",
         "train.eval_batches=0", "train.compile_cache=false", f"run_dir={tmp_path}"],
        cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1
    assert errors[0].startswith(f"error: checkpoint step 2 could not be written to "
                                f"{tmp_path / 'checkpoints'}: File too large (")
    assert "no checkpoint of this run is complete" in result.stderr
    assert "Traceback" not in result.stderr and "never retrieved" not in result.stderr
    assert not [p.name for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()]


@pytest.mark.slow
def test_a_run_whose_restore_fails_exits_2_with_one_error_and_no_tracebacks(saved_run):
    damaged = corrupt_largest_state_file(saved_run / "checkpoints" / "4")
    result = subprocess.run(
        [sys.executable, "-m", "train", *TINY_OVERRIDES, *SAVED_RUN, f"run_dir={saved_run}"],
        cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and f"step 4: file {damaged}" in errors[0]
    for debris in ("Traceback", "never retrieved", "Exception ignored", "Event loop is closed"):
        assert debris not in result.stderr + result.stdout


def _collect_failed_writes():
    """Collect what a failed write left, here rather than at some later test's expense.

    Orbax never awaits the writes that a failed one cut short, and Python warns when it
    collects them; only here is that warning expected (after a save that succeeded it would
    mean data never written), so it stays visible everywhere else. Some of them TensorStore
    may still hold: those are collected, and warned about, when the process exits.
    """
    with warnings.catch_warnings(record=True) as warned:
        warnings.simplefilter("always")
        gc.collect()
    assert {str(w.message) for w in warned} <= {
        "coroutine 'async_serialize_from_host.<locals>.write_fragment' was never awaited"}
