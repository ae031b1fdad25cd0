"""Eight fake CPU devices for every test, set before JAX is first imported."""

import dataclasses
import os
import re
import shutil
import sys
import tempfile
import uuid

# XLA:CPU compiles the tests' tiny programs without LLVM's costly optimisations: compiling,
# not running, is most of a test's time. Every process of the session (subprocesses
# inherit the flags) computes alike, so comparisons between runs stay exact.
FAST_COMPILE_FLAGS = " --xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_force_host_platform_device_count=8" + FAST_COMPILE_FLAGS)
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# The user's cache (~/.cache/io-first-lm: the measured matmul peak) is neither read nor
# written by tests; one cache serves the session, its subprocesses included.
_CACHE_HOME = tempfile.mkdtemp(prefix="io-first-lm-test-cache-")
os.environ["XDG_CACHE_HOME"] = _CACHE_HOME
# One XLA compilation cache for the session, its subprocesses included: a program that
# another test (or `python -m train` subprocess) compiled is read back instead. JAX takes
# the first directory a process names, so `train.run` keeps this one; a test of the cache
# itself runs its subprocesses without it (`without_shared_compile_cache`).
SHARED_COMPILE_CACHE = os.path.join(_CACHE_HOME, "xla")
os.environ["JAX_COMPILATION_CACHE_DIR"] = SHARED_COMPILE_CACHE
os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"

# The repository root, so tests import the packages whether or not they are installed.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from gcs_server import GCSServer, free_port  # noqa: E402

# Every gs:// URL of the session, its subprocesses' included, goes to a GCS-protocol server
# on 127.0.0.1 (the `gcs_server` fixture starts it): `storage` points each client at it and
# away from any cloud endpoint, so no request leaves the machine.
GCS_PORT = free_port()
os.environ["STORAGE_EMULATOR_HOST"] = f"http://127.0.0.1:{GCS_PORT}"

import jax  # noqa: E402
import pytest  # noqa: E402

import storage  # noqa: E402
from configs import Config, ModelConfig, load, resolve_auto  # noqa: E402

# Tiny shapes: every test compiles in a second or two on 2 cores.
TINY_OVERRIDES = [
    "model.vocab_size=264", "model.embed_dim=32", "model.num_layers=2", "model.num_heads=4",
    "model.num_kv_heads=2", "model.head_dim=8", "model.mlp_dim=64", "data.seq_len=32",
    "train.batch_size=8", "train.steps=6", "train.log_every=2", "train.eval_batches=2",
    "optim.warmup_steps=2", "checkpoint.every=3",
]


# The run `saved_run` holds: 6 steps, checkpoints every 2, stopped after step 4.
SAVED_RUN = ("train.steps=6", "checkpoint.every=2", "train.eval_batches=0")


def tiny_config(*overrides: str) -> Config:
    """The tiny preset shrunk for tests, with extra `key=value` overrides. Llama blocks use
    grouped-query attention (2 kv heads); GPT-2 has none, its kv heads follow its heads."""
    ungrouped = ["model.num_kv_heads=none"] if "model.family=gpt2" in overrides else []
    return load("tiny", TINY_OVERRIDES + ungrouped + list(overrides))


def tiny_model_config(*overrides: str) -> ModelConfig:
    """The tiny model config with `auto` settings resolved for the CPU the tests run on, as
    `train.run` resolves them for its mesh (a model is built only from a resolved config)."""
    return resolve_auto(tiny_config(*overrides).model, "cpu")


def resolved(config: Config) -> Config:
    """`config` with its model's `auto` settings resolved for the CPU."""
    return dataclasses.replace(config, model=resolve_auto(config.model, "cpu"))


def without_shared_compile_cache() -> dict[str, str]:
    """The environment for a subprocess whose run keeps its own compilation cache."""
    return {k: v for k, v in os.environ.items()
            if k not in ("JAX_COMPILATION_CACHE_DIR", "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS")}


# Per-compile options that undo FAST_COMPILE_FLAGS, for a test that runs real shapes:
# `jax.jit(f).lower(...).compile(compiler_options=OPTIMISED)`.
OPTIMISED = {"xla_backend_optimization_level": 3, "xla_llvm_disable_expensive_passes": False}


def one_device_optimised_xla_flags() -> str:
    """XLA_FLAGS for a subprocess that runs more than it compiles (XLA's usual optimisation),
    on one CPU device as a user's machine has."""
    return re.sub(r"--xla_force_host_platform_device_count=\d+", "",
                  os.environ["XLA_FLAGS"].replace(FAST_COMPILE_FLAGS, "")).strip()


def wait_for_line(process, pattern) -> list[str]:
    """Read the process's output up to the first line matching `pattern` (a regex)."""
    lines = []
    for line in process.stdout:
        lines.append(line)
        if re.match(pattern, line):
            return lines
    raise AssertionError(f"process ended before printing {pattern!r}:\n" + "".join(lines))


def corrupt_largest_state_file(step_dir):
    """Flip a byte in the middle of a checkpoint step's largest array file (on disk or in a
    bucket); that file."""
    state = storage.path(step_dir) / "state"
    sizes = storage.files_under(state)
    largest = state / max(sizes, key=sizes.get)
    data = bytearray(largest.read_bytes())
    data[len(data) // 2] ^= 0xFF
    largest.write_bytes(bytes(data))
    return largest


@pytest.fixture(scope="session", autouse=True)
def _eight_devices():
    assert jax.device_count() == 8, "tests expect 8 fake CPU devices (XLA_FLAGS)"


@pytest.fixture(scope="session", autouse=True)
def _private_cache():
    yield
    shutil.rmtree(_CACHE_HOME, ignore_errors=True)


@pytest.fixture(scope="session")
def _saved_run(tmp_path_factory):
    """A tiny run of 6 steps stopped after step 4, with checkpoints at steps 2 and 4: trained
    once for the session."""
    from train import run

    run_dir = tmp_path_factory.mktemp("saved_run")
    run(tiny_config(*SAVED_RUN, f"run_dir={run_dir}", "train.stop_after=4"))
    return run_dir


@pytest.fixture
def saved_run(_saved_run, tmp_path):
    """A copy of the session's saved run in this test's tmp_path, for the test to change."""
    shutil.copytree(_saved_run, tmp_path, dirs_exist_ok=True)
    return tmp_path


@pytest.fixture(scope="session")
def gcs_server(tmp_path_factory):
    """The session's GCS-protocol server (see tests/gcs_server.py)."""
    server = GCSServer(tmp_path_factory.mktemp("gcs"), GCS_PORT).start()
    yield server
    server.stop()


@pytest.fixture
def bucket(gcs_server, request) -> str:
    """A new bucket of the test's own on the session's server, as `gs://<name>`."""
    stem = re.sub(r"[^a-z0-9]+", "-", request.node.name.lower()).strip("-")[:48]
    return gcs_server.create_bucket(f"{stem}-{uuid.uuid4().hex[:8]}")
