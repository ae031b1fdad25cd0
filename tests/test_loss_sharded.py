"""The fused loss under a mesh: each device walks its own rows, the projection is gathered
once and its gradient summed once, and the values equal the loss over whole logits."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import model
from conftest import tiny_config
from sharding import make_mesh, named_sharding, use_rules

ROWS, LENGTH, DIM, VOCAB = 8, 16, 32, 64


def _inputs(seed=0):
    keys = jax.random.split(jax.random.key(seed), 4)
    h_BxLxD = jax.random.normal(keys[0], (ROWS, LENGTH, DIM))
    unembed_DxV = jax.random.normal(keys[1], (DIM, VOCAB)) * 0.2
    targets_BxL = jax.random.randint(keys[2], (ROWS, LENGTH), 0, VOCAB)
    weights_BxL = (jax.random.uniform(keys[3], (ROWS, LENGTH)) > 0.2).astype(jnp.float32)
    return h_BxLxD, unembed_DxV, targets_BxL, weights_BxL


def _value_and_grads(loss, *args):
    return jax.value_and_grad(lambda h, u: loss(h, u, *args)[0], argnums=(0, 1))


def _whole(h_BxLxD, unembed_DxV, targets_BxL, weights_BxL):
    return model.cross_entropy(h_BxLxD @ unembed_DxV, targets_BxL, weights_BxL)


@pytest.mark.parametrize("layout", [
    ("mesh.data=1", "mesh.fsdp=8"),
    ("mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"),  # the vocabulary split over tensor
    ("mesh.data=1", "mesh.fsdp=1", "mesh.tensor=8"),
])
@pytest.mark.parametrize("chunk_tokens", [4, 1000])  # many chunks a device; one
def test_fused_loss_under_a_mesh_equals_the_whole_logits_loss(layout, chunk_tokens):
    config = tiny_config(*layout)
    mesh = make_mesh(config.mesh)
    rules = config.mesh.rules
    h_BxLxD, unembed_DxV, targets_BxL, weights_BxL = _inputs()
    expected_loss, (expected_dh, expected_du) = _value_and_grads(
        _whole, targets_BxL, weights_BxL)(h_BxLxD, unembed_DxV)

    def fused(h, u, targets, weights):
        return model.fused_cross_entropy(h, u, targets, weights, chunk_tokens)

    rows = named_sharding(mesh, ("batch", "length"), rules)
    with use_rules(mesh, rules):
        step = jax.jit(_value_and_grads(fused, targets_BxL, weights_BxL), in_shardings=(
            named_sharding(mesh, ("batch", "length", None), rules),
            named_sharding(mesh, ("embed", "vocab"), rules)))
        loss, (d_h, d_u) = step(h_BxLxD, unembed_DxV)
        eval_loss = jax.jit(fused, in_shardings=(None, None, rows, rows))(
            h_BxLxD, unembed_DxV, targets_BxL, weights_BxL)[0]
    np.testing.assert_allclose(loss, expected_loss, rtol=1e-5)
    np.testing.assert_allclose(eval_loss, expected_loss, rtol=1e-5)
    np.testing.assert_allclose(d_h, expected_dh, rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(d_u, expected_du, rtol=1e-4, atol=1e-7)


def test_the_chunk_is_counted_in_each_devices_rows():
    config = tiny_config("mesh.data=1", "mesh.fsdp=8")
    mesh = make_mesh(config.mesh)
    h_BxLxD, unembed_DxV, targets_BxL, weights_BxL = _inputs()
    with use_rules(mesh, config.mesh.rules):
        text = jax.jit(lambda *a: model.fused_cross_entropy(*a, chunk_tokens=4)).lower(
            h_BxLxD, unembed_DxV, targets_BxL, weights_BxL).as_text()
    # One row a device: chunks of 4 positions, so 4 trips over 16 positions (counted over
    # all 8 rows, a chunk would be a single position and the loop 16 trips).
    assert "f32[4,1,4,64]" in text or "tensor<4x1x4x" in text


def test_rows_fewer_than_the_batch_ways_are_repeated_over_the_rest():
    config = tiny_config("mesh.data=8")  # 4 rows (a micro-batch) over 8 batch ways
    mesh = make_mesh(config.mesh)
    h_BxLxD, unembed_DxV, targets_BxL, weights_BxL = (x[:4] for x in _inputs())
    unembed_DxV = _inputs()[1]
    expected = _whole(h_BxLxD, unembed_DxV, targets_BxL, weights_BxL)[0]
    with use_rules(mesh, config.mesh.rules):
        loss = jax.jit(lambda *a: model.fused_cross_entropy(*a, chunk_tokens=8)[0])(
            h_BxLxD, unembed_DxV, targets_BxL, weights_BxL)
    np.testing.assert_allclose(loss, expected, rtol=1e-5)
