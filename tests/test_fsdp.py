"""FSDP: each weight gathered whole where it is used, and its gradient returned straight
to the weight's layout."""

import jax
import jax.numpy as jnp
import numpy as np

from conftest import tiny_config
from sharding import make_mesh, named_sharding, use_rules
from sharding.rules import gathered


def _loss_and_grad(config, w_DxF, x_BxD):
    mesh = make_mesh(config.mesh)
    rules = config.mesh.rules

    def loss(w, x):
        return jnp.sum(jnp.tanh(x @ gathered(w, ("embed", "mlp"))) ** 2)

    with use_rules(mesh, rules):
        step = jax.jit(jax.value_and_grad(loss), in_shardings=(
            named_sharding(mesh, ("embed", "mlp"), rules),
            named_sharding(mesh, ("batch", None), rules)))
        text = step.lower(w_DxF, x_BxD).compile().as_text()
        return step(w_DxF, x_BxD), text


def test_a_gathered_weight_has_the_plain_gradient_in_its_own_layout():
    w_DxF = jax.random.normal(jax.random.key(0), (16, 24))
    x_BxD = jax.random.normal(jax.random.key(1), (8, 16))
    (loss, grad), text = _loss_and_grad(tiny_config("mesh.data=1", "mesh.fsdp=8"), w_DxF,
                                        x_BxD)
    expected_loss, expected_grad = jax.value_and_grad(
        lambda w: jnp.sum(jnp.tanh(x_BxD @ w) ** 2))(w_DxF)
    np.testing.assert_allclose(loss, expected_loss, rtol=1e-5)
    np.testing.assert_allclose(grad, expected_grad, rtol=1e-5, atol=1e-6)
    assert grad.sharding.spec[0] == "fsdp"  # left in the weight's layout
    assert "all-gather" in text


def test_without_fsdp_the_weight_is_left_as_it_is():
    w_DxF = jax.random.normal(jax.random.key(0), (16, 24))
    x_BxD = jax.random.normal(jax.random.key(1), (8, 16))
    _, text = _loss_and_grad(tiny_config("mesh.data=8"), w_DxF, x_BxD)
    assert "all-gather" not in text
