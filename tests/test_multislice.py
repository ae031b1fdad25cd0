"""Multi-slice meshes: mesh.dcn_data / mesh.dcn_fsdp split the data and fsdp axes across
slices, with the same axis names and rules; compiled for 2 TPU slices from this CPU host."""

import dataclasses
import functools

import jax
import numpy as np
import pytest
from jax.experimental import topologies

import configs
import model
from conftest import tiny_config
from sharding import MeshError, make_mesh, mesh_shape
from train import run
from train.compile.step import _lower
from train.optimizer import make_optimizer
from train.state import state_target


@functools.cache
def _v5e_2x2(num_slices: int) -> list[jax.Device]:
    """The chips of `num_slices` v5e 2x2 slices (libtpu's compiler; no TPU needed)."""
    return topologies.get_topology_desc(
        platform="tpu", topology_name="v5e:2x2", chip_config_name="default",
        chips_per_host_bounds=(2, 2, 1), num_slices=num_slices).devices


def _ids(mesh: jax.sharding.Mesh) -> np.ndarray:
    return np.vectorize(lambda d: d.id)(mesh.devices)


def test_dcn_ways_multiply_the_axes_and_a_minus_one_fills_a_slice():
    assert mesh_shape(tiny_config("mesh.dcn_data=2").mesh, 8) == (8, 1, 1)
    cfg = tiny_config("mesh.data=1", "mesh.fsdp=-1", "mesh.dcn_fsdp=2").mesh
    assert mesh_shape(cfg, 8) == (1, 8, 1)
    cfg = tiny_config("mesh.data=1", "mesh.fsdp=2", "mesh.tensor=2", "mesh.dcn_data=2").mesh
    assert mesh_shape(cfg, 8) == (2, 2, 2)
    with pytest.raises(MeshError, match="3 slices do not divide the 8 devices"):
        mesh_shape(tiny_config("mesh.dcn_data=3").mesh, 8)
    with pytest.raises(MeshError, match="needs 2 devices but each of 2 slices has 4"):
        mesh_shape(tiny_config("mesh.data=2", "mesh.dcn_fsdp=2").mesh, 8)


@pytest.mark.parametrize("field", ["mesh.dcn_data", "mesh.dcn_fsdp"])
def test_dcn_ways_must_be_positive_integers(field):
    with pytest.raises(configs.ConfigError, match=f"{field} must be positive, got 0"):
        tiny_config(f"{field}=0")
    with pytest.raises(configs.ConfigError, match=f"{field}: expected int, got '1.5'"):
        tiny_config(f"{field}=1.5")


def test_cpu_devices_stand_in_consecutive_blocks_for_slices():
    mesh = make_mesh(tiny_config("mesh.data=1", "mesh.fsdp=2", "mesh.tensor=2",
                                 "mesh.dcn_data=2").mesh)
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    np.testing.assert_array_equal(_ids(mesh), np.arange(8).reshape(2, 2, 2))
    # fsdp 2 in a slice x 2 slices: slice 0 (devices 0-3) is the first half of the fsdp axis.
    mesh = make_mesh(tiny_config("mesh.data=2", "mesh.fsdp=2", "mesh.dcn_fsdp=2").mesh)
    assert dict(mesh.shape) == {"data": 2, "fsdp": 4, "tensor": 1}
    np.testing.assert_array_equal(_ids(mesh)[:, :, 0], [[0, 1, 4, 5], [2, 3, 6, 7]])
    assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)


@pytest.mark.parametrize("dcn, axis", [("mesh.dcn_data=2", 0), ("mesh.dcn_fsdp=2", 1)])
def test_tpu_slices_are_the_outer_part_of_their_axis(dcn, axis):
    devices = _v5e_2x2(2)
    mesh = make_mesh(tiny_config("mesh.data=1", "mesh.fsdp=4", dcn).mesh, devices)
    assert mesh.devices.shape[axis] == 2 * (4 if axis else 1)
    slices = np.vectorize(lambda d: d.slice_index)(mesh.devices)
    outer = slices.shape[axis] // 2
    first, second = np.split(slices, [outer], axis=axis)
    assert (first == 0).all() and (second == 1).all()  # one slice's chips are contiguous
    assert sorted(_ids(mesh).ravel()) == sorted(d.id for d in devices)


def test_dcn_ways_must_match_the_slices_present():
    two_slices = _v5e_2x2(2)
    with pytest.raises(MeshError, match=r"on 2 slice\(s\) but mesh.dcn_data \(1\) x "
                                        r"mesh.dcn_fsdp \(1\) = 1"):
        make_mesh(tiny_config("mesh.data=-1").mesh, two_slices)
    with pytest.raises(MeshError, match=r"on 2 slice\(s\) but .* = 4"):
        make_mesh(tiny_config("mesh.dcn_data=2", "mesh.dcn_fsdp=2").mesh, two_slices)


def test_tiny_compiles_for_two_tpu_slices_with_the_rules_shardings_and_tpu_kernels():
    config = tiny_config("mesh.data=1", "mesh.fsdp=4", "mesh.dcn_data=2", "data.seq_len=128")
    config = dataclasses.replace(config, model=configs.resolve_auto(config.model, "tpu"))
    assert (config.model.attention, config.model.matmul) == ("splash", "xla")
    mesh = make_mesh(config.mesh, _v5e_2x2(2))
    tx = make_optimizer(config.optim, config.train.steps)
    lowered = _lower(config, mesh, tx, state_target(config, mesh, tx))
    compiled = lowered.compile()
    params = compiled.input_shardings[0][0].params
    rules = dict(config.mesh.rules)
    checked = 0
    for path, names in jax.tree_util.tree_flatten_with_path(
            model.logical_axes(config.model), is_leaf=lambda x: isinstance(x, tuple))[0]:
        sharding = functools.reduce(lambda tree, key: tree[key.key], path, params)
        expected = tuple(_mesh_axes(rules.get(name, ())) for name in names)
        assert tuple(sharding.spec) + (None,) * (len(names) - len(sharding.spec)) == expected
        assert sharding.mesh.devices.shape == (2, 4, 1)
        checked += 1
    assert checked == len(jax.tree.leaves(model.abstract_params(config.model)))
    hlo = compiled.as_text()
    # splash is a Mosaic kernel for the TPU, not the Pallas interpreter's loops; nothing of
    # the XLA:CPU kernels (their optimisation barrier) is in the TPU program.
    assert "tpu_custom_call" in hlo
    assert "cpu_kernels.py" not in lowered.as_text(debug_info=True)
    assert "opt-barrier" not in hlo


def _mesh_axes(axes: tuple[str, ...]) -> str | tuple[str, ...] | None:
    return axes[0] if len(axes) == 1 else (axes or None)


@pytest.mark.slow
def test_two_cpu_slices_train_as_one_slice_of_the_same_layout(tmp_path):
    layouts = {"one slice": ("mesh.data=4", "mesh.fsdp=2"),
               "two slices": ("mesh.data=2", "mesh.fsdp=2", "mesh.dcn_data=2")}
    losses = {}
    for name, layout in layouts.items():
        config = tiny_config("train.stop_after=3", "train.log_every=1", "checkpoint.every=0",
                             "train.eval_batches=0", f"run_dir={tmp_path / name}", *layout)
        losses[name] = list(run(config).losses.values())
    assert len(losses["one slice"]) == 3 and losses["one slice"][2] < losses["one slice"][0]
    np.testing.assert_allclose(losses["two slices"], losses["one slice"], rtol=2e-5)
