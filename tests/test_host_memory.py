"""train.host_memory: freed step-sized blocks stay in the process on CPU hosts."""

import subprocess
import sys
import textwrap

import pytest

from train.process import host_memory

# Allocates and frees a 300 MB block from a worker thread (as XLA:CPU does), then
# prints how much of it the process still holds.
_PROBE = textwrap.dedent("""
    import sys, threading
    sys.path.insert(0, {repo!r})
    from train.process import host_memory
    applied = host_memory.keep_freed_memory() if sys.argv[1] == "keep" else False

    def rss_mb():
        for line in open("/proc/self/status"):
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024

    def touch_and_free():
        block = bytearray(300 * 2**20)
        block[::4096] = b"x" * len(block[::4096])
        del block

    before = rss_mb()
    worker = threading.Thread(target=touch_and_free)
    worker.start()
    worker.join()
    print(applied, round(rss_mb() - before))
""")


def _held_after_free(mode: str) -> tuple[bool, int]:
    import pathlib
    repo = str(pathlib.Path(__file__).resolve().parent.parent)
    out = subprocess.run([sys.executable, "-c", _PROBE.format(repo=repo), mode],
                         capture_output=True, text=True, check=True,
                         env={"JAX_PLATFORMS": "cpu", "PATH": ""}).stdout.split()
    return out[0] == "True", int(out[1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc settings")
def test_a_freed_step_sized_block_stays_in_the_process():
    applied, held_mb = _held_after_free("keep")
    assert applied
    assert held_mb > 250  # kept for the next step, not unmapped
    applied, held_mb = _held_after_free("default")
    assert not applied
    assert held_mb < 50  # glibc's default: the block went back to the kernel


def test_only_a_cpu_backend_gets_the_settings(monkeypatch):
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    assert host_memory.cpu_backend_expected()
    monkeypatch.setenv("JAX_PLATFORMS", "cuda,cpu")
    assert not host_memory.cpu_backend_expected()
    assert not host_memory.keep_freed_memory()
