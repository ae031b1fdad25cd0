"""Next-token cross-entropy, computed in float32 whatever the compute dtype.

`cross_entropy` takes logits. `fused_cross_entropy` takes the final hidden states and
the output projection instead, and never holds the B x L x V logits: it walks the
sequence in chunks (every chunk spans all rows, so it stays spread over the batch
shards) and computes each chunk's loss and its gradients together, the way fused
linear-cross-entropy kernels do. The backward pass then only scales those gradients,
so the projection's matmuls are done once each, as in the plain path, while the big
logits never leave the cache.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from sharding import constrain


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


def fused_cross_entropy(h_BxLxD: jax.Array, unembed_DxV: jax.Array, targets_BxL: jax.Array,
                        weights_BxL: jax.Array, chunk_tokens: int) -> tuple[jax.Array, jax.Array]:
    """`cross_entropy(h @ unembed, ...)` in sequence chunks of about `chunk_tokens` tokens."""
    weights = weights_BxL.astype(jnp.float32)
    count = jnp.sum(weights)
    chunk = _chunk_length(h_BxLxD.shape[0], h_BxLxD.shape[1], chunk_tokens)
    loss_sum = _loss_sum(h_BxLxD, unembed_DxV, targets_BxL, weights, chunk)
    return loss_sum / jnp.maximum(count, 1.0), count


def _chunk_length(rows: int, length: int, chunk_tokens: int) -> int:
    """The largest divisor of `length` whose chunk (rows x it) has at most chunk_tokens."""
    target = max(1, chunk_tokens // rows)
    return max(c for c in range(1, min(target, length) + 1) if length % c == 0)


def _chunked(x_BxLx_: jax.Array, chunk: int) -> jax.Array:
    """B x L x ... -> N x B x C x ... with N = L / C chunks along the sequence."""
    rows, length = x_BxLx_.shape[:2]
    x = x_BxLx_.reshape(rows, length // chunk, chunk, *x_BxLx_.shape[2:])
    return jnp.swapaxes(x, 0, 1)


def _chunk_logits(h_BxCxD: jax.Array, unembed_DxV: jax.Array) -> jax.Array:
    logits_BxCxV = jnp.einsum("bcd,dv->bcv", h_BxCxD, unembed_DxV.astype(h_BxCxD.dtype),
                              preferred_element_type=jnp.float32)
    return constrain(logits_BxCxV, ("batch", "length", "vocab"))


def _token_losses(logits_BxCxV: jax.Array, targets_BxC: jax.Array) -> tuple[jax.Array, jax.Array]:
    log_z_BxC = jax.nn.logsumexp(logits_BxCxV, axis=-1)
    target_logit_BxC = jnp.take_along_axis(logits_BxCxV, targets_BxC[..., None], axis=-1)[..., 0]
    return log_z_BxC - target_logit_BxC, log_z_BxC


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _loss_sum(h_BxLxD, unembed_DxV, targets_BxL, weights_BxL, chunk):
    """Sum over tokens of weight x loss; without gradients (evaluation)."""
    def add_chunk(total, part):
        h_BxCxD, targets_BxC, weights_BxC = part
        losses_BxC, _ = _token_losses(_chunk_logits(h_BxCxD, unembed_DxV), targets_BxC)
        return total + jnp.sum(losses_BxC * weights_BxC), None

    parts = (_chunked(h_BxLxD, chunk), _chunked(targets_BxL, chunk), _chunked(weights_BxL, chunk))
    return jax.lax.scan(add_chunk, jnp.zeros((), jnp.float32), parts)[0]


def _loss_sum_and_grads(h_BxLxD, unembed_DxV, targets_BxL, weights_BxL, chunk):
    """The loss sum and its gradients w.r.t. h and the projection, chunk by chunk.

    d loss / d logits = weight * (softmax(logits) - onehot(target)).
    """
    dt = h_BxLxD.dtype

    def add_chunk(carry, part):
        total, d_unembed_DxV = carry
        h_BxCxD, targets_BxC, weights_BxC = part
        logits_BxCxV = _chunk_logits(h_BxCxD, unembed_DxV)
        losses_BxC, log_z_BxC = _token_losses(logits_BxCxV, targets_BxC)
        probs_BxCxV = jnp.exp(logits_BxCxV - log_z_BxC[..., None])
        vocab_V = jnp.arange(logits_BxCxV.shape[-1])
        onehot_BxCxV = vocab_V == targets_BxC[..., None]
        d_logits_BxCxV = ((probs_BxCxV - onehot_BxCxV) * weights_BxC[..., None]).astype(dt)
        d_h_BxCxD = jnp.einsum("bcv,dv->bcd", d_logits_BxCxV, unembed_DxV.astype(dt))
        d_unembed_DxV = d_unembed_DxV + jnp.einsum(
            "bcd,bcv->dv", h_BxCxD, d_logits_BxCxV, preferred_element_type=jnp.float32)
        return (total + jnp.sum(losses_BxC * weights_BxC), d_unembed_DxV), d_h_BxCxD

    parts = (_chunked(h_BxLxD, chunk), _chunked(targets_BxL, chunk), _chunked(weights_BxL, chunk))
    start = (jnp.zeros((), jnp.float32), jnp.zeros(unembed_DxV.shape, jnp.float32))
    (total, d_unembed_DxV), d_h_NxBxCxD = jax.lax.scan(add_chunk, start, parts)
    d_h_BxLxD = jnp.swapaxes(d_h_NxBxCxD, 0, 1).reshape(h_BxLxD.shape)
    return total, (d_h_BxLxD, d_unembed_DxV.astype(unembed_DxV.dtype))


def _loss_sum_backward(chunk, grads, cotangent):
    d_h_BxLxD, d_unembed_DxV = grads
    return (d_h_BxLxD * cotangent.astype(d_h_BxLxD.dtype), d_unembed_DxV * cotangent, None, None)


# The forward pass already has the gradients: they are the residuals.
_loss_sum.defvjp(_loss_sum_and_grads, _loss_sum_backward)
