"""Weight-only int8 for inference: int8 values with a float32 scale per output channel.

Every weight matrix (and the vocabulary tables) is stored as round(w / scale) in int8,
scale = max |w| / 127 over the dimensions a matmul contracts, so each output channel
(each vocabulary row of a table) keeps its own range. Norm scales and biases stay
float32. `dequantize` runs inside the compiled sampler, so parameters stay int8 in
device memory and are widened only transiently.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

Params = dict[str, Any]
QUANTIZED = "int8"
SCALE = "scale"


def quantize_int8(params: Params, axes: Params) -> Params:
    """The parameters with each matrix replaced by {"int8": values, "scale": scales}."""
    def one(value: jax.Array, names: tuple[str | None, ...]) -> Any:
        contracted = _contracted(names)
        if not contracted:
            return value
        scale = jnp.max(jnp.abs(value), axis=contracted, keepdims=True) / 127.0
        scale = jnp.where(scale == 0, 1.0, scale).astype(jnp.float32)
        quantized = jnp.clip(jnp.round(value / scale), -127, 127).astype(jnp.int8)
        return {QUANTIZED: quantized, SCALE: scale}

    return jax.tree.map(one, params, axes, is_leaf=lambda x: isinstance(x, tuple))


def dequantize(params: Params, dtype: Any = jnp.float32) -> Params:
    """int8 entries back to `dtype` weights; everything else unchanged."""
    def one(entry: Any) -> Any:
        if isinstance(entry, dict) and set(entry) == {QUANTIZED, SCALE}:
            return (entry[QUANTIZED].astype(jnp.float32) * entry[SCALE]).astype(dtype)
        return entry
    return jax.tree.map(one, params, is_leaf=lambda x: isinstance(x, dict) and QUANTIZED in x)


def nbytes(params: Params) -> int:
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params))


def _contracted(names: tuple[str | None, ...]) -> tuple[int, ...]:
    """Dimensions a scale is shared over: the input side of a weight matrix; the embed
    dimension of a vocabulary or position table (one scale per row)."""
    if "embed" not in names or len([n for n in names if n != "layers"]) < 2:
        return ()  # norm scales and biases
    if names[-1] == "embed" and ("vocab" in names or "positions" in names):
        return (names.index("embed"),)  # tables: one scale per row
    if names[-1] == "embed":  # wo (heads, head_dim, embed), down (mlp, embed)
        return tuple(i for i, n in enumerate(names[:-1]) if n != "layers")
    return (names.index("embed"),)  # q/k/v, gate/up/in, unembed: contract embed
