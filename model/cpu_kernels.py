"""Kernels tuned for XLA:CPU: `model.matmul=cpu` and `model.attention=cpu`.

Each computes what the plain einsums of `model.layers` and `model.attention` compute,
with a backward pass written so that XLA:CPU runs it fast: 2-D matmuls instead of
batched ones, and transposed operands laid out before the matmuls that read them.
`configs.resolve_auto` chooses them for CPU hosts only, so nothing here asks which
backend it runs on.

Shapes: B batch, L length, H query heads, G kv heads, R = H / G, K head dim,
N = R x L stacked queries, M key positions, T tokens, I / O matmul inner / outer.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp


def dense(x: jax.Array, w: jax.Array, contract: int = 1) -> jax.Array:
    """Contract the last `contract` dims of x with the first ones of w, as one 2-D matmul.

    Same result as the tensordot, but XLA:CPU runs a 2-D matmul and its gradients
    without the transposes it inserts for batched (B x L x ...) operands.
    """
    lead, inner = x.shape[:x.ndim - contract], w.shape[:contract]
    y = _matmul(x.reshape(-1, math.prod(inner)), w.reshape(math.prod(inner), -1))
    return y.reshape(*lead, *w.shape[contract:])


@jax.custom_vjp
def _matmul(x_TxI: jax.Array, w_IxO: jax.Array) -> jax.Array:
    """x @ w, whose weight gradient x^T dy takes x^T laid out first (`transposed_copy`)."""
    return x_TxI @ w_IxO


def _matmul_forward(x_TxI, w_IxO):
    return x_TxI @ w_IxO, (x_TxI, w_IxO)


def _matmul_backward(residuals, d_y_TxO):
    x_TxI, w_IxO = residuals
    return d_y_TxO @ w_IxO.T, transposed_copy(x_TxI) @ d_y_TxO


_matmul.defvjp(_matmul_forward, _matmul_backward)


def attention(q_BxLxHxK: jax.Array, k_BxLxGxK: jax.Array, v_BxLxGxK: jax.Array,
              mask_BxLxL: jax.Array, keep_BxGxRxLxL: jax.Array | None = None) -> jax.Array:
    """softmax(q k^T / sqrt(K), masked) v, B x L x H x K, with a hand-written backward.

    Heads first; query heads sharing a kv head are stacked along the query axis
    (N = R x L), so every matmul is a plain (B, G)-batched 2-D product. `keep` is
    dropout's 0 or 1 / (1 - rate) per probability; None keeps all.
    """
    batch, length, heads, head_dim = q_BxLxHxK.shape
    groups = k_BxLxGxK.shape[2]
    per_group = heads // groups
    q_BxGxNxK = (q_BxLxHxK.reshape(batch, length, groups, per_group, head_dim)
                 .transpose(0, 2, 3, 1, 4).reshape(batch, groups, per_group * length, head_dim))
    k_BxGxLxK = k_BxLxGxK.transpose(0, 2, 1, 3)
    v_BxGxLxK = v_BxLxGxK.transpose(0, 2, 1, 3)
    mask_Bx1xNxL = jnp.tile(mask_BxLxL, (1, per_group, 1))[:, None]
    keep_BxGxNxL = None
    if keep_BxGxRxLxL is not None:
        keep_BxGxNxL = keep_BxGxRxLxL.reshape(batch, groups, per_group * length, length)
    out_BxGxNxK = _softmax_attention(q_BxGxNxK, k_BxGxLxK, v_BxGxLxK, mask_Bx1xNxL,
                                     keep_BxGxNxL)
    return (out_BxGxNxK.reshape(batch, groups, per_group, length, head_dim)
            .transpose(0, 3, 1, 2, 4).reshape(batch, length, heads, head_dim))


@jax.custom_vjp
def _softmax_attention(q_BxGxNxK, k_BxGxMxK, v_BxGxMxK, mask_Bx1xNxM, keep_BxGxNxM=None):
    """(softmax(q k^T / sqrt(K), masked) * keep) v, with a hand-written backward pass:
    XLA:CPU runs these explicit matmuls several times faster than the autodiff of the
    same forward."""
    return _softmax_attention_forward(q_BxGxNxK, k_BxGxMxK, v_BxGxMxK, mask_Bx1xNxM,
                                      keep_BxGxNxM)[0]


def _softmax_attention_forward(q_BxGxNxK, k_BxGxMxK, v_BxGxMxK, mask_Bx1xNxM,
                               keep_BxGxNxM=None):
    scale = q_BxGxNxK.shape[-1] ** -0.5
    scores_BxGxNxM = jnp.einsum("bgnk,bgmk->bgnm", q_BxGxNxK, k_BxGxMxK,
                                preferred_element_type=jnp.float32) * scale
    scores_BxGxNxM = jnp.where(mask_Bx1xNxM, scores_BxGxNxM, jnp.finfo(jnp.float32).min)
    probs_BxGxNxM = jax.nn.softmax(scores_BxGxNxM, axis=-1)
    kept_BxGxNxM = probs_BxGxNxM if keep_BxGxNxM is None else probs_BxGxNxM * keep_BxGxNxM
    out_BxGxNxK = jnp.einsum("bgnm,bgmk->bgnk", kept_BxGxNxM.astype(v_BxGxMxK.dtype), v_BxGxMxK)
    return out_BxGxNxK, (q_BxGxNxK, k_BxGxMxK, v_BxGxMxK, probs_BxGxNxM, out_BxGxNxK,
                         keep_BxGxNxM)


def _softmax_attention_backward(residuals, d_out_BxGxNxK):
    """With P = softmax(S) and D the dropout keep factors: dV = (P D)^T dO,
    dP = (dO V^T) D, dS = P (dP - rowsum(dO * O)), dQ = dS K / sqrt(K), dK = dS^T Q / sqrt(K)
    (rowsum(P dP) = rowsum(dO * O), dropout or not)."""
    q_BxGxNxK, k_BxGxMxK, v_BxGxMxK, probs_BxGxNxM, out_BxGxNxK, keep_BxGxNxM = residuals
    dt = q_BxGxNxK.dtype
    kept_BxGxNxM = probs_BxGxNxM if keep_BxGxNxM is None else probs_BxGxNxM * keep_BxGxNxM
    d_v_BxGxMxK = jnp.einsum("bgmn,bgnk->bgmk", transposed_copy(kept_BxGxNxM.astype(dt)),
                             d_out_BxGxNxK)
    d_probs_BxGxNxM = jnp.einsum("bgnk,bgmk->bgnm", d_out_BxGxNxK, v_BxGxMxK,
                                 preferred_element_type=jnp.float32)
    if keep_BxGxNxM is not None:
        d_probs_BxGxNxM = d_probs_BxGxNxM * keep_BxGxNxM
    row_BxGxNx1 = jnp.sum(d_out_BxGxNxK.astype(jnp.float32) * out_BxGxNxK.astype(jnp.float32),
                          axis=-1, keepdims=True)
    scale = q_BxGxNxK.shape[-1] ** -0.5
    d_scores_BxGxNxM = (probs_BxGxNxM * (d_probs_BxGxNxM - row_BxGxNx1) * scale).astype(dt)
    d_q_BxGxNxK = jnp.einsum("bgnm,bgmk->bgnk", d_scores_BxGxNxM, k_BxGxMxK)
    d_k_BxGxMxK = jnp.einsum("bgmn,bgnk->bgmk", transposed_copy(d_scores_BxGxNxM), q_BxGxNxK)
    return d_q_BxGxNxK, d_k_BxGxMxK, d_v_BxGxMxK, None, None


_softmax_attention.defvjp(_softmax_attention_forward, _softmax_attention_backward)


def transposed_copy(x: jax.Array) -> jax.Array:
    """x with its last two axes swapped, and laid out that way.

    XLA:CPU runs a product over the leading axes of both operands (a weight gradient
    x^T dy, attention's P^T dO) markedly slower than with the transposed operand laid
    out first, and its simplifier folds a plain swap back into the dot: the barrier
    keeps the copy. Other backends handle transposed operands natively and should not
    get these kernels, whose barrier would only stop their fusions.
    """
    return jax.lax.optimization_barrier(jnp.swapaxes(x, -1, -2))
