"""Both model families, the attention kernels, scan over layers, remat and the fused loss."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import configs
import model
from conftest import tiny_config, tiny_model_config
from model.attention import attend, dot_product_attention
from model.layers import dropout
from sharding import make_mesh, use_rules
from train.step import loss_fn

FAMILIES = ("llama", "gpt2")


def _params(cfg, seed=0):
    return jax.jit(lambda: model.init_params(cfg, seed))()



@pytest.mark.parametrize("preset, published", [
    ("gpt2-small", 124_439_808),    # GPT-2 small, tied embeddings
    ("llama-1b", 1_235_814_400),    # Llama 3.2 1B
    ("llama-7b", 6_738_415_616),    # Llama 2 7B
    ("bench-20m", 20_580_608),
])
def test_preset_parameter_counts_match_the_published_figures(preset, published):
    shapes = model.abstract_params(configs.load(preset).model)  # jax.eval_shape: no memory
    assert sum(math.prod(s.shape) for s in jax.tree.leaves(shapes)) == published


def test_gpt2_has_its_own_layers_and_ties_its_embeddings():
    cfg = tiny_config("model.family=gpt2", "model.tie_embeddings=true").model
    shapes = model.abstract_params(cfg)
    assert "unembed_DxV" not in shapes
    assert shapes["positions_PxD"].shape == (cfg.max_positions, cfg.embed_dim)
    block = shapes["blocks"][0]
    assert set(block["attn_norm"]) == {"scale", "bias"}
    assert set(block["mlp"]) == {"w_in_DxF", "b_in_F", "w_out_FxD", "b_out_D"}
    assert block["attn"]["bq_HxK"].shape == (cfg.num_heads, cfg.head_dim)
    llama = model.abstract_params(tiny_config().model)["blocks"][0]
    assert set(llama["attn_norm"]) == {"scale"} and "w_gate_DxF" in llama["mlp"]


@pytest.mark.parametrize("family", ["llama", pytest.param("gpt2", marks=pytest.mark.slow)])
def test_each_family_is_causal_and_respects_documents(family):
    cfg = tiny_model_config(f"model.family={family}")
    forward = jax.jit(lambda p, t, pos, seg: model.merge(cfg, p)(t, pos, seg))
    params = _params(cfg)
    tokens_BxL = jax.random.randint(jax.random.key(3), (2, 12), 0, 256)
    segment_ids_BxL = jnp.array([[1] * 5 + [2] * 7, [1] * 12])
    positions_BxL = jnp.array([list(range(5)) + list(range(7)), list(range(12))])
    changed_BxL = tokens_BxL.at[:, 2].set((tokens_BxL[:, 2] + 1) % 256)
    before = forward(params, tokens_BxL, positions_BxL, segment_ids_BxL)
    after = forward(params, changed_BxL, positions_BxL, segment_ids_BxL)
    assert before.shape == (2, 12, cfg.vocab_size)
    np.testing.assert_array_equal(before[:, :2], after[:, :2])  # causal
    np.testing.assert_array_equal(before[0, 5:], after[0, 5:])  # other document
    assert not np.allclose(before[0, 2:5], after[0, 2:5])
    assert not np.allclose(before[1, 5:], after[1, 5:])


# Attention compiled as one program: run eagerly, every operation would compile alone.
_attend = jax.jit(attend, static_argnames="impl")


def _qkv(batch=2, length=128, heads=4, groups=2, head_dim=16):
    keys = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(keys[0], (batch, length, heads, head_dim))
    k, v = (jax.random.normal(key, (batch, length, groups, head_dim)) for key in keys[1:])
    segments = jnp.array([[0] * 50 + [1] * 78, [0] * 128])
    return q, k, v, segments


@pytest.mark.slow
def test_dot_product_attention_path_matches_xla_with_segments():
    # The cuDNN kernel needs an NVIDIA GPU; its jax.nn reference checks our mask handling.
    q, k, v, segments = _qkv()
    expected = _attend(q, k, v, segments, "xla")
    got = jax.jit(functools.partial(dot_product_attention, implementation="xla"))(
        q, k, v, segments)
    np.testing.assert_allclose(got, expected, atol=2e-5)
    assert not np.allclose(_attend(q, k, v, None, "xla"), expected, atol=1e-3)


def test_dropout_changes_training_losses_by_key_and_never_evaluation():
    rates = ("model.embed_dropout=0.1", "model.attention_dropout=0.1",
             "model.residual_dropout=0.1")
    cfg = tiny_model_config(*rates)
    plain = tiny_model_config()
    params = _params(cfg)
    batch = _batch(cfg)
    loss = jax.jit(lambda key: loss_fn(params, batch, cfg, key)[0])
    evaluation = float(jax.jit(lambda: loss_fn(params, batch, cfg)[0])())
    assert evaluation == float(jax.jit(lambda: loss_fn(params, batch, plain)[0])())
    first, again = float(loss(jax.random.key(1))), float(loss(jax.random.key(1)))
    assert first == again and first != evaluation
    assert float(loss(jax.random.key(2))) != first


def test_dropout_zeroes_its_rate_and_keeps_the_mean():
    x = jnp.ones((1000, 100))
    dropped = np.asarray(dropout(x, 0.25, jax.random.key(0)))
    assert abs(float(np.mean(dropped == 0)) - 0.25) < 0.01
    assert abs(float(dropped.mean()) - 1.0) < 0.02
    assert dropout(x, 0.25, None) is x


@pytest.mark.slow
def test_splash_kernel_matches_xla_sharded_and_not():
    # Off TPU the Pallas kernel runs in its interpreter: slow, so small shapes.
    q, k, v, segments = _qkv()
    expected = _attend(q, k, v, segments, "xla")
    np.testing.assert_allclose(_attend(q, k, v, segments, "splash"), expected, atol=2e-5)
    config = tiny_config("mesh.data=1", "mesh.fsdp=2", "mesh.tensor=2")
    mesh = make_mesh(config.mesh, jax.devices()[:4])  # rows over fsdp, heads over tensor

    def sharded(q, k, v, segments):
        with use_rules(mesh, config.mesh.rules):
            return attend(q, k, v, segments, "splash")

    def loss(fn, q):
        return jnp.sum(fn(q, k, v, segments) ** 2)

    np.testing.assert_allclose(jax.jit(sharded)(q, k, v, segments), expected, atol=2e-5)
    grad_splash = jax.jit(jax.grad(functools.partial(loss, sharded)))(q)
    grad_xla = jax.jit(jax.grad(functools.partial(loss, lambda *a: attend(*a, "xla"))))(q)
    np.testing.assert_allclose(grad_splash, grad_xla, atol=1e-4)


def _batch(cfg, rows=4, length=32, seed=7):
    tokens = jax.random.randint(jax.random.key(seed), (rows, length + 1), 0, 256)
    segments = jnp.concatenate([jnp.ones((rows, 20), jnp.int32),
                                2 * jnp.ones((rows, length - 20), jnp.int32)], axis=1)
    positions = jnp.concatenate([jnp.arange(20), jnp.arange(length - 20)])
    return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
            "weights": jnp.ones((rows, length)).at[0, -3:].set(0.0),
            "segment_ids": segments, "positions": jnp.broadcast_to(positions, (rows, length))}


def _loss_and_grads(cfg, params, batch):
    cfg = configs.resolve_auto(cfg, "cpu")
    (loss, _), grads = jax.jit(jax.value_and_grad(
        lambda p: loss_fn(p, batch, cfg), has_aux=True))(params)
    return loss, grads


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_scan_and_remat_give_the_same_loss_and_gradients(family):
    base = tiny_config(f"model.family={family}", "model.tie_embeddings=true").model
    params = _params(base)
    batch = _batch(base)
    loss, grads = _loss_and_grads(base, params, batch)
    # The remat policies wrap a block whatever its family: one family tries each of them.
    for remat in ("full", "save_dots") if family == "llama" else ():
        other_loss, other_grads = _loss_and_grads(
            tiny_config(f"model.family={family}", "model.tie_embeddings=true",
                        f"model.remat={remat}").model, params, batch)
        np.testing.assert_allclose(other_loss, loss, rtol=1e-6)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
                     other_grads, grads)
    scanned = tiny_config(f"model.family={family}", "model.tie_embeddings=true",
                          "model.scan_layers=true", "model.remat=full").model
    scan_loss, scan_grads = _loss_and_grads(scanned, model.stack_layers(params), batch)
    np.testing.assert_allclose(scan_loss, loss, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
                 model.unstack_layers(scan_grads), grads)


@pytest.mark.slow
def test_fused_loss_equals_the_loss_over_whole_logits():
    cfg = tiny_config().model
    params = _params(cfg)
    batch = _batch(cfg)
    whole = configs.ModelConfig(**{**cfg.__dict__, "loss_chunk_tokens": 0})
    loss, grads = _loss_and_grads(whole, params, batch)
    for chunk in (8, 32, 1000):  # several chunks, one chunk per row position, one chunk
        fused = configs.ModelConfig(**{**cfg.__dict__, "loss_chunk_tokens": chunk})
        fused_loss, fused_grads = _loss_and_grads(fused, params, batch)
        np.testing.assert_allclose(fused_loss, loss, rtol=1e-6)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
                     fused_grads, grads)
    cfg = configs.resolve_auto(cfg, "cpu")
    eval_loss = jax.jit(lambda p: loss_fn(p, batch, cfg)[0])(params)  # no gradient path
    np.testing.assert_allclose(eval_loss, loss, rtol=1e-6)


@pytest.mark.slow
def test_bfloat16_compute_keeps_float32_parameters_and_a_close_loss():
    cfg32 = tiny_config("model.dtype=float32").model
    cfg16 = tiny_config("model.dtype=bfloat16").model
    params = _params(cfg32)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))
    batch = _batch(cfg32)
    loss32, _ = _loss_and_grads(cfg32, params, batch)
    loss16, grads16 = _loss_and_grads(cfg16, params, batch)
    assert all(g.dtype == jnp.float32 for g in jax.tree.leaves(grads16))
    assert float(loss16) != float(loss32)
    np.testing.assert_allclose(loss16, loss32, rtol=2e-2)


def test_auto_settings_resolve_per_platform():
    cfg = tiny_config().model
    assert (cfg.dtype, cfg.attention, cfg.matmul) == ("auto", "auto", "auto")
    cpu, gpu, tpu = (configs.resolve_auto(cfg, p) for p in ("cpu", "gpu", "tpu"))
    assert (cpu.dtype, cpu.attention, cpu.matmul) == ("float32", "cpu", "cpu")
    assert (gpu.dtype, gpu.attention, gpu.matmul) == ("bfloat16", "cudnn", "xla")
    assert (tpu.dtype, tpu.attention, tpu.matmul) == ("bfloat16", "splash", "xla")
    assert configs.resolve_auto(tiny_config("model.dtype=float32").model, "tpu").dtype == "float32"
    dropping = tiny_config("model.attention_dropout=0.1").model
    assert [configs.resolve_auto(dropping, p).attention for p in ("cpu", "gpu", "tpu")] == [
        "cpu", "xla", "xla"]


@pytest.mark.parametrize("dropout", [False, True])
def test_cpu_attention_equals_the_plain_kernel_and_its_gradients(dropout):
    """Grouped queries (4 heads over 2 kv heads), two documents in a row; with dropout, one
    key drops the same probabilities in both kernels."""
    q, k, v, segments = _qkv()
    weights = jax.random.normal(jax.random.key(9), q.shape)
    drop = (0.3, jax.random.key(5)) if dropout else None

    @functools.partial(jax.jit, static_argnums=0)  # one program, not an op at a time
    def through(impl):
        def loss(q, k, v):
            return jnp.sum(attend(q, k, v, segments, impl, drop) * weights)
        return attend(q, k, v, segments, impl, drop), *jax.grad(loss, argnums=(0, 1, 2))(q, k, v)

    for name, got, want in zip(("out", "dq", "dk", "dv"), through("cpu"), through("xla"),
                               strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5, err_msg=name)
    if dropout:
        assert not np.allclose(through("xla")[0], attend(q, k, v, segments, "xla"))


def test_a_model_on_the_cpu_kernels_equals_it_on_the_plain_ones():
    plain = tiny_model_config("model.matmul=xla", "model.attention=xla")
    tuned = tiny_model_config()
    assert (tuned.matmul, tuned.attention) == ("cpu", "cpu")
    params = _params(plain)
    batch = _batch(plain)
    loss, grads = _loss_and_grads(plain, params, batch)
    tuned_loss, tuned_grads = _loss_and_grads(tuned, params, batch)
    np.testing.assert_allclose(tuned_loss, loss, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
                 tuned_grads, grads)


@pytest.mark.parametrize("matmul, attention, barrier", [
    ("xla", "xla", False), ("cpu", "xla", True), ("xla", "cpu", True)])
def test_only_the_cpu_kernels_put_an_optimization_barrier_in_the_step(matmul, attention,
                                                                       barrier):
    """The barrier keeps XLA:CPU's transposed copies; in a GPU or TPU program (matmul xla,
    attention xla or a fused kernel) it would only stop fusions."""
    cfg = tiny_model_config(f"model.matmul={matmul}", f"model.attention={attention}",
                        "model.num_layers=1")
    params = _params(cfg)
    batch = _batch(cfg, rows=2)
    text = jax.jit(jax.grad(lambda p: loss_fn(p, batch, cfg)[0])).lower(params).as_text()
    assert ("optimization_barrier" in text) == barrier
