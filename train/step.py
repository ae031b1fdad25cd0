"""One optimizer step and one evaluation step, as pure functions of (state, batch)."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

import model
from configs.schema import ModelConfig
from sharding import constrain
from train.state import TrainState

Batch = dict[str, jax.Array]
Params = dict[str, Any]


def loss_fn(params: Params, batch: Batch, cfg: ModelConfig,
            dropout_key: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """Mean next-token cross-entropy of the batch, and the number of tokens it averages."""
    transformer = model.merge(cfg, params)
    inputs = (batch["inputs"], batch["positions"], batch["segment_ids"], dropout_key)
    if cfg.loss_chunk_tokens == 0:
        return model.cross_entropy(transformer(*inputs), batch["targets"], batch["weights"])
    return model.fused_cross_entropy(transformer.hidden(*inputs), transformer.unembedding(),
                                     batch["targets"], batch["weights"], cfg.loss_chunk_tokens)


def train_step(state: TrainState, batch: Batch, *, cfg: ModelConfig,
               tx: optax.GradientTransformation, schedule: optax.Schedule,
               microbatches: int = 1, seed: int = 0) -> tuple[TrainState, dict[str, jax.Array]]:
    """theta <- theta - AdamW(grad L(theta; batch)), the gradient over `microbatches` parts.

    Dropout (if any) draws from a key of (seed, step): a resumed run drops the same units.
    """
    key = dropout_key(cfg, seed, state.step)
    if microbatches == 1:
        (loss, tokens), grads = _loss_and_grad(state.params, batch, cfg, key)
    else:
        loss, tokens, grads = _accumulated_loss_and_grad(state.params, batch, cfg, microbatches,
                                                         key)
    grads = in_parameter_layout(grads, cfg)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {"loss": loss, "tokens": tokens, "grad_norm": optax.tree.norm(grads),
               "lr": schedule(state.step)}
    return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics


_loss_and_grad = jax.value_and_grad(loss_fn, has_aux=True)


def in_parameter_layout(grads: Params, cfg: ModelConfig) -> Params:
    """The gradients split as their parameters are.

    Each weight's gradient is a sum over the batch shards. Asked for in the parameter's
    own layout, that sum is one reduce-scatter (under FSDP); left unconstrained, XLA sums
    it whole on every device (an all-reduce) and then keeps each device's slice.
    """
    return jax.tree.map(constrain, grads, model.logical_axes(cfg))


def dropout_key(cfg: ModelConfig, seed: int, step: jax.Array) -> jax.Array | None:
    """The dropout key of a step, or None when the model has no dropout."""
    if not (cfg.embed_dropout or cfg.attention_dropout or cfg.residual_dropout):
        return None
    # Its own stream: parameter init draws from `seed` itself.
    return jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), 0x64726F70), step)


def _accumulated_loss_and_grad(params: Params, batch: Batch, cfg: ModelConfig,
                               microbatches: int, key: jax.Array | None,
                               ) -> tuple[jax.Array, jax.Array, Params]:
    """The loss and gradient of the whole batch, computed one micro-batch at a time.

    Each part's mean is weighted by its token count, so the result equals the
    single-batch loss and gradient. Micro-batch m takes rows m, m + M, m + 2M, ...:
    every device holds a contiguous block of rows, so each part stays spread over
    all devices (the batch size is a multiple of M times the batch ways).
    """
    def split(x_BxL):
        rows, length = x_BxL.shape
        return x_BxL.reshape(rows // microbatches, microbatches, length).swapaxes(0, 1)

    def add_part(carry, inputs):
        loss_sum, token_sum, grad_sum = carry
        part, part_key = inputs
        part = {k: constrain(v, ("batch", "length")) for k, v in part.items()}
        (loss, tokens), grads = _loss_and_grad(params, part, cfg, part_key)
        grads = in_parameter_layout(grads, cfg)  # each part's sum over shards scattered
        grad_sum = jax.tree.map(lambda total, g: total + g * tokens, grad_sum, grads)
        return (loss_sum + loss * tokens, token_sum + tokens, grad_sum), None

    zero = jnp.zeros((), jnp.float32)
    start = (zero, zero, jax.tree.map(jnp.zeros_like, params))
    keys = None if key is None else jax.random.split(key, microbatches)
    (loss_sum, tokens, grad_sum), _ = jax.lax.scan(add_part, start,
                                                   (jax.tree.map(split, batch), keys))
    denominator = jnp.maximum(tokens, 1.0)
    return loss_sum / denominator, tokens, jax.tree.map(lambda g: g / denominator, grad_sum)


def eval_step(params: Params, batch: Batch, *, cfg: ModelConfig) -> dict[str, jax.Array]:
    """Summed loss and token count, so batches of any fill combine into an exact mean."""
    loss, tokens = loss_fn(params, batch, cfg)
    return {"loss_sum": loss * tokens, "tokens": tokens}
