"""A host with libtpu installed but no TPU chips trains on its CPU as if libtpu were absent:
no libtpu error lines, the CPU's host-memory settings, no slower start; a TPU host is left
to JAX's own choice."""

import importlib.util
import pathlib
import re
import resource
import subprocess
import sys

import pytest

from conftest import TINY_OVERRIDES, without_shared_compile_cache
from train.process import platforms

REPO = pathlib.Path(__file__).resolve().parent.parent
LIBTPU = importlib.util.find_spec("libtpu") is not None


def _host(tmp_path, pci=(), dev=()) -> str:
    """A fake root: PCI devices as (vendor, class) and device nodes under dev/."""
    for i, (vendor, pci_class) in enumerate(pci):
        device = tmp_path / "sys/bus/pci/devices" / f"0000:00:{i:02x}.0"
        device.mkdir(parents=True)
        (device / "vendor").write_text(vendor + "\n")
        (device / "class").write_text(pci_class + "\n")
    for node in dev:
        (tmp_path / "dev" / node).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "dev" / node).write_text("")
    return str(tmp_path)


GVNIC, PERSISTENT_DISK = ("0x1ae0", "0x020000"), ("0x1ae0", "0x010802")
VIRTIO_NET, TPU_CHIP = ("0x1af4", "0x020000"), ("0x1ae0", "0x120000")


@pytest.mark.parametrize("pci, dev, present", [
    ((), (), False),
    ((GVNIC, PERSISTENT_DISK, VIRTIO_NET), ("vfio/vfio",), False),  # a Google CPU VM
    ((GVNIC, TPU_CHIP, TPU_CHIP), (), True),
    ((), ("accel0",), True),         # v2-v4 TPU VMs
    ((), ("vfio/0", "vfio/vfio"), True),  # v5e, v5p, v6e
])
def test_tpu_chips_are_found_where_the_driver_puts_them(tmp_path, pci, dev, present):
    assert platforms.tpu_chips_present(_host(tmp_path, pci, dev)) is present


@pytest.mark.skipif(not LIBTPU, reason="libtpu is not installed")
def test_jax_is_kept_off_the_tpu_only_when_there_is_none_and_nobody_chose(tmp_path):
    cpu_vm = _host(tmp_path / "cpu", [GVNIC])
    env = {}
    assert platforms.skip_absent_tpu(env, cpu_vm) and env == {"JAX_PLATFORMS": "cpu"}
    env = {"JAX_PLATFORMS": "tpu"}  # the user's choice stands
    assert not platforms.skip_absent_tpu(env, cpu_vm) and env == {"JAX_PLATFORMS": "tpu"}
    env = {}  # a TPU VM: JAX starts its TPU backend, and `auto` resolves for the TPU mesh
    assert not platforms.skip_absent_tpu(env, _host(tmp_path / "tpu", dev=["vfio/0"]))
    assert env == {}


def _train(tmp_path, name: str, jax_platforms: str | None) -> tuple[str, float]:
    """Output and CPU seconds of a few tiny steps of `python -m train` on two CPU "slices"."""
    env = without_shared_compile_cache()
    env.pop("JAX_PLATFORMS", None)
    if jax_platforms:
        env["JAX_PLATFORMS"] = jax_platforms
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    done = subprocess.run(
        [sys.executable, "-m", "train", *TINY_OVERRIDES, "train.steps=2", "train.log_every=1",
         "checkpoint.every=0", "train.eval_batches=0", "train.compile_cache=false",
         "mesh.dcn_data=2", f"run_dir={tmp_path / name}"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    assert done.returncode == 0, done.stderr
    seconds = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return done.stdout + done.stderr, seconds


@pytest.mark.skipif(not LIBTPU, reason="libtpu is not installed")
@pytest.mark.skipif(platforms.tpu_chips_present(), reason="this host has TPU chips")
@pytest.mark.slow
def test_a_cpu_host_with_libtpu_trains_on_its_cpu_as_without_it(tmp_path):
    output, seconds = _train(tmp_path, "unset", None)
    libtpu_lines = [line for line in output.splitlines()
                    if re.search(r"TPU_ACCELERATOR_TYPE|TPU_WORKER_HOSTNAMES|^E0000|"
                                 r"InitGoogle|backend 'tpu'", line)]
    assert libtpu_lines == []
    assert ("platform: JAX_PLATFORMS=cpu (libtpu is installed, but this host has no TPU "
            "chips); host memory: freed memory kept in the process") in output
    assert "mesh {'data': 8, 'fsdp': 1, 'tensor': 1} on 8 cpu device(s)" in output
    assert re.search(r"step +2 \| loss", output)
    cpu_output, cpu_seconds = _train(tmp_path, "cpu", "cpu")
    assert "host memory: freed memory kept in the process" in cpu_output
    print(f"CPU seconds: JAX_PLATFORMS unset {seconds:.2f}, cpu {cpu_seconds:.2f}")
    assert seconds < 1.5 * cpu_seconds
