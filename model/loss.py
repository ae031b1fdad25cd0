"""Next-token cross-entropy, computed in float32 whatever the compute dtype."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def cross_entropy(logits_BxLxV: jax.Array, targets_BxL: jax.Array,
                  weights_BxL: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Mean loss over tokens with weight 1 (padding has weight 0), and that token count."""
    logits = logits_BxLxV.astype(jnp.float32)
    log_z_BxL = jax.nn.logsumexp(logits, axis=-1)
    target_logit_BxL = jnp.take_along_axis(logits, targets_BxL[..., None], axis=-1)[..., 0]
    weights = weights_BxL.astype(jnp.float32)
    count = jnp.sum(weights)
    loss = jnp.sum((log_z_BxL - target_logit_BxL) * weights) / jnp.maximum(count, 1.0)
    return loss, count
