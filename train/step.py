"""One optimizer step and one evaluation step, as pure functions of (state, batch)."""

from __future__ import annotations

from typing import Any

import jax
import optax

import model
from configs.schema import ModelConfig
from train.state import TrainState

Batch = dict[str, jax.Array]


def loss_fn(params: dict[str, Any], batch: Batch, cfg: ModelConfig) -> tuple[jax.Array, jax.Array]:
    """Mean next-token cross-entropy of the batch, and the number of tokens it averages."""
    logits_BxLxV = model.merge(cfg, params)(batch["inputs"], batch["positions"],
                                            batch["segment_ids"])
    return model.cross_entropy(logits_BxLxV, batch["targets"], batch["weights"])


def train_step(state: TrainState, batch: Batch, *, cfg: ModelConfig,
               tx: optax.GradientTransformation,
               schedule: optax.Schedule) -> tuple[TrainState, dict[str, jax.Array]]:
    """theta <- theta - AdamW(grad L(theta; batch))."""
    (loss, tokens), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, batch, cfg)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {"loss": loss, "tokens": tokens, "grad_norm": optax.tree.norm(grads),
               "lr": schedule(state.step)}
    return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics


def eval_step(params: dict[str, Any], batch: Batch, *, cfg: ModelConfig) -> dict[str, jax.Array]:
    """Summed loss and token count, so batches of any fill combine into an exact mean."""
    loss, tokens = loss_fn(params, batch, cfg)
    return {"loss_sum": loss * tokens, "tokens": tokens}
