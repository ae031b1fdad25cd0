"""Keep JAX off the TPU backend on a host that has libtpu installed but no TPU chips.

`pip install "jax[tpu]"` brings libtpu, whose compiler compiles for TPU slices from any
host (`python -m train.aot`). With JAX_PLATFORMS unset, JAX then starts its TPU backend
first on every host; without chips, libtpu prints errors about the TPU environment
before JAX falls back to the CPU, and a CPU host looks like an accelerator host to the
set-up that follows (`host_memory`). Chips are looked for where the TPU driver puts them;
on a doubt (a Google PCI device that is neither a network nor a storage device) the
host is taken to have them and JAX is left to choose.
"""

from __future__ import annotations

import glob
import importlib.util
import os
import pathlib
from collections.abc import MutableMapping

_GOOGLE_PCI_VENDOR = "0x1ae0"
# PCI base classes of the Google devices a CPU VM has: gVNIC (network), persistent disk
# (storage). A TPU chip is a processing accelerator.
_NOT_TPU_CLASSES = ("0x01", "0x02")
_GPU_PLUGINS = ("jax_cuda12_plugin", "jax_cuda13_plugin", "jax_rocm7_plugin")


def tpu_chips_present(root: str = "/") -> bool:
    """Whether this host has TPU chips: a TPU device node (`/dev/accel*` on v2-v4,
    `/dev/vfio/<n>` on later generations) or a Google PCI device that may be one."""
    dev = pathlib.Path(root, "dev")
    if glob.glob(str(dev / "accel*")) or glob.glob(str(dev / "vfio" / "[0-9]*")):
        return True
    for device in pathlib.Path(root, "sys/bus/pci/devices").glob("*"):
        vendor, pci_class = _read(device / "vendor"), _read(device / "class")
        if vendor == _GOOGLE_PCI_VENDOR and not pci_class.startswith(_NOT_TPU_CLASSES):
            return True
    return False


def _read(path: pathlib.Path) -> str:
    try:
        return path.read_text().strip().lower()
    except OSError:
        return ""


def libtpu_without_chips(root: str = "/") -> bool:
    """libtpu is installed but the host has no TPU chips."""
    return importlib.util.find_spec("libtpu") is not None and not tpu_chips_present(root)


def describe() -> str:
    """The platforms JAX is asked for, and why when it was kept off an absent TPU."""
    asked = os.environ.get("JAX_PLATFORMS") or "unset (JAX chooses)"
    if asked == "cpu" and libtpu_without_chips():
        return "JAX_PLATFORMS=cpu (libtpu is installed, but this host has no TPU chips)"
    return f"JAX_PLATFORMS={asked}"


def skip_absent_tpu(env: MutableMapping[str, str] = os.environ, root: str = "/") -> bool:
    """Set JAX_PLATFORMS=cpu when JAX would otherwise try libtpu on a host with no TPU.

    Call it before JAX reads its configuration. Nothing changes when JAX_PLATFORMS is set,
    libtpu is absent, chips are present, or a GPU plugin is installed (JAX starts a GPU
    backend only where it finds a GPU, which `cpu` would rule out). Returns whether it
    set JAX_PLATFORMS.
    """
    if env.get("JAX_PLATFORMS") or any(importlib.util.find_spec(name) for name in _GPU_PLUGINS):
        return False
    if not libtpu_without_chips(root):
        return False
    env["JAX_PLATFORMS"] = "cpu"
    return True
