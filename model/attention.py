"""Causal self-attention with document (segment) masking, by one of three kernels.

All three compute softmax(q k^T / sqrt(K) + mask) v where position i may attend
to position j iff j <= i and both lie in the same document:
- `xla`: plain einsums over an explicit LxL mask; runs everywhere.
- `cudnn`: `jax.nn.dot_product_attention`'s cuDNN flash kernel (NVIDIA GPUs).
- `splash`: the Pallas splash kernel (TPU). Pallas kernels are not partitioned by
  XLA, so it runs under `shard_map` over the batch and head axes of the active
  mesh; off TPU it runs in the (slow) Pallas interpreter, for tests.

Shapes: B batch, L length, H query heads, G kv heads, R = H / G, K head dim.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from sharding import active_mesh, constrain, logical_to_spec


def attend(q_BxLxHxK: jax.Array, k_BxLxGxK: jax.Array, v_BxLxGxK: jax.Array,
           segment_ids_BxL: jax.Array | None, impl: str,
           dropout: tuple[float, jax.Array] | None = None) -> jax.Array:
    """Attention output, B x L x H x K, by the kernel `impl` (`xla`, `cudnn` or `splash`).

    `dropout` (rate, key) drops attention probabilities; only the `xla` kernel has it.
    """
    if impl == "xla":
        return _xla(q_BxLxHxK, k_BxLxGxK, v_BxLxGxK, segment_ids_BxL, dropout)
    if dropout is not None:
        raise ValueError(f"attention dropout needs the xla kernel, not {impl!r}")
    if impl == "cudnn":
        return dot_product_attention(q_BxLxHxK, k_BxLxGxK, v_BxLxGxK, segment_ids_BxL, "cudnn")
    if impl == "splash":
        return _splash(q_BxLxHxK, k_BxLxGxK, v_BxLxGxK, segment_ids_BxL)
    raise ValueError(f"unknown attention implementation {impl!r}; expected xla, cudnn or splash")


def attention_mask(shape_BxL: tuple[int, int], segment_ids_BxL: jax.Array | None) -> jax.Array:
    """mask_BxLxL[b, i, j]: may position i attend to position j (causal, same document)."""
    length = shape_BxL[1]
    causal_1xLxL = jnp.tril(jnp.ones((length, length), dtype=bool))[None]
    if segment_ids_BxL is None:
        return jnp.broadcast_to(causal_1xLxL, (shape_BxL[0], length, length))
    same_doc_BxLxL = segment_ids_BxL[:, :, None] == segment_ids_BxL[:, None, :]
    return causal_1xLxL & same_doc_BxLxL


def _xla(q_BxLxHxK, k_BxLxGxK, v_BxLxGxK, segment_ids_BxL, dropout=None):
    """Heads-first batched matmuls; query heads sharing a kv head are stacked along the
    query axis (N = R x L), so every matmul is a plain (B, G)-batched 2-D product."""
    batch, length, heads, head_dim = q_BxLxHxK.shape
    groups = k_BxLxGxK.shape[2]
    per_group = heads // groups
    q_BxGxNxK = (q_BxLxHxK.reshape(batch, length, groups, per_group, head_dim)
                 .transpose(0, 2, 3, 1, 4).reshape(batch, groups, per_group * length, head_dim))
    k_BxGxLxK = k_BxLxGxK.transpose(0, 2, 1, 3)
    v_BxGxLxK = v_BxLxGxK.transpose(0, 2, 1, 3)
    mask_BxLxL = attention_mask((batch, length), segment_ids_BxL)
    mask_Bx1xNxL = jnp.tile(mask_BxLxL, (1, per_group, 1))[:, None]
    keep_BxGxNxL = None
    if dropout is not None:
        rate, key = dropout
        keep = jax.random.bernoulli(key, 1.0 - rate, (batch, groups, per_group * length, length))
        keep_BxGxNxL = keep.astype(jnp.float32) / (1.0 - rate)
    out_BxGxNxK = _softmax_attention(q_BxGxNxK, k_BxGxLxK, v_BxGxLxK, mask_Bx1xNxL,
                                     keep_BxGxNxL)
    return (out_BxGxNxK.reshape(batch, groups, per_group, length, head_dim)
            .transpose(0, 3, 1, 2, 4).reshape(batch, length, heads, head_dim))


@jax.custom_vjp
def _softmax_attention(q_BxGxNxK, k_BxGxMxK, v_BxGxMxK, mask_Bx1xNxM, keep_BxGxNxM=None):
    """(softmax(q k^T / sqrt(K), masked) * keep) v, with a hand-written backward pass:
    XLA:CPU runs these explicit matmuls about 3x faster than the autodiff of the same
    forward. `keep` is dropout's 0 or 1 / (1 - rate) per probability; None keeps all."""
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


def transposed_copy(x: jax.Array) -> jax.Array:
    """x with its last two axes swapped, laid out that way on CPU.

    XLA:CPU runs a product over the leading axes of both operands (a weight gradient
    x^T dy, attention's P^T dO) up to 2x slower than with the transposed operand laid
    out first, and its simplifier folds a plain swap back into the dot: the barrier
    keeps the copy. Other backends handle transposed operands natively.
    """
    swapped = jnp.swapaxes(x, -1, -2)
    return jax.lax.optimization_barrier(swapped) if jax.default_backend() == "cpu" else swapped


_softmax_attention.defvjp(_softmax_attention_forward, _softmax_attention_backward)


def dot_product_attention(q_BxLxHxK: jax.Array, k_BxLxGxK: jax.Array, v_BxLxGxK: jax.Array,
                          segment_ids_BxL: jax.Array | None, implementation: str) -> jax.Array:
    """`jax.nn.dot_product_attention` (`cudnn`, or its `xla` reference for tests on CPU).

    The causal part is the kernel's own mask type (cuDNN skips the upper triangle);
    documents are an extra boolean mask.
    """
    mask_Bx1xLxL = None
    if segment_ids_BxL is not None:
        mask_Bx1xLxL = (segment_ids_BxL[:, :, None] == segment_ids_BxL[:, None, :])[:, None]
    return jax.nn.dot_product_attention(q_BxLxHxK, k_BxLxGxK, v_BxLxGxK, mask=mask_Bx1xLxL,
                                        is_causal=True, implementation=implementation)


def _splash(q_BxLxHxK, k_BxLxGxK, v_BxLxGxK, segment_ids_BxL):
    batch, length = q_BxLxHxK.shape[:2]
    if segment_ids_BxL is None:
        segment_ids_BxL = jnp.zeros((batch, length), jnp.int32)
    interpret = jax.default_backend() != "tpu"
    active = active_mesh()
    if active is None:
        return _splash_local(q_BxLxHxK, k_BxLxGxK, v_BxLxGxK, segment_ids_BxL, interpret)
    mesh, rules = active
    heads = logical_to_spec(("batch", "length", "heads", "head_dim"), rules)
    kv_heads = logical_to_spec(("batch", "length", "kv_heads", "head_dim"), rules)
    rows = logical_to_spec(("batch", "length"), rules)
    local = jax.shard_map(functools.partial(_splash_local, interpret=interpret), mesh=mesh,
                          in_specs=(heads, kv_heads, kv_heads, rows), out_specs=heads,
                          check_vma=False)
    return local(q_BxLxHxK, k_BxLxGxK, v_BxLxGxK, segment_ids_BxL)


def _splash_local(q_BxLxHxK, k_BxLxGxK, v_BxLxGxK, segment_ids_BxL, interpret):
    """The splash kernel on this device's rows and heads; the kernel wants heads first."""
    # Imported here: Pallas is only needed by runs that ask for this kernel.
    from jax.experimental.pallas.ops.tpu.splash_attention import (
        splash_attention_kernel as splash,
    )
    from jax.experimental.pallas.ops.tpu.splash_attention import (
        splash_attention_mask as splash_mask,
    )
    length, heads, head_dim = q_BxLxHxK.shape[1:]
    block = next((b for b in (512, 256, 128) if length % b == 0), length)
    sizes = splash.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block,
                              block_q_dkv=block, block_kv_dkv=block, block_kv_dkv_compute=block,
                              block_q_dq=block, block_kv_dq=block)
    mask = splash_mask.MultiHeadMask([splash_mask.CausalMask((length, length))] * heads)
    kernel = splash.make_splash_mha(mask, head_shards=1, q_seq_shards=1, block_sizes=sizes,
                                    interpret=interpret)

    def one_row(q_HxLxK, k_GxLxK, v_GxLxK, segment_ids_L):
        ids = splash.SegmentIds(q=segment_ids_L, kv=segment_ids_L)
        return kernel(q_HxLxK * head_dim ** -0.5, k_GxLxK, v_GxLxK, segment_ids=ids)

    heads_first = functools.partial(jnp.swapaxes, axis1=1, axis2=2)
    out_BxHxLxK = jax.vmap(one_row)(heads_first(q_BxLxHxK), heads_first(k_BxLxGxK),
                                    heads_first(v_BxLxGxK), segment_ids_BxL)
    return heads_first(out_BxHxLxK)


def write_cache(cache_BxSxGxK: jax.Array, new_BxTxGxK: jax.Array, start_B: jax.Array) -> jax.Array:
    """The cache with each row's T new entries written from slot start_B[b] on."""
    def one_row(cache_SxGxK, new_TxGxK, start):
        return jax.lax.dynamic_update_slice(cache_SxGxK, new_TxGxK.astype(cache_SxGxK.dtype),
                                            (start, 0, 0))
    cache_BxSxGxK = jax.vmap(one_row)(cache_BxSxGxK, new_BxTxGxK, start_B)
    return constrain(cache_BxSxGxK, ("batch", "length", "kv_heads", "head_dim"))


def attend_cache(q_BxTxHxK: jax.Array, k_BxSxGxK: jax.Array, v_BxSxGxK: jax.Array,
                 positions_BxT: jax.Array) -> jax.Array:
    """Queries at positions p attend to cache slots 0..p (einsums; decoding has no backward)."""
    batch, new, heads, head_dim = q_BxTxHxK.shape
    slots, groups = k_BxSxGxK.shape[1:3]
    q_BxTxGxRxK = q_BxTxHxK.reshape(batch, new, groups, heads // groups, head_dim)
    k_BxSxGxK = k_BxSxGxK.astype(q_BxTxHxK.dtype)
    scores_BxGxRxTxS = jnp.einsum("btgrk,bsgk->bgrts", q_BxTxGxRxK, k_BxSxGxK,
                                  preferred_element_type=jnp.float32) * head_dim ** -0.5
    visible_BxTxS = jnp.arange(slots)[None, None, :] <= positions_BxT[:, :, None]
    scores_BxGxRxTxS = jnp.where(visible_BxTxS[:, None, None], scores_BxGxRxTxS,
                                 jnp.finfo(jnp.float32).min)
    probs_BxGxRxTxS = jax.nn.softmax(scores_BxGxRxTxS, axis=-1).astype(q_BxTxHxK.dtype)
    out_BxTxGxRxK = jnp.einsum("bgrts,bsgk->btgrk", probs_BxGxRxTxS,
                               v_BxSxGxK.astype(q_BxTxHxK.dtype))
    return out_BxTxGxRxK.reshape(batch, new, heads, head_dim)
