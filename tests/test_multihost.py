"""Multi-process runs: two `python -m train` processes on localhost (4 fake CPU devices each)
train what one process with 8 devices trains; and when a process joins a job."""

import os
import re
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

import configs
import input as data_input
from checkpoint import checkpoint_dir
from conftest import TINY_OVERRIDES, tiny_config
from observe import metrics_log
from train import run
from train.process import distributed

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# fsdp=2: parameters and optimizer state are split, so each process saves only its shards.
MULTIHOST = ("mesh.fsdp=2", "train.steps=4", "train.log_every=1", "checkpoint.every=0",
             "train.eval_batches=1")
TIMEOUT_S = 150


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _child_env() -> dict[str, str]:
    """The test's environment with 4 fake devices per process instead of conftest's 8."""
    env = dict(os.environ)
    flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", env.get("XLA_FLAGS", ""))
    env["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count=4".strip()
    env["JAX_PLATFORMS"] = "cpu"
    return env


def _train_two_processes(run_dir, tmp_path) -> None:
    port = _free_port()
    logs, children = [], []
    for process_id in range(2):
        log = open(tmp_path / f"process_{process_id}.log", "w+")
        logs.append(log)
        children.append(subprocess.Popen(
            [sys.executable, "-m", "train", *TINY_OVERRIDES, *MULTIHOST, f"run_dir={run_dir}",
             f"distributed.coordinator_address=localhost:{port}",
             "distributed.num_processes=2", f"distributed.process_id={process_id}"],
            cwd=REPO, env=_child_env(), stdout=log, stderr=subprocess.STDOUT, text=True))
    deadline = time.monotonic() + TIMEOUT_S
    try:
        while time.monotonic() < deadline:
            codes = [child.poll() for child in children]
            if None not in codes or any(codes):  # all done, or one failed
                break
            time.sleep(0.2)
    finally:
        for child in children:  # a process whose peer failed would wait for it a long time
            if child.poll() is None:
                child.kill()
                child.wait()
    outputs = []
    for log in logs:
        log.seek(0)
        outputs.append("".join(line for line in log if not line.startswith("[Gloo]")))
        log.close()
    codes = [child.returncode for child in children]
    assert codes == [0, 0], "\n".join(
        f"--- process {i} (exit {code}):\n{out[-3000:]}"
        for i, (code, out) in enumerate(zip(codes, outputs, strict=True)))


@pytest.mark.slow
def test_two_processes_train_and_checkpoint_what_one_process_does(tmp_path):
    multi_dir = tmp_path / "two_processes"
    _train_two_processes(multi_dir, tmp_path)
    records = metrics_log.read(multi_dir)
    multi_losses = {r["step"]: r["loss"] for r in records if "loss" in r}
    multi_eval = [r for r in records if "eval_loss" in r]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4]  # by process 0 only
    assert (multi_dir / "goodput.json").is_file()

    single = run(tiny_config(*MULTIHOST, f"run_dir={tmp_path / 'one_process'}"))
    np.testing.assert_allclose([multi_losses[s] for s in sorted(multi_losses)],
                               [single.losses[s] for s in sorted(single.losses)], rtol=1e-5)
    # The held-out batch is split over both processes, not evaluated once by each.
    single_eval = [r for r in metrics_log.read(tmp_path / "one_process") if "eval_loss" in r]
    assert multi_eval[0]["eval_tokens"] == single_eval[0]["eval_tokens"]
    np.testing.assert_allclose(multi_eval[0]["eval_loss"], single_eval[0]["eval_loss"],
                               rtol=1e-5)

    # One process resumes the two processes' checkpoint: checksums cover both processes'
    # files, and every shard comes back.
    assert (checkpoint_dir(multi_dir) / "4" / "checksums.json").is_file()
    resumed = run(tiny_config(*MULTIHOST, f"run_dir={multi_dir}"))
    assert resumed.start_step == 4 and resumed.losses == {}
    # Equal up to rounding: cross-process all-reduces add in another order than in-process ones.
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b),
                                                         rtol=1e-5, atol=1e-7),
                 resumed.state, single.state)


def test_each_process_reads_only_its_share_of_the_global_batch():
    config = tiny_config()
    rows = data_input.make_splits(config.data, data_input.get_tokenizer("bytes")).train
    whole = data_input.train_dataset(rows, seed=0, global_batch=8)
    shares = [data_input.train_dataset(rows, seed=0, global_batch=8, process_index=p,
                                       process_count=2) for p in range(2)]
    for step in range(3):
        assert all(len(share[step]["inputs"]) == 4 for share in shares)
        np.testing.assert_array_equal(
            np.concatenate([share[step]["inputs"] for share in shares]), whole[step]["inputs"])


# --- when `initialize` joins a job ------------------------------------------------------------

LAUNCHER_PREFIXES = ("TPU_", "MEGASCALE_", "SLURM_", "OMPI_")
SLURM_TWO_TASKS = {"SLURM_JOB_ID": "7", "SLURM_STEP_NODELIST": "node[1-2]", "SLURM_NTASKS": "2",
                   "SLURM_PROCID": "1", "SLURM_LOCALID": "0"}


@pytest.mark.parametrize(("env", "launcher"), [
    ({}, None),
    ({"TPU_WORKER_HOSTNAMES": "t1k-0,t1k-1,t1k-2,t1k-3", "TPU_WORKER_ID": "2"}, "tpu"),
    ({"TPU_PROCESS_ADDRESSES": "10.0.0.1:8476,10.0.0.2:8476"}, "tpu"),
    ({"TPU_WORKER_HOSTNAMES": "localhost", "TPU_WORKER_ID": "0"}, None),  # single-host slice
    ({"MEGASCALE_NUM_SLICES": "2"}, "tpu"),
    (SLURM_TWO_TASKS, "slurm"),
    ({**SLURM_TWO_TASKS, "SLURM_NTASKS": "1"}, None),
    ({k: v for k, v in SLURM_TWO_TASKS.items() if k != "SLURM_STEP_NODELIST"}, None),  # no srun
    ({"OMPI_MCA_orte_hnp_uri": "1234.0;tcp://10.0.0.1:5000", "OMPI_COMM_WORLD_SIZE": "4",
      "OMPI_COMM_WORLD_RANK": "3", "OMPI_COMM_WORLD_LOCAL_RANK": "1"}, "ompi"),
    ({"OMPI_MCA_orte_hnp_uri": "1234.0;tcp://10.0.0.1:5000", "OMPI_COMM_WORLD_SIZE": "1"}, None),
])
def test_detect_launcher_names_multi_process_jobs_only(env, launcher):
    assert distributed.detect_launcher(env) == launcher


@pytest.fixture
def fake_jax_distributed(monkeypatch):
    """Record what `initialize` asks of JAX; no coordinator is started, no setting changed."""
    calls = {"initialize": [], "config": []}
    state = {"initialized": False}

    def initialize(**kwargs):
        calls["initialize"].append(kwargs)
        state["initialized"] = True

    monkeypatch.setattr(jax.distributed, "initialize", initialize)
    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: state["initialized"])
    monkeypatch.setattr(jax.config, "update", lambda *a: calls["config"].append(a))
    for name in list(os.environ):
        if name.startswith(LAUNCHER_PREFIXES):
            monkeypatch.delenv(name)
    return calls


def test_initialize_without_a_launcher_stays_single_process(fake_jax_distributed):
    distributed.initialize(configs.DistributedConfig())
    assert fake_jax_distributed == {"initialize": [], "config": []}


def test_initialize_with_a_coordinator_passes_the_config_once(fake_jax_distributed):
    cfg = configs.DistributedConfig("10.0.0.1:1234", num_processes=4, process_id=3)
    distributed.initialize(cfg)
    distributed.initialize(cfg)  # a second call is harmless
    assert fake_jax_distributed["initialize"] == [
        {"coordinator_address": "10.0.0.1:1234", "num_processes": 4, "process_id": 3}]
    assert fake_jax_distributed["config"] == [("jax_cpu_collectives_implementation", "gloo")]


def test_initialize_in_a_slurm_job_lets_jax_read_the_job(fake_jax_distributed, monkeypatch):
    for name, value in SLURM_TWO_TASKS.items():
        monkeypatch.setenv(name, value)
    distributed.initialize(configs.DistributedConfig())
    assert fake_jax_distributed["initialize"] == [{}]
