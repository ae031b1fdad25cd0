"""Choosing the next token from logits: greedy, or temperature with top-k and top-p."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def sample_next(logits_BxV: jax.Array, key: jax.Array, temperature: float, top_k: int,
                top_p: float) -> jax.Array:
    """One token id per row. Temperature 0 is greedy (argmax); top_k 0 and top_p 1 keep
    every token; otherwise only the k most likely, and the smallest set whose probability
    reaches top_p, stay candidates."""
    if temperature == 0.0:
        return jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)
    scaled_BxV = logits_BxV.astype(jnp.float32) / temperature
    if top_k:
        kth_Bx1 = jax.lax.top_k(scaled_BxV, top_k)[0][:, -1:]
        scaled_BxV = jnp.where(scaled_BxV < kth_Bx1, -jnp.inf, scaled_BxV)
    if top_p < 1.0:
        scaled_BxV = _nucleus(scaled_BxV, top_p)
    return jax.random.categorical(key, scaled_BxV, axis=-1).astype(jnp.int32)


def _nucleus(scaled_BxV: jax.Array, top_p: float) -> jax.Array:
    """Mask all but the most likely tokens whose cumulative probability first reaches top_p."""
    sorted_BxV = jnp.sort(scaled_BxV, axis=-1)[:, ::-1]
    cumulative_BxV = jnp.cumsum(jax.nn.softmax(sorted_BxV, axis=-1), axis=-1)
    # A token stays if the probability of the tokens before it is still below top_p.
    keep_BxV = (cumulative_BxV - jax.nn.softmax(sorted_BxV, axis=-1)) < top_p
    threshold_Bx1 = jnp.min(jnp.where(keep_BxV, sorted_BxV, jnp.inf), axis=-1, keepdims=True)
    return jnp.where(scaled_BxV < threshold_Bx1, -jnp.inf, scaled_BxV)
