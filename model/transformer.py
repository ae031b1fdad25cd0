"""The decoder-only transformer: token ids in, next-token logits out."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from configs.schema import ModelConfig
from model.layers import Attention, RMSNorm, SwiGLU, param
from sharding import constrain

ACTIVATION_AXES = ("batch", "length", "embed")


def attention_mask(shape_BxL: tuple[int, int], segment_ids_BxL: jax.Array | None) -> jax.Array:
    """Causal mask, restricted to same-document pairs when segment ids are given."""
    length = shape_BxL[1]
    causal_1xLxL = jnp.tril(jnp.ones((length, length), dtype=bool))[None]
    if segment_ids_BxL is None:
        return jnp.broadcast_to(causal_1xLxL, (shape_BxL[0], length, length))
    same_doc_BxLxL = segment_ids_BxL[:, :, None] == segment_ids_BxL[:, None, :]
    return causal_1xLxL & same_doc_BxLxL


class Block(nnx.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.attn_norm = RMSNorm(cfg.embed_dim, cfg.norm_eps)
        self.attn = Attention(cfg, rngs)
        self.mlp_norm = RMSNorm(cfg.embed_dim, cfg.norm_eps)
        self.mlp = SwiGLU(cfg, rngs)

    def __call__(self, x_BxLxD: jax.Array, positions_BxL: jax.Array,
                 mask_BxLxL: jax.Array) -> jax.Array:
        x_BxLxD = x_BxLxD + self.attn(self.attn_norm(x_BxLxD), positions_BxL, mask_BxLxL)
        x_BxLxD = constrain(x_BxLxD, ACTIVATION_AXES)
        x_BxLxD = x_BxLxD + self.mlp(self.mlp_norm(x_BxLxD))
        return constrain(x_BxLxD, ACTIVATION_AXES)


class Transformer(nnx.Module):
    """Llama-shape decoder with untied input and output embeddings."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.embed_VxD = param(rngs, (cfg.vocab_size, cfg.embed_dim), ("vocab", "embed"), 1.0)
        self.blocks = nnx.List([Block(cfg, rngs) for _ in range(cfg.num_layers)])
        self.final_norm = RMSNorm(cfg.embed_dim, cfg.norm_eps)
        # A small output projection makes the initial loss close to log(vocab_size).
        self.unembed_DxV = param(rngs, (cfg.embed_dim, cfg.vocab_size), ("embed", "vocab"),
                                 cfg.init_std)
        self.dtype = jnp.dtype(cfg.dtype)

    def __call__(self, tokens_BxL: jax.Array, positions_BxL: jax.Array | None = None,
                 segment_ids_BxL: jax.Array | None = None) -> jax.Array:
        """Logits for the next token at every position.

        With `segment_ids_BxL` (packed rows), a position attends only to earlier
        positions of its own document; without, to all earlier positions.
        """
        if positions_BxL is None:
            positions_BxL = jnp.broadcast_to(jnp.arange(tokens_BxL.shape[1]), tokens_BxL.shape)
        mask_BxLxL = attention_mask(tokens_BxL.shape, segment_ids_BxL)
        x_BxLxD = self.embed_VxD[...].astype(self.dtype)[tokens_BxL]
        x_BxLxD = constrain(x_BxLxD, ACTIVATION_AXES)
        for block in self.blocks:
            x_BxLxD = block(x_BxLxD, positions_BxL, mask_BxLxL)
        x_BxLxD = self.final_norm(x_BxLxD)
        logits_BxLxV = jnp.einsum("bld,dv->blv", x_BxLxD, self.unembed_DxV[...].astype(self.dtype))
        return constrain(logits_BxLxV, ("batch", "length", "vocab"))
