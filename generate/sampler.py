"""`generate(params, tokenizer, prompts, cfg)`: prefill, then a compiled decode loop.

The prompts are right-padded into one batch and run through the model once
(prefill), filling a preallocated KV cache of prompt + max_new_tokens slots. The
decode loop is one `lax.while_loop` inside one compiled function: no recompilation
per token, and it stops as soon as every row has produced the end-of-text token.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import configs
import model
import sharding
from configs.schema import ModelConfig
from generate.sampling import sample_next

Params = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class Sampling:
    max_new_tokens: int = 64
    temperature: float = 0.8
    """0 is greedy decoding."""
    top_k: int = 0
    """Keep only the k most likely tokens (0: all)."""
    top_p: float = 1.0
    """Keep the smallest set of tokens whose probability reaches top_p (1: all)."""
    seed: int = 0


@dataclasses.dataclass
class Generation:
    texts: list[str]
    """The continuation of each prompt (without the prompt)."""
    token_ids: list[list[int]]
    prefill_tokens_per_s: float
    decode_tokens_per_s: float
    compile_seconds: float


def _platform(params: Params, mesh: jax.sharding.Mesh | None) -> str:
    """The platform the computation runs on: the mesh's, else that of the devices holding
    `params` (host arrays go to the default device)."""
    if mesh is not None:
        return mesh.devices.flat[0].platform
    leaf = jax.tree.leaves(params)[0]
    device = next(iter(leaf.devices())) if isinstance(leaf, jax.Array) else jax.devices()[0]
    return device.platform


def generate(params: Params, tokenizer: Any, prompts: list[str], cfg: ModelConfig,
             sampling: Sampling = Sampling(), mesh: jax.sharding.Mesh | None = None,
             rules: Any = None,
             dequantize: Any = None) -> Generation:
    """Continue each prompt; `params` may live on any devices (`mesh` + `rules` shard the
    batch and the cache; without them everything runs on the default device).
    `dequantize` turns stored (e.g. int8) parameters into compute parameters inside the
    compiled functions. `auto` settings of `cfg` are resolved for the devices it runs on:
    the mesh's, else those holding `params`."""
    cfg = configs.resolve_auto(cfg, _platform(params, mesh))
    encoded = [np.asarray(tokenizer.encode(p), np.int32) for p in prompts]
    if any(len(e) == 0 for e in encoded):
        raise ValueError("every prompt needs at least one token")
    ways = sharding.batch_ways(mesh, rules) if mesh is not None else 1
    rows = -(-len(prompts) // ways) * ways  # pad the batch to whole shards
    width = max(len(e) for e in encoded)
    slots = width + sampling.max_new_tokens
    if cfg.family == "gpt2" and slots > cfg.max_positions:
        raise ValueError(f"prompt ({width} tokens) + max_new_tokens ({sampling.max_new_tokens}) "
                         f"exceeds the model's {cfg.max_positions} learned positions")
    tokens_BxP = np.full((rows, width), tokenizer.pad_id, np.int32)
    lengths_B = np.ones((rows,), np.int32)
    for row, ids in enumerate(encoded):
        tokens_BxP[row, :len(ids)] = ids
        lengths_B[row] = len(ids)
    run = functools.partial(_run, cfg=cfg, sampling=sampling, slots=slots,
                            eos_id=tokenizer.eos_id, mesh=mesh, rules=rules,
                            dequantize=dequantize or (lambda p: p))
    prefill, decode = (jax.jit(functools.partial(run, phase=phase)) for phase in ("prefill",
                                                                                   "decode"))
    compiling = time.perf_counter()
    key = jax.random.key(sampling.seed)
    prefill_c = prefill.lower(params, tokens_BxP, lengths_B).compile()
    logits_BxV, cache = prefill_c(params, tokens_BxP, lengths_B)
    decode_c = decode.lower(params, logits_BxV, cache, lengths_B, key).compile()
    compile_seconds = time.perf_counter() - compiling

    started = time.perf_counter()
    logits_BxV, cache = jax.block_until_ready(prefill_c(params, tokens_BxP, lengths_B))
    prefill_seconds = time.perf_counter() - started
    started = time.perf_counter()
    new_BxN, steps = jax.device_get(decode_c(params, logits_BxV, cache, lengths_B, key))
    decode_seconds = time.perf_counter() - started
    token_ids = [_until_eos(new_BxN[row], tokenizer.eos_id) for row in range(len(prompts))]
    return Generation(
        texts=[tokenizer.decode(ids) for ids in token_ids], token_ids=token_ids,
        prefill_tokens_per_s=int(lengths_B[:len(prompts)].sum()) / prefill_seconds,
        decode_tokens_per_s=rows * int(steps) / decode_seconds, compile_seconds=compile_seconds)


def _until_eos(ids: np.ndarray, eos_id: int) -> list[int]:
    ids = ids.tolist()
    return ids[:ids.index(eos_id)] if eos_id in ids else ids


def _run(params, *args, phase, cfg, sampling, slots, eos_id, mesh, rules, dequantize):
    transformer = model.merge(cfg, dequantize(params))
    rules_in_force = contextlib.nullcontext() if mesh is None else sharding.use_rules(mesh, rules)
    with rules_in_force:
        return _PHASES[phase](transformer, *args, sampling=sampling, slots=slots, eos_id=eos_id)


def _prefill(transformer, tokens_BxP, lengths_B, *, sampling, slots, eos_id):
    """Run the prompts; the logits at each row's last prompt token, and the filled cache."""
    rows, width = tokens_BxP.shape
    cache = transformer.init_cache(rows, slots)
    positions_BxP = jnp.broadcast_to(jnp.arange(width), (rows, width))
    logits_BxPxV, cache = transformer.decode(tokens_BxP, positions_BxP, cache)
    return logits_BxPxV[jnp.arange(rows), lengths_B - 1], cache


def _decode(transformer, logits_BxV, cache, lengths_B, key, *, sampling, slots, eos_id):
    """Sample, feed back, repeat: up to max_new_tokens or until every row ended."""
    rows = logits_BxV.shape[0]
    new_BxN = jnp.full((rows, sampling.max_new_tokens), eos_id, jnp.int32)

    def more(carry):
        step, _, _, _, done_B, _ = carry
        return (step < sampling.max_new_tokens) & ~jnp.all(done_B)

    def one_token(carry):
        step, logits_BxV, cache, new_BxN, done_B, key = carry
        key, draw = jax.random.split(key)
        next_B = sample_next(logits_BxV, draw, sampling.temperature, sampling.top_k,
                             sampling.top_p)
        next_B = jnp.where(done_B, eos_id, next_B)
        new_BxN = new_BxN.at[:, step].set(next_B)
        # A row's new token goes right after its own prompt, whatever the padding.
        positions_Bx1 = (lengths_B + step)[:, None]
        logits_Bx1xV, cache = transformer.decode(next_B[:, None], positions_Bx1, cache)
        return step + 1, logits_Bx1xV[:, 0], cache, new_BxN, done_B | (next_B == eos_id), key

    start = (jnp.int32(0), logits_BxV, cache, new_BxN, jnp.zeros((rows,), bool), key)
    step, _, _, new_BxN, _, _ = jax.lax.while_loop(more, one_token, start)
    return new_BxN, step


_PHASES = {"prefill": _prefill, "decode": _decode}
