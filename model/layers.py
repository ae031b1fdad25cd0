"""Building blocks of both decoder families.

Llama: RMSNorm, rotary positions, grouped-query attention, SwiGLU.
GPT-2: LayerNorm with bias, (learned positions, in the transformer), attention and a
GELU MLP. The projections have biases where `cfg.bias` says (by default GPT-2's do).

Every parameter carries `logical_axes` metadata; activations are constrained by
logical names through `sharding.constrain`. Shape suffixes: B batch, L length,
D embed, H query heads, G kv heads, K head dim, F mlp.

A layer contracts activations with its weights by the `dense` that `cfg.matmul`
names, picked once when the layer is built: a plain tensordot (`xla`), or the 2-D
matmul kernel tuned for XLA:CPU (`cpu`, from `model.cpu_kernels`).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from configs.schema import ModelConfig
from model import cpu_kernels
from model.attention import attend, attend_cache, write_cache
from sharding import constrain
from sharding.rules import gathered

LogicalAxes = tuple[str | None, ...]


def param(rngs: nnx.Rngs, shape: tuple[int, ...], axes: LogicalAxes, std: float) -> nnx.Param:
    """A normally initialised float32 weight tagged with its logical axes."""
    value = std * jax.random.normal(rngs.params(), shape, jnp.float32)
    return nnx.Param(value, logical_axes=axes)


def dense(x: jax.Array, w: jax.Array, contract: int = 1) -> jax.Array:
    """x's last `contract` dims contracted with w's first ones: a plain tensordot."""
    return jnp.tensordot(x, w, axes=contract)


Dense = Callable[[jax.Array, jax.Array, int], jax.Array]
# `model.matmul` -> how the layers contract activations with their weights.
DENSE_KERNELS: dict[str, Dense] = {"xla": dense, "cpu": cpu_kernels.dense}


def dense_kernel(matmul: str) -> Dense:
    """The `dense` a resolved `model.matmul` setting names: `xla` or `cpu`."""
    if matmul not in DENSE_KERNELS:
        raise ValueError(f"model.matmul must be one of {', '.join(DENSE_KERNELS)}, got "
                         f"{matmul!r} (resolve auto with configs.resolve_auto first)")
    return DENSE_KERNELS[matmul]


def weight(w: nnx.Param, dtype: jnp.dtype) -> jax.Array:
    """A parameter as the layer computes with it: in the compute dtype, and whole over the
    batch axes (an FSDP all-gather; see `sharding.rules.gathered`)."""
    axes = w.get_metadata()["logical_axes"]
    value = w[...].astype(dtype)
    return gathered(value, tuple(axes)[len(axes) - value.ndim:])  # a scanned layer's slice


def zeros(shape: tuple[int, ...], axes: LogicalAxes) -> nnx.Param:
    """A zero-initialised float32 bias tagged with its logical axes."""
    return nnx.Param(jnp.zeros(shape, jnp.float32), logical_axes=axes)


def dropout(x: jax.Array, rate: float, key: jax.Array | None) -> jax.Array:
    """x with each element zeroed with probability `rate` and the rest scaled by
    1 / (1 - rate); x itself without a key (evaluation, sampling) or at rate 0."""
    if key is None or not rate:
        return x
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, eps: float):
        self.scale = nnx.Param(jnp.ones((dim,), jnp.float32), logical_axes=("norm",))
        self.eps = eps

    def __call__(self, x_BxLxD: jax.Array) -> jax.Array:
        x32 = x_BxLxD.astype(jnp.float32)
        inv_rms = jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (x32 * inv_rms * self.scale[...]).astype(x_BxLxD.dtype)


class LayerNorm(nnx.Module):
    def __init__(self, dim: int, eps: float):
        self.scale = nnx.Param(jnp.ones((dim,), jnp.float32), logical_axes=("norm",))
        self.bias = zeros((dim,), ("norm",))
        self.eps = eps

    def __call__(self, x_BxLxD: jax.Array) -> jax.Array:
        x32 = x_BxLxD.astype(jnp.float32)
        centred = x32 - jnp.mean(x32, axis=-1, keepdims=True)
        inv_std = jax.lax.rsqrt(jnp.mean(centred * centred, axis=-1, keepdims=True) + self.eps)
        return (centred * inv_std * self.scale[...] + self.bias[...]).astype(x_BxLxD.dtype)


def norm(cfg: ModelConfig) -> RMSNorm | LayerNorm:
    return (LayerNorm if cfg.family == "gpt2" else RMSNorm)(cfg.embed_dim, cfg.norm_eps)


def rotary(x_BxLxNxK: jax.Array, positions_BxL: jax.Array, theta: float) -> jax.Array:
    """Rotate pairs (i, i + K/2) of each head by position-dependent angles."""
    half = x_BxLxNxK.shape[-1] // 2
    inv_freq_K2 = theta ** (-jnp.arange(half, dtype=jnp.float32) / half)
    angle_BxLx1xK2 = (positions_BxL[..., None, None].astype(jnp.float32) * inv_freq_K2)
    sin, cos = jnp.sin(angle_BxLx1xK2), jnp.cos(angle_BxLx1xK2)
    x1, x2 = jnp.split(x_BxLxNxK.astype(jnp.float32), 2, axis=-1)
    rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return rotated.astype(x_BxLxNxK.dtype)


class Attention(nnx.Module):
    """Causal self-attention: grouped-query with rotary positions (llama), or without
    rotation (gpt2, whose positions are added to the embeddings)."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        d, h, g, k = cfg.embed_dim, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        std = cfg.init_std
        self.wq_DxHxK = param(rngs, (d, h, k), ("embed", "heads", "head_dim"), std)
        self.wk_DxGxK = param(rngs, (d, g, k), ("embed", "kv_heads", "head_dim"), std)
        self.wv_DxGxK = param(rngs, (d, g, k), ("embed", "kv_heads", "head_dim"), std)
        self.wo_HxKxD = param(rngs, (h, k, d), ("heads", "head_dim", "embed"),
                              cfg.residual_init_std)
        self.biased = cfg.bias
        if self.biased:
            self.bq_HxK = zeros((h, k), ("heads", "head_dim"))
            self.bk_GxK = zeros((g, k), ("kv_heads", "head_dim"))
            self.bv_GxK = zeros((g, k), ("kv_heads", "head_dim"))
            self.bo_D = zeros((d,), ("embed",))
        self.rotary = cfg.family == "llama"
        self.theta = cfg.rope_theta
        self.dtype = jnp.dtype(cfg.dtype)
        self.impl = cfg.attention
        self.dropout = cfg.attention_dropout
        self.dense = dense_kernel(cfg.matmul)

    def __call__(self, x_BxLxD: jax.Array, positions_BxL: jax.Array,
                 segment_ids_BxL: jax.Array | None,
                 dropout_key: jax.Array | None = None) -> jax.Array:
        q_BxLxHxK, k_BxLxGxK, v_BxLxGxK = self._project(x_BxLxD, positions_BxL)
        dropout = (self.dropout, dropout_key) if self.dropout and dropout_key is not None else None
        out_BxLxHxK = attend(q_BxLxHxK, k_BxLxGxK, v_BxLxGxK, segment_ids_BxL, self.impl,
                             dropout)
        return self._output(out_BxLxHxK)

    def decode(self, x_BxTxD: jax.Array, positions_BxT: jax.Array, k_BxSxGxK: jax.Array,
               v_BxSxGxK: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Attention of T new tokens per row over a KV cache of S slots.

        The new keys and values are written at their positions first; a token at
        position p then attends to slots 0..p (later slots hold stale entries).
        """
        q_BxTxHxK, k_BxTxGxK, v_BxTxGxK = self._project(x_BxTxD, positions_BxT)
        k_BxSxGxK = write_cache(k_BxSxGxK, k_BxTxGxK, positions_BxT[:, 0])
        v_BxSxGxK = write_cache(v_BxSxGxK, v_BxTxGxK, positions_BxT[:, 0])
        out_BxTxHxK = attend_cache(q_BxTxHxK, k_BxSxGxK, v_BxSxGxK, positions_BxT)
        return self._output(out_BxTxHxK), k_BxSxGxK, v_BxSxGxK

    def _project(self, x_BxLxD: jax.Array,
                 positions_BxL: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        dt = self.dtype
        q_BxLxHxK = self.dense(x_BxLxD, weight(self.wq_DxHxK, dt))
        k_BxLxGxK = self.dense(x_BxLxD, weight(self.wk_DxGxK, dt))
        v_BxLxGxK = self.dense(x_BxLxD, weight(self.wv_DxGxK, dt))
        if self.biased:
            q_BxLxHxK = q_BxLxHxK + self.bq_HxK[...].astype(dt)
            k_BxLxGxK = k_BxLxGxK + self.bk_GxK[...].astype(dt)
            v_BxLxGxK = v_BxLxGxK + self.bv_GxK[...].astype(dt)
        q_BxLxHxK = constrain(q_BxLxHxK, ("batch", "length", "heads", "head_dim"))
        k_BxLxGxK = constrain(k_BxLxGxK, ("batch", "length", "kv_heads", "head_dim"))
        v_BxLxGxK = constrain(v_BxLxGxK, ("batch", "length", "kv_heads", "head_dim"))
        if self.rotary:
            q_BxLxHxK = rotary(q_BxLxHxK, positions_BxL, self.theta)
            k_BxLxGxK = rotary(k_BxLxGxK, positions_BxL, self.theta)
        return q_BxLxHxK, k_BxLxGxK, v_BxLxGxK

    def _output(self, out_BxLxHxK: jax.Array) -> jax.Array:
        out_BxLxHxK = constrain(out_BxLxHxK, ("batch", "length", "heads", "head_dim"))
        out_BxLxD = self.dense(out_BxLxHxK, weight(self.wo_HxKxD, self.dtype), 2)
        return out_BxLxD + self.bo_D[...].astype(self.dtype) if self.biased else out_BxLxD


class SwiGLU(nnx.Module):
    """Llama's MLP: down(silu(gate(x)) * up(x)), with biases if `cfg.bias`."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        d, f, std = cfg.embed_dim, cfg.mlp_dim, cfg.init_std
        self.w_gate_DxF = param(rngs, (d, f), ("embed", "mlp"), std)
        self.w_up_DxF = param(rngs, (d, f), ("embed", "mlp"), std)
        self.w_down_FxD = param(rngs, (f, d), ("mlp", "embed"), cfg.residual_init_std)
        self.biased = cfg.bias
        if self.biased:
            self.b_gate_F = zeros((f,), ("mlp",))
            self.b_up_F = zeros((f,), ("mlp",))
            self.b_down_D = zeros((d,), ("embed",))
        self.dtype = jnp.dtype(cfg.dtype)
        self.dense = dense_kernel(cfg.matmul)

    def __call__(self, x_BxLxD: jax.Array) -> jax.Array:
        dt = self.dtype
        gate_BxLxF = self.dense(x_BxLxD, weight(self.w_gate_DxF, dt))
        up_BxLxF = self.dense(x_BxLxD, weight(self.w_up_DxF, dt))
        if self.biased:
            gate_BxLxF = gate_BxLxF + self.b_gate_F[...].astype(dt)
            up_BxLxF = up_BxLxF + self.b_up_F[...].astype(dt)
        hidden_BxLxF = constrain(jax.nn.silu(gate_BxLxF) * up_BxLxF, ("batch", "length", "mlp"))
        out_BxLxD = self.dense(hidden_BxLxF, weight(self.w_down_FxD, dt))
        return out_BxLxD + self.b_down_D[...].astype(dt) if self.biased else out_BxLxD


class GeluMLP(nnx.Module):
    """GPT-2's MLP: out(gelu(in(x) + b_in)) + b_out, with the tanh approximation of GELU
    (the biases only if `cfg.bias`)."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        d, f, std = cfg.embed_dim, cfg.mlp_dim, cfg.init_std
        self.w_in_DxF = param(rngs, (d, f), ("embed", "mlp"), std)
        self.w_out_FxD = param(rngs, (f, d), ("mlp", "embed"), cfg.residual_init_std)
        self.biased = cfg.bias
        if self.biased:
            self.b_in_F = zeros((f,), ("mlp",))
            self.b_out_D = zeros((d,), ("embed",))
        self.dtype = jnp.dtype(cfg.dtype)
        self.dense = dense_kernel(cfg.matmul)

    def __call__(self, x_BxLxD: jax.Array) -> jax.Array:
        dt = self.dtype
        pre_BxLxF = self.dense(x_BxLxD, weight(self.w_in_DxF, dt))
        if self.biased:
            pre_BxLxF = pre_BxLxF + self.b_in_F[...].astype(dt)
        hidden_BxLxF = jax.nn.gelu(pre_BxLxF, approximate=True)
        hidden_BxLxF = constrain(hidden_BxLxF, ("batch", "length", "mlp"))
        out_BxLxD = self.dense(hidden_BxLxF, weight(self.w_out_FxD, dt))
        return out_BxLxD + self.b_out_D[...].astype(dt) if self.biased else out_BxLxD


def mlp(cfg: ModelConfig, rngs: nnx.Rngs) -> SwiGLU | GeluMLP:
    return (GeluMLP if cfg.family == "gpt2" else SwiGLU)(cfg, rngs)
