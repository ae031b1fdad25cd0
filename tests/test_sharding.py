import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import model
from conftest import tiny_config
from sharding import MeshError, logical_to_spec, make_mesh, mesh_shape
from train import run
from train.optimizer import make_optimizer
from train.state import state_shardings


def test_mesh_shape_resolves_minus_one_and_rejects_misfits():
    cfg = tiny_config("mesh.data=-1", "mesh.fsdp=2", "mesh.tensor=2").mesh
    assert mesh_shape(cfg, 8) == (2, 2, 2)
    with pytest.raises(MeshError, match="do not divide the 6 devices"):
        mesh_shape(tiny_config("mesh.fsdp=4").mesh, 6)
    with pytest.raises(MeshError, match="needs 4 devices but 8 are present"):
        mesh_shape(tiny_config("mesh.data=2", "mesh.fsdp=2").mesh, 8)


def test_a_mesh_axis_shards_only_the_first_dimension_that_claims_it():
    rules = tiny_config().mesh.rules
    assert logical_to_spec(("batch", "length", "embed"), rules) == P(("data", "fsdp"), None, None)
    assert logical_to_spec(("embed", "mlp"), rules) == P("fsdp", "tensor")


def test_every_parameter_sharding_follows_the_rules():
    config = tiny_config("mesh.data=1", "mesh.fsdp=4", "mesh.tensor=2")
    mesh = make_mesh(config.mesh)
    shardings = state_shardings(config, mesh, make_optimizer(config.optim, 10)).params
    axes = model.logical_axes(config.model)
    rules = dict(config.mesh.rules)
    checked = 0
    for path, names in jax.tree_util.tree_flatten_with_path(
            axes, is_leaf=lambda x: isinstance(x, tuple))[0]:
        spec = _get(shardings, path).spec
        expected = []
        for name in names:
            mesh_axes = rules.get(name, ())
            expected.append(mesh_axes[0] if len(mesh_axes) == 1 else (mesh_axes or None))
        assert tuple(spec) == tuple(expected), jax.tree_util.keystr(path)
        checked += 1
    assert checked == len(jax.tree.leaves(model.abstract_params(config.model)))
    wq = shardings["blocks"][0]["attn"]["wq_DxHxK"]
    assert wq.spec == P("fsdp", "tensor", None) and wq.mesh.shape["fsdp"] == 4


def _get(tree, path):
    for key in path:
        tree = tree[key.key]
    return tree


def test_indivisible_dimension_is_a_clear_error():
    config = tiny_config("mesh.data=1", "mesh.fsdp=1", "mesh.tensor=8")
    mesh = make_mesh(config.mesh)
    with pytest.raises(MeshError, match=r"kv_heads.*size 2.*cannot be split 8 ways"):
        state_shardings(config, mesh, make_optimizer(config.optim, 10))


@pytest.mark.slow
def test_same_losses_on_every_layout(tmp_path):
    layouts = {
        "one device": (("mesh.data=1",), jax.devices()[:1]),
        "data=8": (("mesh.data=8",), None),
        "fsdp=8": (("mesh.data=1", "mesh.fsdp=8"), None),
        "data=2 x fsdp=2 x tensor=2": (("mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"), None),
    }
    losses = {}
    for name, (layout, devices) in layouts.items():
        config = tiny_config("train.stop_after=3", "train.log_every=1", "checkpoint.every=0",
                             "train.eval_batches=0", f"run_dir={tmp_path / name}", *layout)
        losses[name] = list(run(config, devices=devices).losses.values())
    reference = losses.pop("one device")
    assert len(reference) == 3 and reference[2] < reference[0]
    for name, values in losses.items():
        np.testing.assert_allclose(values, reference, rtol=2e-5, err_msg=name)
