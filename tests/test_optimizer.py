"""The optimizer: learning-rate schedules, Adam's epsilon and the weight-decay mask."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import configs
import model
from conftest import tiny_config
from train.optimizer import decay_mask, lr_schedule, make_optimizer

PEAK, FLOOR = 1e-3, 1e-4


def _lrs(schedule: str, *overrides: str, steps: int = 100) -> np.ndarray:
    """The learning rate of steps 1..steps (index 0 is step 1)."""
    optim = tiny_config(f"optim.schedule={schedule}", f"optim.learning_rate={PEAK}",
                        "optim.warmup_steps=10", f"optim.min_lr={FLOOR}",
                        f"train.steps={steps}", *overrides).optim
    schedule_fn = lr_schedule(optim, steps)
    return np.array([float(schedule_fn(count)) for count in range(steps + 20)])


def test_warmup_starts_above_zero_and_reaches_the_peak_at_its_last_step():
    lrs = _lrs("cosine")
    np.testing.assert_allclose(lrs[:10], PEAK * np.arange(1, 11) / 10, rtol=1e-6)


@pytest.mark.parametrize("schedule", ["cosine", "linear"])
def test_decays_reach_the_minimum_at_decay_steps_and_stay(schedule):
    lrs = _lrs(schedule, "optim.decay_steps=50")  # decays over steps 11..50
    assert lrs[49] == pytest.approx(FLOOR)  # step 50
    np.testing.assert_allclose(lrs[50:], FLOOR, rtol=1e-6)
    assert lrs[29] == pytest.approx((PEAK + FLOOR) / 2, rel=1e-5)  # step 30: half way down
    quarter = lrs[19]  # step 20
    expected = (FLOOR + (PEAK - FLOOR) * 0.5 * (1 + math.cos(math.pi / 4)) if schedule == "cosine"
                else PEAK - (PEAK - FLOOR) / 4)
    assert quarter == pytest.approx(expected, rel=1e-5)


def test_decay_steps_default_to_train_steps_and_min_lr_ratio_applies_without_min_lr():
    optim = tiny_config("optim.learning_rate=1e-3", "optim.min_lr_ratio=0.2",
                        "optim.warmup_steps=0").optim
    schedule = lr_schedule(optim, 50)
    assert float(schedule(49)) == pytest.approx(2e-4)  # step 50 = train.steps
    assert float(schedule(0)) == pytest.approx(1e-3, rel=1e-3)


def test_constant_holds_the_peak_after_warmup():
    np.testing.assert_allclose(_lrs("constant")[10:], PEAK, rtol=1e-6)


def test_wsd_is_stable_then_decays_linearly_over_its_last_fraction():
    lrs = _lrs("wsd", "optim.wsd_decay_fraction=0.2")  # decay over steps 81..100
    np.testing.assert_allclose(lrs[10:80], PEAK, rtol=1e-6)
    assert lrs[89] == pytest.approx((PEAK + FLOOR) / 2, rel=1e-5)  # step 90
    assert lrs[99] == pytest.approx(FLOOR)
    assert np.all(np.diff(lrs[79:100]) < 0)


def test_adam_epsilon_reaches_the_update():
    params = {"w": jnp.ones((4, 4))}
    grads = {"w": jnp.full((4, 4), 1e-6)}

    def first_update(eps: float) -> float:
        optim = tiny_config(f"optim.eps={eps}", "optim.weight_decay=0", "optim.grad_clip=0",
                            "optim.warmup_steps=0", "optim.schedule=constant").optim
        tx = make_optimizer(optim, 10)
        updates, _ = tx.update(grads, tx.init(params), params)
        return float(jnp.abs(updates["w"]).max())

    lr = tiny_config().optim.learning_rate
    assert first_update(1e-8) == pytest.approx(lr * 1e-6 / (1e-6 + 1e-8), rel=1e-4)
    assert first_update(1e-3) == pytest.approx(lr * 1e-6 / (1e-6 + 1e-3), rel=1e-4)


def _decayed_names(cfg, decay_embeddings: bool) -> dict[str, bool]:
    mask = decay_mask(model.abstract_params(cfg), decay_embeddings)
    flat = jax.tree_util.tree_flatten_with_path(mask)[0]
    return {"/".join(str(getattr(k, "key", k)) for k in path): value for path, value in flat}


@pytest.mark.parametrize("family, scan", [("gpt2", False), ("gpt2", True), ("llama", True)])
def test_weight_decay_skips_biases_and_norms_and_embeddings_on_request(family, scan):
    cfg = configs.derive_model(tiny_config(f"model.family={family}", "model.bias=true",
                                           f"model.scan_layers={str(scan).lower()}").model)
    decayed = _decayed_names(cfg, decay_embeddings=True)
    for name, value in decayed.items():
        leaf = name.split("/")[-1]
        is_matrix = leaf.startswith(("w", "embed_", "positions_", "unembed_"))
        assert value == is_matrix, name  # scanned biases and scales are 2-D: not by rank
    biases = [n for n in decayed if n.split("/")[-1].startswith("b") and "norm" not in n]
    assert len(biases) == (6 if family == "gpt2" else 7) * (1 if scan else cfg.num_layers)
    kept = _decayed_names(cfg, decay_embeddings=False)
    assert not kept["embed_VxD"] and kept["unembed_DxV"]
    assert kept.get("positions_PxD", False) is False


def test_masked_parameters_are_not_shrunk_by_weight_decay():
    optim = tiny_config("optim.weight_decay=0.5", "optim.warmup_steps=0").optim
    params = {"attn_norm": {"scale": jnp.ones(3)}, "b_in_F": jnp.ones(3), "w_in_DxF": jnp.ones(3)}
    tx = make_optimizer(optim, 10)
    zero = jax.tree.map(jnp.zeros_like, params)
    updates, _ = tx.update(zero, tx.init(params), params)
    moved = optax.apply_updates(params, updates)
    assert float(moved["attn_norm"]["scale"][0]) == 1.0 and float(moved["b_in_F"][0]) == 1.0
    assert float(moved["w_in_DxF"][0]) < 1.0
