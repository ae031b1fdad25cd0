"""Building blocks of the Llama-shape decoder: RMSNorm, rotary embedding, GQA attention, SwiGLU.

Every parameter carries `logical_axes` metadata; activations are constrained by
logical names through `sharding.constrain`. Shape suffixes: B batch, L length,
D embed, H query heads, G kv heads, R queries per kv head, K head dim, F mlp.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from configs.schema import ModelConfig
from sharding import constrain

LogicalAxes = tuple[str | None, ...]


def param(rngs: nnx.Rngs, shape: tuple[int, ...], axes: LogicalAxes, std: float) -> nnx.Param:
    """A normally initialised float32 weight tagged with its logical axes."""
    value = std * jax.random.normal(rngs.params(), shape, jnp.float32)
    return nnx.Param(value, logical_axes=axes)


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, eps: float):
        self.scale = nnx.Param(jnp.ones((dim,), jnp.float32), logical_axes=("norm",))
        self.eps = eps

    def __call__(self, x_BxLxD: jax.Array) -> jax.Array:
        x32 = x_BxLxD.astype(jnp.float32)
        inv_rms = jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (x32 * inv_rms * self.scale[...]).astype(x_BxLxD.dtype)


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
    """Causal grouped-query self-attention with rotary positions."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        d, h, g, k = cfg.embed_dim, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        std = cfg.init_std
        self.wq_DxHxK = param(rngs, (d, h, k), ("embed", "heads", "head_dim"), std)
        self.wk_DxGxK = param(rngs, (d, g, k), ("embed", "kv_heads", "head_dim"), std)
        self.wv_DxGxK = param(rngs, (d, g, k), ("embed", "kv_heads", "head_dim"), std)
        # Output projections start smaller so the residual stream stays O(1) at init.
        out_std = std / (2 * cfg.num_layers) ** 0.5
        self.wo_HxKxD = param(rngs, (h, k, d), ("heads", "head_dim", "embed"), out_std)
        self.theta = cfg.rope_theta
        self.dtype = jnp.dtype(cfg.dtype)

    def __call__(self, x_BxLxD: jax.Array, positions_BxL: jax.Array,
                 mask_BxLxL: jax.Array) -> jax.Array:
        """`mask_BxLxL[b, i, j]`: may position i attend to position j."""
        dt = self.dtype
        q_BxLxHxK = jnp.einsum("bld,dhk->blhk", x_BxLxD, self.wq_DxHxK[...].astype(dt))
        k_BxLxGxK = jnp.einsum("bld,dgk->blgk", x_BxLxD, self.wk_DxGxK[...].astype(dt))
        v_BxLxGxK = jnp.einsum("bld,dgk->blgk", x_BxLxD, self.wv_DxGxK[...].astype(dt))
        q_BxLxHxK = constrain(q_BxLxHxK, ("batch", "length", "heads", "head_dim"))
        k_BxLxGxK = constrain(k_BxLxGxK, ("batch", "length", "kv_heads", "head_dim"))
        q_BxLxHxK = rotary(q_BxLxHxK, positions_BxL, self.theta)
        k_BxLxGxK = rotary(k_BxLxGxK, positions_BxL, self.theta)

        batch, length, heads, head_dim = q_BxLxHxK.shape
        groups = k_BxLxGxK.shape[2]
        q_BxLxGxRxK = q_BxLxHxK.reshape(batch, length, groups, heads // groups, head_dim)
        scores_BxGxRxLxL = jnp.einsum(
            "blgrk,bmgk->bgrlm", q_BxLxGxRxK, k_BxLxGxK).astype(jnp.float32) * head_dim ** -0.5
        mask_Bx1x1xLxL = mask_BxLxL[:, None, None]
        scores_BxGxRxLxL = jnp.where(mask_Bx1x1xLxL, scores_BxGxRxLxL, jnp.finfo(jnp.float32).min)
        probs_BxGxRxLxL = jax.nn.softmax(scores_BxGxRxLxL, axis=-1).astype(dt)
        out_BxLxGxRxK = jnp.einsum("bgrlm,bmgk->blgrk", probs_BxGxRxLxL, v_BxLxGxK)
        out_BxLxHxK = constrain(out_BxLxGxRxK.reshape(batch, length, heads, head_dim),
                                ("batch", "length", "heads", "head_dim"))
        return jnp.einsum("blhk,hkd->bld", out_BxLxHxK, self.wo_HxKxD[...].astype(dt))


class SwiGLU(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        d, f, std = cfg.embed_dim, cfg.mlp_dim, cfg.init_std
        self.w_gate_DxF = param(rngs, (d, f), ("embed", "mlp"), std)
        self.w_up_DxF = param(rngs, (d, f), ("embed", "mlp"), std)
        self.w_down_FxD = param(rngs, (f, d), ("mlp", "embed"), std / (2 * cfg.num_layers) ** 0.5)
        self.dtype = jnp.dtype(cfg.dtype)

    def __call__(self, x_BxLxD: jax.Array) -> jax.Array:
        dt = self.dtype
        gate_BxLxF = jnp.einsum("bld,df->blf", x_BxLxD, self.w_gate_DxF[...].astype(dt))
        up_BxLxF = jnp.einsum("bld,df->blf", x_BxLxD, self.w_up_DxF[...].astype(dt))
        hidden_BxLxF = constrain(jax.nn.silu(gate_BxLxF) * up_BxLxF, ("batch", "length", "mlp"))
        return jnp.einsum("blf,fd->bld", hidden_BxLxF, self.w_down_FxD[...].astype(dt))
