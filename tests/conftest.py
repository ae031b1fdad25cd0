"""Eight fake CPU devices for every test, set before JAX is first imported."""

import os
import shutil
import sys
import tempfile

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# The user's cache (~/.cache/io-first-lm: the measured matmul peak) is neither read nor
# written by tests; one cache serves the session, its subprocesses included.
_CACHE_HOME = tempfile.mkdtemp(prefix="io-first-lm-test-cache-")
os.environ["XDG_CACHE_HOME"] = _CACHE_HOME

# The repository root, so tests import the packages whether or not they are installed.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import pytest  # noqa: E402

from configs import Config, load  # noqa: E402

# Tiny shapes: every test compiles in a second or two on 2 cores.
TINY_OVERRIDES = [
    "model.vocab_size=264", "model.embed_dim=32", "model.num_layers=2", "model.num_heads=4",
    "model.num_kv_heads=2", "model.head_dim=8", "model.mlp_dim=64", "data.seq_len=32",
    "train.batch_size=8", "train.steps=6", "train.log_every=2", "train.eval_batches=2",
    "optim.warmup_steps=2", "checkpoint.every=3",
]


def tiny_config(*overrides: str) -> Config:
    """The tiny preset shrunk for tests, with extra `key=value` overrides. Llama blocks use
    grouped-query attention (2 kv heads); GPT-2 has none, its kv heads follow its heads."""
    ungrouped = ["model.num_kv_heads=none"] if "model.family=gpt2" in overrides else []
    return load("tiny", TINY_OVERRIDES + ungrouped + list(overrides))


def corrupt_largest_state_file(step_dir):
    """Flip a byte in the middle of a checkpoint step's largest array file; that file."""
    files = sorted((p for p in (step_dir / "state").rglob("*") if p.is_file()),
                   key=lambda p: p.stat().st_size)
    data = bytearray(files[-1].read_bytes())
    data[len(data) // 2] ^= 0xFF
    files[-1].write_bytes(bytes(data))
    return files[-1]


@pytest.fixture(scope="session", autouse=True)
def _eight_devices():
    assert jax.device_count() == 8, "tests expect 8 fake CPU devices (XLA_FLAGS)"


@pytest.fixture(scope="session", autouse=True)
def _private_cache():
    yield
    shutil.rmtree(_CACHE_HOME, ignore_errors=True)
