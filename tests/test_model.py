import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import configs
import model
from configs.platform import AUTO_FIELDS
from conftest import OPTIMISED, tiny_config, tiny_model_config
from model import cpu_kernels


def _params(cfg, seed=0):
    return jax.jit(lambda: model.init_params(cfg, seed))()



def test_logits_shape_and_dtype():
    cfg = tiny_model_config()
    tokens_BxL = jnp.zeros((3, 7), jnp.int32)
    logits_BxLxV = jax.jit(lambda p, t: model.merge(cfg, p)(t))(_params(cfg), tokens_BxL)
    assert logits_BxLxV.shape == (3, 7, cfg.vocab_size)
    assert logits_BxLxV.dtype == jnp.float32


def test_changing_a_future_token_changes_no_earlier_logit():
    cfg = tiny_model_config()
    forward = jax.jit(lambda p, t: model.merge(cfg, p)(t))
    params = _params(cfg)
    tokens_BxL = jax.random.randint(jax.random.key(1), (2, 16), 0, 256)
    changed_BxL = tokens_BxL.at[:, 10].set((tokens_BxL[:, 10] + 1) % 256)
    before, after = forward(params, tokens_BxL), forward(params, changed_BxL)
    np.testing.assert_array_equal(before[:, :10], after[:, :10])
    assert not np.allclose(before[:, 10:], after[:, 10:])


def _first_loss(cfg, rows: int = 4, length: int = 256, compiler_options=None) -> float:
    """The loss of freshly initialised parameters on uniformly random tokens."""
    tokens_BxL = jax.random.randint(jax.random.key(2), (rows, length + 1), 0, cfg.vocab_size)
    cfg = configs.resolve_auto(cfg, "cpu")

    def loss():
        logits = model.merge(cfg, model.init_params(cfg, 0))(tokens_BxL[:, :-1])
        return model.cross_entropy(logits, tokens_BxL[:, 1:], jnp.ones((rows, length)))[0]

    return float(jax.jit(loss).lower().compile(compiler_options=compiler_options)())


# One case in the fast tier; all four in the full suite.
@pytest.mark.parametrize("family, tied", [
    ("gpt2", True), pytest.param("gpt2", False, marks=pytest.mark.slow),
    pytest.param("llama", False, marks=pytest.mark.slow),
    pytest.param("llama", True, marks=pytest.mark.slow)])
def test_first_loss_of_each_family_tied_or_not_is_near_log_vocab(family, tied):
    cfg = tiny_config(f"model.family={family}", f"model.tie_embeddings={str(tied).lower()}",
                      "model.vocab_size=258").model
    assert abs(_first_loss(cfg) - math.log(cfg.vocab_size)) < 0.2


# The wide presets keep their width and vocabulary but run one or two of their blocks (at
# full depth they do not fit a CI machine). Untied, the first loss depends on the width,
# not the depth; tied, fewer blocks leave more of the embedding in the last hidden state,
# which only raises the loss, so the check is stricter.
@pytest.mark.slow
@pytest.mark.parametrize("preset, layers", [("tiny", None), ("bench-20m", None),
                                            ("gpt2-small", 2), ("llama-1b", 1),
                                            ("llama-7b", 1)])
def test_first_loss_of_every_preset_is_within_0_2_of_log_vocab(preset, layers):
    overrides = ["model.dtype=float32", "model.remat=none"]
    overrides += [f"model.num_layers={layers}"] if layers else []
    cfg = configs.load(preset, overrides).model
    loss = _first_loss(cfg, rows=2, length=128, compiler_options=OPTIMISED)  # real widths
    print(f"{preset}: first loss {loss:.3f}, ln(V) {math.log(cfg.vocab_size):.3f}")
    assert abs(loss - math.log(cfg.vocab_size)) < 0.2


@pytest.mark.parametrize("family", ["llama", pytest.param("gpt2", marks=pytest.mark.slow)])
def test_initial_weights_have_the_configured_stds(family):
    cfg = configs.derive_model(tiny_config(
        f"model.family={family}", "model.bias=true", "model.embed_dim=64", "model.head_dim=16",
        "model.embed_init_std=0.05", "model.position_init_std=0.03",
        "model.unembed_init_std=0.01").model)
    params = _params(cfg)
    attn, mlp = params["blocks"][0]["attn"], params["blocks"][0]["mlp"]
    expected = {"embed": (params["embed_VxD"], 0.05), "query": (attn["wq_DxHxK"], 0.02),
                "out": (attn["wo_HxKxD"], cfg.residual_init_std),
                "unembed": (params["unembed_DxV"], 0.01)}
    expected["down"] = (mlp["w_down_FxD"] if family == "llama" else mlp["w_out_FxD"],
                        cfg.residual_init_std)
    if family == "gpt2":
        expected["positions"] = (params["positions_PxD"], 0.03)
        assert cfg.residual_init_std == pytest.approx(0.02 / math.sqrt(2 * cfg.num_layers))
    else:
        assert cfg.residual_init_std == 0.02  # Llama does not scale its residual projections
    for name, (weight, std) in expected.items():
        assert float(np.std(weight)) == pytest.approx(std, rel=0.1), name
    assert float(np.abs(attn["bq_HxK"]).max()) == 0.0
    np.testing.assert_array_equal(params["final_norm"]["scale"], 1.0)


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
    cfg = tiny_model_config()
    forward = jax.jit(lambda p, t, pos, seg: model.merge(cfg, p)(t, pos, seg))
    params = _params(cfg)
    doc_a = jax.random.randint(jax.random.key(4), (5,), 0, 256)
    doc_b = jax.random.randint(jax.random.key(5), (7,), 0, 256)
    packed = forward(params, jnp.concatenate([doc_a, doc_b])[None],
                     jnp.array([list(range(5)) + list(range(7))]),
                     jnp.array([[1] * 5 + [2] * 7]))
    alone = forward(params, doc_b[None], jnp.arange(7)[None], jnp.ones((1, 7), jnp.int32))
    np.testing.assert_allclose(packed[0, 5:], alone[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("contract", [1, 2])
def test_cpu_dense_and_its_gradients_equal_the_tensordot(contract):
    """The cpu kernel has its own backward (x^T laid out before the weight-gradient matmul)."""
    x_BxLxHxK = jax.random.normal(jax.random.key(0), (2, 5, 3, 4))
    w = jax.random.normal(jax.random.key(1), (4, 6) if contract == 1 else (3, 4, 6))
    d_y = jax.random.normal(jax.random.key(2), (2, 5, 3, 6) if contract == 1 else (2, 5, 6))

    def through(f):
        y = f(x_BxLxHxK, w, contract)
        grads = jax.jit(jax.grad(lambda x, w: jnp.sum(f(x, w, contract) * d_y),
                                 argnums=(0, 1)))(x_BxLxHxK, w)
        return y, *grads

    ours = through(cpu_kernels.dense)
    reference = through(lambda x, w, contract: jnp.tensordot(x, w, axes=contract))
    for name, got, want in zip(("y", "dx", "dw"), ours, reference, strict=True):
        assert got.shape == want.shape, name
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5, err_msg=name)


@pytest.mark.parametrize("field", AUTO_FIELDS)
def test_a_model_of_an_unresolved_config_names_the_auto_field(field):
    cfg = dataclasses.replace(tiny_model_config(), **{field: "auto"})
    with pytest.raises(configs.ConfigError, match=rf"model\.{field} is still auto.*resolve_auto"):
        model.merge(cfg, _params(cfg))


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_bias_switch_adds_or_removes_every_projection_bias(family):
    def biases(*overrides):
        cfg = tiny_config(f"model.family={family}", *overrides).model
        block = model.abstract_params(cfg)["blocks"][0]
        return sorted(f"{part}.{name}" for part in ("attn", "mlp") for name in block[part]
                      if name.startswith("b"))

    on, off = biases("model.bias=true"), biases("model.bias=false")
    assert off == []
    mlp = ["mlp.b_in_F", "mlp.b_out_D"] if family == "gpt2" else [
        "mlp.b_down_D", "mlp.b_gate_F", "mlp.b_up_F"]
    assert on == ["attn.bk_GxK", "attn.bo_D", "attn.bq_HxK", "attn.bv_GxK", *mlp]
    assert biases() == (on if family == "gpt2" else off)  # the family's default
