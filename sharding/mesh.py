"""Build the device mesh (data, fsdp, tensor) from the config.

On several TPU slices (multi-slice), the data and fsdp axes may also cross slices
(`mesh.dcn_data`, `mesh.dcn_fsdp`): an axis of size ici x dcn has its dcn part outermost,
so the chips of one slice are neighbours along it and only the outer collectives cross
the data-centre network (DCN), whose bandwidth is a small share of the slice's own links
(ICI). The axis names stay the same, so the logical rules hold unchanged.
"""

from __future__ import annotations

import math

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh

from configs.schema import MESH_AXES, MeshConfig

_AUTO = (AxisType.Auto,) * len(MESH_AXES)


class MeshError(ValueError):
    """The configured mesh does not fit the devices present."""


def dcn_shape(config: MeshConfig) -> tuple[int, ...]:
    """Ways each mesh axis is split across slices (tensor never is: its collectives run in
    every layer and need the slice's own links)."""
    return config.dcn_data, config.dcn_fsdp, 1


def mesh_shape(config: MeshConfig, num_devices: int) -> tuple[int, ...]:
    """Axis sizes (ways within a slice x ways across slices), a -1 resolved to the devices
    of a slice left over by the other axes."""
    slices = math.prod(dcn_shape(config))
    if num_devices % slices:
        raise MeshError(
            f"mesh.dcn_data x mesh.dcn_fsdp = {slices} slices do not divide the {num_devices} "
            "devices present")
    ici = _ici_shape(config, num_devices // slices, slices)
    return tuple(i * d for i, d in zip(ici, dcn_shape(config), strict=True))


def _ici_shape(config: MeshConfig, per_slice: int, slices: int) -> tuple[int, ...]:
    sizes = [getattr(config, axis) for axis in MESH_AXES]
    layout = dict(zip(MESH_AXES, sizes, strict=True))
    devices = (f"{per_slice} devices present" if slices == 1
               else f"{per_slice} devices of each of {slices} slices")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if per_slice % known:
            raise MeshError(
                f"mesh {layout}: the fixed axes ({known} devices) do not divide the {devices}")
        sizes[sizes.index(-1)] = per_slice // known
    if math.prod(sizes) != per_slice:
        present = (f"{per_slice} are present" if slices == 1
                   else f"each of {slices} slices has {per_slice}")
        raise MeshError(
            f"mesh {layout} needs {math.prod(sizes)} devices but {present}; set one axis to "
            "-1 to use the rest")
    return tuple(sizes)


def make_mesh(config: MeshConfig, devices: list[jax.Device] | None = None) -> Mesh:
    """A mesh over all (or the given) devices with Auto axis types.

    Auto axes let the jit in/out shardings and sharding constraints drive the
    layout, which is what the logical-axis rules are written for. Devices that name
    their slice (TPU) are grouped by it; others (CPU, GPU) stand in consecutive blocks
    for the `dcn` slices, which lets a multi-slice layout be tried on one host.
    """
    devices = list(devices if devices is not None else jax.devices())
    shape = mesh_shape(config, len(devices))
    dcn = dcn_shape(config)
    ici = tuple(s // d for s, d in zip(shape, dcn, strict=True))
    slice_ids = {getattr(d, "slice_index", None) for d in devices}
    if None in slice_ids:
        if math.prod(dcn) == 1:
            return jax.make_mesh(shape, MESH_AXES, axis_types=_AUTO, devices=devices)
        return Mesh(_blocks_as_slices(devices, ici, dcn), MESH_AXES, axis_types=_AUTO)
    if len(slice_ids) != math.prod(dcn):
        raise MeshError(
            f"the {len(devices)} devices are on {len(slice_ids)} slice(s) but mesh.dcn_data "
            f"({config.dcn_data}) x mesh.dcn_fsdp ({config.dcn_fsdp}) = {math.prod(dcn)}; "
            "set them so their product is the number of slices")
    if len(slice_ids) == 1:
        return jax.make_mesh(shape, MESH_AXES, axis_types=_AUTO, devices=devices)
    grid = mesh_utils.create_hybrid_device_mesh(ici, dcn, devices)
    return Mesh(grid, MESH_AXES, axis_types=_AUTO)


def _blocks_as_slices(devices: list[jax.Device], ici: tuple[int, ...],
                      dcn: tuple[int, ...]) -> np.ndarray:
    """Devices laid out as consecutive blocks of prod(ici), one a slice: each axis has its
    slice index outermost, as on real slices."""
    grid = np.array(devices, dtype=object).reshape(*dcn, *ici)
    n = len(dcn)
    outer_then_inner = [k for axis in range(n) for k in (axis, n + axis)]
    return grid.transpose(outer_then_inner).reshape(
        [i * d for i, d in zip(ici, dcn, strict=True)])
