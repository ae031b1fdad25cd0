import math

import jax
import jax.numpy as jnp
import numpy as np

import model
from conftest import tiny_config


def _params(cfg, seed=0):
    return jax.jit(lambda: model.init_params(cfg, seed))()


def test_logits_shape_and_dtype():
    cfg = tiny_config().model
    tokens_BxL = jnp.zeros((3, 7), jnp.int32)
    logits_BxLxV = model.merge(cfg, _params(cfg))(tokens_BxL)
    assert logits_BxLxV.shape == (3, 7, cfg.vocab_size)
    assert logits_BxLxV.dtype == jnp.float32


def test_changing_a_future_token_changes_no_earlier_logit():
    cfg = tiny_config().model
    forward = jax.jit(lambda p, t: model.merge(cfg, p)(t))
    params = _params(cfg)
    tokens_BxL = jax.random.randint(jax.random.key(1), (2, 16), 0, 256)
    changed_BxL = tokens_BxL.at[:, 10].set((tokens_BxL[:, 10] + 1) % 256)
    before, after = forward(params, tokens_BxL), forward(params, changed_BxL)
    np.testing.assert_array_equal(before[:, :10], after[:, :10])
    assert not np.allclose(before[:, 10:], after[:, 10:])


def test_loss_at_init_is_close_to_log_vocab():
    cfg = tiny_config().model
    tokens_BxL = jax.random.randint(jax.random.key(2), (4, 33), 0, 256)

    def loss(params):
        logits = model.merge(cfg, params)(tokens_BxL[:, :-1])
        return model.cross_entropy(logits, tokens_BxL[:, 1:], jnp.ones((4, 32)))[0]

    assert abs(float(jax.jit(loss)(_params(cfg))) - math.log(cfg.vocab_size)) < 0.05


def test_every_parameter_has_logical_axes_of_its_rank():
    cfg = tiny_config().model
    shapes = model.abstract_params(cfg)
    axes = model.logical_axes(cfg)
    pairs = jax.tree.leaves(jax.tree.map(lambda s, a: (s.ndim, len(a)), shapes, axes,
                                         is_leaf=lambda x: isinstance(x, tuple)),
                            is_leaf=lambda x: isinstance(x, tuple))
    assert pairs and all(ndim == rank for ndim, rank in pairs)


def test_cross_entropy_ignores_zero_weight_tokens():
    logits = jax.random.normal(jax.random.key(0), (1, 4, 8))
    targets = jnp.array([[1, 2, 3, 4]])
    full, n_full = model.cross_entropy(logits, targets, jnp.array([[1.0, 1.0, 0.0, 0.0]]))
    part, n_part = model.cross_entropy(logits[:, :2], targets[:, :2], jnp.ones((1, 2)))
    assert float(n_full) == float(n_part) == 2.0
    np.testing.assert_allclose(full, part, rtol=1e-6)


def test_a_packed_document_matches_the_same_document_alone():
    cfg = tiny_config().model
    forward = jax.jit(lambda p, t, pos, seg: model.merge(cfg, p)(t, pos, seg))
    params = _params(cfg)
    doc_a = jax.random.randint(jax.random.key(4), (5,), 0, 256)
    doc_b = jax.random.randint(jax.random.key(5), (7,), 0, 256)
    packed = forward(params, jnp.concatenate([doc_a, doc_b])[None],
                     jnp.array([list(range(5)) + list(range(7))]),
                     jnp.array([[1] * 5 + [2] * 7]))
    alone = forward(params, doc_b[None], jnp.arange(7)[None], jnp.ones((1, 7), jnp.int32))
    np.testing.assert_allclose(packed[0, 5:], alone[0], rtol=1e-5, atol=1e-5)


def test_dense_gradients_equal_those_of_the_einsum():
    """`dense` has its own backward (x^T laid out before the weight-gradient matmul)."""
    from model.layers import dense
    x_BxLxHxK = jax.random.normal(jax.random.key(0), (2, 5, 3, 4))
    w_HxKxD = jax.random.normal(jax.random.key(1), (3, 4, 6))
    d_y = jax.random.normal(jax.random.key(2), (2, 5, 6))

    def through(f):
        return jax.jit(jax.grad(lambda x, w: jnp.sum(f(x, w) * d_y), argnums=(0, 1)))(
            x_BxLxHxK, w_HxKxD)

    ours = through(lambda x, w: dense(x, w, contract=2))
    reference = through(lambda x, w: jnp.einsum("blhk,hkd->bld", x, w))
    for got, want in zip(ours, reference, strict=True):
        assert got.shape == want.shape
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
