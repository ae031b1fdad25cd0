"""Build the device mesh (data, fsdp, tensor) from the config."""

from __future__ import annotations

import math

import jax
from jax.sharding import AxisType, Mesh

from configs.schema import MESH_AXES, MeshConfig


class MeshError(ValueError):
    """The configured mesh does not fit the devices present."""


def mesh_shape(config: MeshConfig, num_devices: int) -> tuple[int, ...]:
    """Axis sizes with a -1 resolved to the devices left over by the others."""
    sizes = [getattr(config, axis) for axis in MESH_AXES]
    layout = dict(zip(MESH_AXES, sizes, strict=True))
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if num_devices % known:
            raise MeshError(
                f"mesh {layout}: the fixed axes ({known} devices) do not divide the "
                f"{num_devices} devices present")
        sizes[sizes.index(-1)] = num_devices // known
    if math.prod(sizes) != num_devices:
        raise MeshError(
            f"mesh {layout} needs {math.prod(sizes)} devices but {num_devices} are present; "
            "set one axis to -1 to use the rest")
    return tuple(sizes)


def make_mesh(config: MeshConfig, devices: list[jax.Device] | None = None) -> Mesh:
    """A mesh over all (or the given) devices with Auto axis types.

    Auto axes let the jit in/out shardings and sharding constraints drive the
    layout, which is what the logical-axis rules are written for.
    """
    devices = list(devices if devices is not None else jax.devices())
    shape = mesh_shape(config, len(devices))
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES),
                         devices=devices)
