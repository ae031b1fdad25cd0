"""TPU chips as an ahead-of-time compile sees them: the devices of a slice to compile for
(no TPU needed: libtpu's compiler runs on any host), and what each chip offers.

Bandwidths are Google's published per-chip figures, one direction ("Interchip
Interconnect BW"); DCN is the pod's data-centre network bandwidth shared by its chips
where Google gives no per-chip figure. HBM usable is what the TPU compiler lets a
program take (it says so when a program does not fit), a little under the chip's HBM.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Iterator

import jax
from jax.experimental import topologies

from sharding.topology import Slice

GIB = 2 ** 30


@dataclasses.dataclass(frozen=True)
class Chip:
    hbm_bytes: int
    """HBM on the spec sheet."""
    usable_bytes: int
    """HBM the compiler lets one program use."""
    ici_bytes_per_s: float
    dcn_bytes_per_s: float
    peak_flops: float
    """Dense bf16 FLOP/s."""


CHIPS = {
    "v4": Chip(32 * GIB, int(30.75 * GIB), 2400e9 / 8, 25e9 / 8, 275e12),  # DCN: taken as v5e's
    "v5e": Chip(16 * GIB, int(15.75 * GIB), 1600e9 / 8, 6.4e12 / 256 / 8, 197e12),
    "v5p": Chip(95 * GIB, int(95.74 * GIB), 4800e9 / 8, 50e9 / 8, 459e12),
    "v6e": Chip(32 * GIB, int(31.25 * GIB), 3584e9 / 8, 25.6e12 / 256 / 8, 918e12),
}


# Device kinds as TPU devices name themselves.
_KINDS = {"TPU v4": "v4", "TPU v5 lite": "v5e", "TPU v5e": "v5e", "TPU v5p": "v5p",
          "TPU v5": "v5p", "TPU v6 lite": "v6e", "TPU v6e": "v6e"}


def chip(tpu_slice: Slice) -> Chip:
    return CHIPS[tpu_slice.generation.name]


def generation_of(device: jax.Device) -> str | None:
    """"v5e" for a device of kind "TPU v5 lite", ...; None for other devices."""
    return _KINDS.get(device.device_kind)


def devices(tpu_slice: Slice, num_slices: int = 1) -> list[jax.Device]:
    """The devices of `num_slices` such slices, to lay a mesh over and compile for."""
    with _libtpu_told_the_target(tpu_slice):
        return list(topologies.get_topology_desc(
            platform="tpu", topology_name=tpu_slice.topology_name,
            chip_config_name=tpu_slice.generation.chip_config,
            chips_per_host_bounds=tpu_slice.chips_per_host_bounds,
            num_slices=num_slices).devices)


# What libtpu otherwise reads from a TPU VM's metadata server when it starts, and prints
# errors without: the slice's type and its workers. Compiling needs neither, nor a query.
_TARGET_ENVIRONMENT = ("TPU_ACCELERATOR_TYPE", "TPU_WORKER_HOSTNAMES", "TPU_SKIP_MDS_QUERY")


@contextlib.contextmanager
def _libtpu_told_the_target(tpu_slice: Slice) -> Iterator[None]:
    before = {name: os.environ.get(name) for name in _TARGET_ENVIRONMENT}
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", tpu_slice.accelerator_type)
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
    # libtpu locks a file for its process; compiling beside another process (a second
    # compile, a test) is safe, as no TPU is touched.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    try:
        yield
    finally:
        for name, value in before.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def slice_of_device(devices_in_order: list[jax.Device]) -> list[int]:
    """Each device's slice (0 where devices do not say), in the order given."""
    return [getattr(d, "slice_index", 0) for d in devices_in_order]
