"""The compiled train step: gradient accumulation, memory check, FLOP count and MFU peak."""

import functools
import json
import math

import jax
import numpy as np
import pytest

import configs
import model
from conftest import resolved, tiny_config
from observe import flops
from sharding import batch_sharding, make_mesh, shardings_of
from train.compile.step import StepMemory, check_fits, compile_train_step
from train.optimizer import make_optimizer
from train.state import init_state, state_target


def _batch(rows, length, seed=0):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, 256, (rows, length + 1), dtype=np.int32)
    weights = np.ones((rows, length), np.float32)
    weights[::3, -5:] = 0.0  # uneven token counts per micro-batch
    return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "weights": weights,
            "segment_ids": np.ones((rows, length), np.int32),
            "positions": np.broadcast_to(np.arange(length, dtype=np.int32), (rows, length))}


def _one_step(config, devices=None):
    config = resolved(config)
    mesh = make_mesh(config.mesh, devices)
    tx = make_optimizer(config.optim, config.train.steps)
    target = state_target(config, mesh, tx)
    state = jax.jit(functools.partial(init_state, config, tx),
                    out_shardings=shardings_of(target))()
    step = compile_train_step(config, mesh, tx, target)
    batch = {k: jax.device_put(v, batch_sharding(mesh, config.mesh.rules))
             for k, v in _batch(config.train.batch_size, config.data.seq_len).items()}
    return step, *step.fn(state, batch)


@pytest.mark.slow
def test_four_micro_batches_equal_one_batch_four_times_the_size():
    whole_step, whole, whole_metrics = _one_step(tiny_config("train.batch_size=16"))
    _, parts, parts_metrics = _one_step(tiny_config("train.batch_size=16",
                                                    "train.microbatches=4"))
    assert float(parts_metrics["tokens"]) == float(whole_metrics["tokens"]) == 16 * 32 - 6 * 5
    np.testing.assert_allclose(parts_metrics["loss"], whole_metrics["loss"], rtol=1e-6)
    np.testing.assert_allclose(parts_metrics["grad_norm"], whole_metrics["grad_norm"], rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
                 parts.params, whole.params)
    assert whole_step.memory is not None and whole_step.memory.arguments > 0


def test_micro_batches_must_split_evenly_over_the_batch_shards(tmp_path):
    with pytest.raises(configs.ConfigError, match="train.microbatches"):
        tiny_config("train.batch_size=8", "train.microbatches=3")
    from train import run
    config = tiny_config("train.batch_size=8", "train.microbatches=2", f"run_dir={tmp_path}")
    with pytest.raises(configs.ConfigError, match=r"multiple of the 8 ways.*microbatches \(2\)"):
        run(config)


def test_a_step_too_big_for_the_device_is_refused_before_it_runs():
    memory = StepMemory(arguments=3 * 2**30, outputs=3 * 2**30, aliased=3 * 2**30,
                        temporaries=2 * 2**30)
    assert memory.total == 5 * 2**30
    check_fits(memory, 6 * 2**30)
    check_fits(memory, None)  # CPU: unknown, nothing to check
    with pytest.raises(configs.ConfigError, match=r"needs 5.00 GiB per device.*has 4.00 GiB"):
        check_fits(memory, 4 * 2**30)


def test_flops_formula_counts_every_matmul_weight_of_the_model():
    for preset in ("bench-20m", "gpt2-small", "llama-1b"):
        config = configs.load(preset)
        m = config.model
        shapes = model.abstract_params(m)
        matrices = sum(math.prod(s.shape) for path, s in
                       jax.tree_util.tree_leaves_with_path(shapes["blocks"])
                       if str(path[-1].key).startswith("w"))  # weights; not norms or biases
        attention = m.num_layers * config.data.seq_len * m.num_heads * m.head_dim
        expected = 6 * matrices + 6 * m.embed_dim * m.vocab_size + 6 * attention
        assert flops.flops_per_token(m, config.data.seq_len) == expected
    bench = configs.load("bench-20m")
    per_step = flops.flops_per_token(bench.model, 256) * 2048
    assert round(per_step / 1e9, 2) == 155.42  # "about 155 GFLOP a step"


def test_peak_flops_from_the_table_or_a_cpu_measurement_cached_once(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    measured = []
    monkeypatch.setattr(flops, "matmul_peak", lambda dtype: measured.append(dtype) or 1.5e11)
    peak, source = flops.peak_flops(jax.devices(), "float32")
    assert peak == 1.5e11 and "measured" in source
    assert flops.peak_flops(jax.devices(), "float32")[0] == 1.5e11
    assert measured == ["float32"]  # the second run read the cache
    flops.peak_flops(jax.devices(), "bfloat16")
    assert measured == ["float32", "bfloat16"]  # one entry per dtype
    cached = json.loads((tmp_path / "io-first-lm" / "matmul_peak.json").read_text())
    assert sorted(cached.values()) == [1.5e11, 1.5e11] and len(cached) == 2

    class FakeH100:
        platform, device_kind = "gpu", "NVIDIA H100 80GB HBM3"
    assert flops.peak_flops([FakeH100()] * 8, "bfloat16")[0] == 8 * 989e12


def test_matmul_measurement_is_a_plausible_rate():
    rate = flops.measure_matmul("float32", size=256, repeats=2)
    assert 1e8 < rate < 1e14
