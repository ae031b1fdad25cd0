"""Sampling: KV-cached decoding equals recomputation, sampling options, int8 weights, CLI."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import configs
import input as data_input
import model
from conftest import tiny_config
from generate import Sampling, dequantize, generate, load, quantize_int8
from generate.__main__ import main as generate_main
from generate.quantize import nbytes
from generate.sampler import _decode
from sharding import make_mesh
from train import run

PROMPTS = ["The quick", "a", "Lists in Python are"]
TOKENIZER = data_input.ByteTokenizer()


def _params(cfg, seed=0):
    return jax.jit(lambda: model.init_params(cfg, seed))()


def _greedy_by_recomputing(cfg, params, prompt, steps):
    """The reference: run the whole sequence again for every new token (in a fixed-width
    buffer, so it compiles once; causal attention never looks at the padding after)."""
    forward = jax.jit(lambda p, t: model.merge(cfg, p)(t))
    ids = list(TOKENIZER.encode(prompt))
    buffer = np.full((1, len(ids) + steps), TOKENIZER.pad_id, np.int32)
    buffer[0, :len(ids)] = ids
    new = []
    for length in range(len(ids), len(ids) + steps):
        token = int(jnp.argmax(forward(params, buffer)[0, length - 1]))
        if token == TOKENIZER.eos_id:
            break
        buffer[0, length] = token
        new.append(token)
    return new


@pytest.mark.parametrize("family, scan", [
    ("llama", False), pytest.param("gpt2", True, marks=pytest.mark.slow)])
def test_cached_greedy_decoding_equals_recomputing_the_sequence(family, scan):
    unresolved = tiny_config(f"model.family={family}", f"model.scan_layers={scan}").model
    cfg = configs.resolve_auto(unresolved, "cpu")
    params = _params(cfg)
    # Host arrays and `auto` settings: generate resolves them for the default device's CPU.
    result = generate(jax.device_get(params), TOKENIZER, PROMPTS, unresolved,
                      Sampling(max_new_tokens=12, temperature=0.0))
    for prompt, got in zip(PROMPTS, result.token_ids, strict=True):
        assert got == _greedy_by_recomputing(cfg, params, prompt, 12), prompt
    assert result.prefill_tokens_per_s > 0 and result.decode_tokens_per_s > 0


class _Scripted:
    """A stand-in model: token 65 until a row's position reaches its threshold, then EOS."""

    def __init__(self, thresholds, vocab=300):
        self.thresholds, self.vocab = jnp.asarray(thresholds), vocab

    def decode(self, tokens_Bx1, positions_Bx1, cache):
        ended_B = positions_Bx1[:, 0] >= self.thresholds
        logits_BxV = jnp.where(ended_B[:, None], jax.nn.one_hot(TOKENIZER.eos_id, self.vocab),
                               jax.nn.one_hot(65, self.vocab))
        return logits_BxV[:, None], cache


def test_decoding_stops_when_every_row_has_ended():
    eos = TOKENIZER.eos_id
    lengths_B = jnp.asarray([2, 3])
    first_BxV = jnp.broadcast_to(jax.nn.one_hot(65, 300), (2, 300))
    new_BxN, steps = _decode(_Scripted([4, 8]), first_BxV, None, lengths_B, jax.random.key(0),
                             sampling=Sampling(20, temperature=0.0), slots=0, eos_id=eos)
    assert int(steps) == 7  # row 1 sampled EOS at step 6; nothing ran after
    assert new_BxN[0].tolist() == [65, 65, 65] + [eos] * 17  # ended rows stay ended
    assert new_BxN[1].tolist() == [65] * 6 + [eos] * 14


@pytest.mark.slow
def test_sampling_options():
    cfg = configs.resolve_auto(tiny_config().model, "cpu")
    params = _params(cfg)
    greedy = generate(params, TOKENIZER, PROMPTS, cfg, Sampling(10, temperature=0.0)).token_ids
    top1 = generate(params, TOKENIZER, PROMPTS, cfg, Sampling(10, temperature=1.0, top_k=1))
    nucleus = generate(params, TOKENIZER, PROMPTS, cfg, Sampling(10, temperature=1.0,
                                                                top_p=1e-6))
    assert top1.token_ids == greedy and nucleus.token_ids == greedy
    hot = Sampling(10, temperature=2.0, seed=1)
    first = generate(params, TOKENIZER, PROMPTS, cfg, hot).token_ids
    assert generate(params, TOKENIZER, PROMPTS, cfg, hot).token_ids == first
    other = generate(params, TOKENIZER, PROMPTS, cfg, dataclasses.replace(hot, seed=2))
    assert other.token_ids != first and first != greedy


@pytest.mark.slow
def test_sharded_generation_pads_the_batch_and_matches_one_device():
    config = tiny_config("mesh.data=8")
    cfg = configs.resolve_auto(config.model, "cpu")
    params = _params(cfg)
    mesh = make_mesh(config.mesh)
    sharded = generate(params, TOKENIZER, PROMPTS, cfg, Sampling(8, temperature=0.0), mesh,
                       config.mesh.rules)
    alone = generate(params, TOKENIZER, PROMPTS, cfg, Sampling(8, temperature=0.0))
    assert sharded.token_ids == alone.token_ids


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("trained")
    run(tiny_config("train.steps=80", "train.eval_batches=0", "checkpoint.every=0",
                    "optim.learning_rate=1e-2", f"run_dir={run_dir}"))
    return run_dir


@pytest.mark.slow
def test_int8_weights_are_smaller_and_sample_the_same_tokens(trained_run):
    loaded = load(trained_run)
    cfg = loaded.config.model
    quantized = quantize_int8(loaded.params, model.logical_axes(cfg))
    assert nbytes(loaded.params) / nbytes(quantized) >= 3.5
    tokens = jnp.asarray([TOKENIZER.encode("The quick brown fox jumps over")])
    exact = jax.jit(lambda p: model.merge(cfg, p)(tokens))(loaded.params)
    approx = jax.jit(lambda q: model.merge(cfg, dequantize(q))(tokens))(quantized)
    assert float(jnp.max(jnp.abs(exact - approx))) < 0.05 * float(jnp.max(jnp.abs(exact)))
    greedy = Sampling(20, temperature=0.0)
    full = generate(loaded.params, TOKENIZER, PROMPTS, cfg, greedy)
    small = generate(quantized, TOKENIZER, PROMPTS, cfg, greedy, dequantize=dequantize)
    assert small.token_ids == full.token_ids
    assert any(len(ids) == 20 for ids in full.token_ids)


@pytest.mark.slow
def test_cli_prints_the_continuation_and_names_bad_input(trained_run, tmp_path, capsys):
    assert generate_main([str(trained_run), "--prompt", "The ", "--max-new-tokens", "5",
                          "--temperature", "0", "--quantize", "int8"]) == 0
    out = capsys.readouterr().out
    assert "--- 'The '" in out and "decode" in out and "int8 parameters" in out
    assert generate_main([str(tmp_path / "nothing"), "--prompt", "x"]) == 2
    assert "no complete checkpoint" in capsys.readouterr().err
    assert generate_main([str(trained_run), "--prompt", "x", "--step", "7"]) == 2
    assert "no complete checkpoint step 7" in capsys.readouterr().err
    np.testing.assert_equal(load(trained_run).step, 80)
