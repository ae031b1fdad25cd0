"""The decoder-only transformer: token ids in, next-token logits out."""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from configs import check_resolved, derive_model
from configs.schema import ModelConfig
from model.layers import Attention, dropout, mlp, norm, param, weight
from sharding import constrain

ACTIVATION_AXES = ("batch", "length", "embed")

# What a block keeps for the backward pass; the rest is recomputed (`model.remat`).
REMAT_POLICIES: dict[str, Callable | None] = {
    "full": None,  # keep only the block's inputs
    "save_dots": jax.checkpoint_policies.checkpoint_dots,
}


class Block(nnx.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.attn_norm = norm(cfg)
        self.attn = Attention(cfg, rngs)
        self.mlp_norm = norm(cfg)
        self.mlp = mlp(cfg, rngs)
        self.residual_dropout = cfg.residual_dropout

    def __call__(self, x_BxLxD: jax.Array, positions_BxL: jax.Array,
                 segment_ids_BxL: jax.Array | None,
                 dropout_key: jax.Array | None = None) -> jax.Array:
        """With `dropout_key` (training), the block's dropout is drawn from it."""
        keys = [None] * 3 if dropout_key is None else list(jax.random.split(dropout_key, 3))
        attended_BxLxD = self.attn(self.attn_norm(x_BxLxD), positions_BxL, segment_ids_BxL,
                                   keys[0])
        x_BxLxD = x_BxLxD + dropout(attended_BxLxD, self.residual_dropout, keys[1])
        x_BxLxD = constrain(x_BxLxD, ACTIVATION_AXES)
        x_BxLxD = x_BxLxD + dropout(self.mlp(self.mlp_norm(x_BxLxD)), self.residual_dropout,
                                    keys[2])
        return constrain(x_BxLxD, ACTIVATION_AXES)

    def decode(self, x_BxTxD: jax.Array, positions_BxT: jax.Array, k_BxSxGxK: jax.Array,
               v_BxSxGxK: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """The block on T new tokens per row, reading and extending this layer's KV cache."""
        attended_BxTxD, k_BxSxGxK, v_BxSxGxK = self.attn.decode(
            self.attn_norm(x_BxTxD), positions_BxT, k_BxSxGxK, v_BxSxGxK)
        x_BxTxD = x_BxTxD + attended_BxTxD
        return x_BxTxD + self.mlp(self.mlp_norm(x_BxTxD)), k_BxSxGxK, v_BxSxGxK


def _stacked_blocks(cfg: ModelConfig, rngs: nnx.Rngs) -> Block:
    """One Block whose every parameter has a leading `layers` axis of num_layers."""
    @nnx.split_rngs(splits=cfg.num_layers)
    @nnx.vmap(in_axes=0, out_axes=0)
    def make(rngs: nnx.Rngs) -> Block:
        return Block(cfg, rngs)

    blocks = make(rngs)
    for _, variable in nnx.iter_graph(blocks):
        if isinstance(variable, nnx.Param):
            variable.set_metadata(logical_axes=("layers", *variable.get_metadata()["logical_axes"]))
    return blocks


class Transformer(nnx.Module):
    """Decoder of either family (`cfg.family`): llama or gpt2.

    `cfg` names its kernels: its `auto` settings are resolved by the caller, from the
    devices the model will run on (`configs.resolve_auto`), never from the host.
    """

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        cfg = derive_model(check_resolved(cfg))
        d = cfg.embed_dim
        self.embed_VxD = param(rngs, (cfg.vocab_size, d), ("vocab", "embed"), cfg.embed_init_std)
        self.learned_positions = cfg.family == "gpt2"
        if self.learned_positions:
            self.positions_PxD = param(rngs, (cfg.max_positions, d), ("positions", "embed"),
                                       cfg.position_init_std)
        self.scan = cfg.scan_layers
        if self.scan:
            self.blocks = _stacked_blocks(cfg, rngs)
        else:
            self.blocks = nnx.List([Block(cfg, rngs) for _ in range(cfg.num_layers)])
        self.final_norm = norm(cfg)
        self.tied = cfg.tie_embeddings
        if not self.tied:
            self.unembed_DxV = param(rngs, (d, cfg.vocab_size), ("embed", "vocab"),
                                     cfg.unembed_init_std)
        self.dtype = jnp.dtype(cfg.dtype)
        self.remat = cfg.remat
        self.num_layers = cfg.num_layers
        self.embed_dropout = cfg.embed_dropout

    def __call__(self, tokens_BxL: jax.Array, positions_BxL: jax.Array | None = None,
                 segment_ids_BxL: jax.Array | None = None,
                 dropout_key: jax.Array | None = None) -> jax.Array:
        """Float32 logits for the next token at every position.

        With `segment_ids_BxL` (packed rows), a position attends only to earlier
        positions of its own document; without, to all earlier positions. With
        `dropout_key` (training), dropout is applied at the configured rates.
        """
        return self.logits(self.hidden(tokens_BxL, positions_BxL, segment_ids_BxL, dropout_key))

    def hidden(self, tokens_BxL: jax.Array, positions_BxL: jax.Array | None = None,
               segment_ids_BxL: jax.Array | None = None,
               dropout_key: jax.Array | None = None) -> jax.Array:
        """The final normalised hidden states, which the unembedding turns into logits."""
        if positions_BxL is None:
            positions_BxL = jnp.broadcast_to(jnp.arange(tokens_BxL.shape[1]), tokens_BxL.shape)
        embed_key = layer_keys = None
        if dropout_key is not None:
            embed_key, blocks_key = jax.random.split(dropout_key)
            layer_keys = jax.random.split(blocks_key, self.num_layers)
        x_BxLxD = dropout(self._embed(tokens_BxL, positions_BxL), self.embed_dropout, embed_key)
        x_BxLxD = self._blocks(x_BxLxD, positions_BxL, segment_ids_BxL, layer_keys)
        return self.final_norm(x_BxLxD)

    def logits(self, x_BxLxD: jax.Array) -> jax.Array:
        logits_BxLxV = jnp.einsum("bld,dv->blv", x_BxLxD, self.unembedding().astype(self.dtype),
                                  preferred_element_type=jnp.float32)
        return constrain(logits_BxLxV, ("batch", "length", "vocab"))

    def unembedding(self) -> jax.Array:
        """The output projection D x V (the embedding table, transposed, when tied)."""
        return self.embed_VxD[...].T if self.tied else self.unembed_DxV[...]

    def init_cache(self, rows: int, slots: int) -> dict[str, jax.Array]:
        """An empty KV cache: keys and values of `slots` positions for every layer."""
        attn = (self.blocks if self.scan else self.blocks[0]).attn
        groups, head_dim = attn.wk_DxGxK.shape[-2:]
        shape = (self.num_layers, rows, slots, groups, head_dim)
        return {"k": jnp.zeros(shape, self.dtype), "v": jnp.zeros(shape, self.dtype)}

    def decode(self, tokens_BxT: jax.Array, positions_BxT: jax.Array,
               cache: dict[str, jax.Array]) -> tuple[jax.Array, dict[str, jax.Array]]:
        """Logits of T new tokens per row (a prompt, or one sampled token), attending to
        everything before them through the KV cache, and the extended cache."""
        x_BxTxD = self._embed(tokens_BxT, positions_BxT)
        if self.scan:
            graphdef, stacked_state = nnx.split(self.blocks)

            def layer(x_BxTxD, layer_inputs):
                block_state, k_BxSxGxK, v_BxSxGxK = layer_inputs
                x_BxTxD, k_BxSxGxK, v_BxSxGxK = nnx.merge(graphdef, block_state).decode(
                    x_BxTxD, positions_BxT, k_BxSxGxK, v_BxSxGxK)
                return x_BxTxD, (k_BxSxGxK, v_BxSxGxK)

            x_BxTxD, (keys, values) = jax.lax.scan(
                layer, x_BxTxD, (stacked_state, cache["k"], cache["v"]))
        else:
            keys, values = [], []
            for block, k_BxSxGxK, v_BxSxGxK in zip(self.blocks, cache["k"], cache["v"],
                                                   strict=True):
                x_BxTxD, k_BxSxGxK, v_BxSxGxK = block.decode(x_BxTxD, positions_BxT,
                                                            k_BxSxGxK, v_BxSxGxK)
                keys.append(k_BxSxGxK)
                values.append(v_BxSxGxK)
            keys, values = jnp.stack(keys), jnp.stack(values)
        return self.logits(self.final_norm(x_BxTxD)), {"k": keys, "v": values}

    def _embed(self, tokens_BxL: jax.Array, positions_BxL: jax.Array) -> jax.Array:
        # The tables are gathered whole along embed first, as every weight is (`weight`):
        # a lookup from an embed-sharded table cannot produce batch-sharded rows cheaply.
        x_BxLxD = weight(self.embed_VxD, self.dtype)[tokens_BxL]
        if self.learned_positions:
            x_BxLxD = x_BxLxD + weight(self.positions_PxD, self.dtype)[positions_BxL]
        return constrain(x_BxLxD, ACTIVATION_AXES)

    def _blocks(self, x_BxLxD: jax.Array, positions_BxL: jax.Array,
                segment_ids_BxL: jax.Array | None, layer_keys: jax.Array | None) -> jax.Array:
        """Every block in order: a Python loop, or one `lax.scan` over stacked weights.
        `layer_keys` holds each block's dropout key (None: no dropout)."""
        def apply(graphdef, block_state, x_BxLxD, key):
            return nnx.merge(graphdef, block_state)(x_BxLxD, positions_BxL, segment_ids_BxL, key)

        if self.remat != "none":
            apply = jax.checkpoint(apply, policy=REMAT_POLICIES[self.remat], static_argnums=0)
        if not self.scan:
            for i, block in enumerate(self.blocks):
                key = None if layer_keys is None else layer_keys[i]
                x_BxLxD = apply(*nnx.split(block), x_BxLxD, key)
            return x_BxLxD
        graphdef, stacked_state = nnx.split(self.blocks)

        def layer(x_BxLxD, inputs):
            block_state, key = inputs
            return apply(graphdef, block_state, x_BxLxD, key), None

        return jax.lax.scan(layer, x_BxLxD, (stacked_state, layer_keys))[0]
