"""Causal self-attention with document (segment) masking, by one of four kernels.

All four compute softmax(q k^T / sqrt(K) + mask) v where position i may attend
to position j iff j <= i and both lie in the same document:
- `xla`: plain einsums over an explicit LxL mask, differentiated by JAX; runs everywhere.
- `cpu`: the same einsums with a hand-written backward pass tuned for XLA:CPU
  (`model.cpu_kernels`).
- `cudnn`: `jax.nn.dot_product_attention`'s cuDNN flash kernel (NVIDIA GPUs).
- `splash`: the Pallas splash kernel (TPU). Pallas kernels are not partitioned by
  XLA, so it runs under `shard_map` over the batch and head axes of the active
  mesh; on a mesh of other devices it runs in the (slow) Pallas interpreter, for tests.

Shapes: B batch, L length, M key positions, H query heads, G kv heads, R = H / G,
K head dim.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from model import cpu_kernels
from sharding import active_mesh, constrain, logical_to_spec


def attend(q_BxLxHxK: jax.Array, k_BxLxGxK: jax.Array, v_BxLxGxK: jax.Array,
           segment_ids_BxL: jax.Array | None, impl: str,
           dropout: tuple[float, jax.Array] | None = None) -> jax.Array:
    """Attention output, B x L x H x K, by the kernel `impl` (`xla`, `cpu`, `cudnn` or
    `splash`).

    `dropout` (rate, key) drops attention probabilities; only `xla` and `cpu` have it,
    and they drop the same ones for the same key.
    """
    if impl in ("xla", "cpu"):
        mask_BxLxL = attention_mask(q_BxLxHxK.shape[:2], segment_ids_BxL)
        keep_BxGxRxLxL = None if dropout is None else dropout_keep(
            *dropout, q_BxLxHxK.shape[:3], k_BxLxGxK.shape[2])
        kernel = cpu_kernels.attention if impl == "cpu" else softmax_attention
        return kernel(q_BxLxHxK, k_BxLxGxK, v_BxLxGxK, mask_BxLxL, keep_BxGxRxLxL)
    if dropout is not None:
        raise ValueError(f"attention dropout needs the xla or cpu kernel, not {impl!r}")
    if impl == "cudnn":
        return dot_product_attention(q_BxLxHxK, k_BxLxGxK, v_BxLxGxK, segment_ids_BxL, "cudnn")
    if impl == "splash":
        return _splash(q_BxLxHxK, k_BxLxGxK, v_BxLxGxK, segment_ids_BxL)
    raise ValueError(f"unknown attention implementation {impl!r}; expected xla, cpu, cudnn "
                     "or splash")


def attention_mask(shape_BxL: tuple[int, int], segment_ids_BxL: jax.Array | None) -> jax.Array:
    """mask_BxLxL[b, i, j]: may position i attend to position j (causal, same document)."""
    length = shape_BxL[1]
    causal_1xLxL = jnp.tril(jnp.ones((length, length), dtype=bool))[None]
    if segment_ids_BxL is None:
        return jnp.broadcast_to(causal_1xLxL, (shape_BxL[0], length, length))
    same_doc_BxLxL = segment_ids_BxL[:, :, None] == segment_ids_BxL[:, None, :]
    return causal_1xLxL & same_doc_BxLxL


def dropout_keep(rate: float, key: jax.Array, shape_BxLxH: tuple[int, int, int],
                 groups: int) -> jax.Array:
    """Dropout's factor per attention probability, B x G x R x L x L: 0 with probability
    `rate`, else 1 / (1 - rate). Every kernel with dropout draws it here, so one key
    drops the same probabilities whichever kernel runs."""
    batch, length, heads = shape_BxLxH
    shape = (batch, groups, heads // groups, length, length)
    return jax.random.bernoulli(key, 1.0 - rate, shape).astype(jnp.float32) / (1.0 - rate)


def softmax_attention(q_BxLxHxK: jax.Array, k_BxMxGxK: jax.Array, v_BxMxGxK: jax.Array,
                      mask_BxLxM: jax.Array, keep_BxGxRxLxM: jax.Array | None = None
                      ) -> jax.Array:
    """(softmax(q k^T / sqrt(K), masked) * keep) v, B x L x H x K; query heads are grouped
    R to a kv head. `keep` holds dropout's factors (`dropout_keep`); None keeps all."""
    batch, length, heads, head_dim = q_BxLxHxK.shape
    groups = k_BxMxGxK.shape[2]
    q_BxLxGxRxK = q_BxLxHxK.reshape(batch, length, groups, heads // groups, head_dim)
    scores_BxGxRxLxM = jnp.einsum("blgrk,bmgk->bgrlm", q_BxLxGxRxK, k_BxMxGxK,
                                  preferred_element_type=jnp.float32) * head_dim ** -0.5
    scores_BxGxRxLxM = jnp.where(mask_BxLxM[:, None, None], scores_BxGxRxLxM,
                                 jnp.finfo(jnp.float32).min)
    probs_BxGxRxLxM = jax.nn.softmax(scores_BxGxRxLxM, axis=-1)
    if keep_BxGxRxLxM is not None:
        probs_BxGxRxLxM = probs_BxGxRxLxM * keep_BxGxRxLxM
    out_BxLxGxRxK = jnp.einsum("bgrlm,bmgk->blgrk", probs_BxGxRxLxM.astype(v_BxMxGxK.dtype),
                               v_BxMxGxK)
    return out_BxLxGxRxK.reshape(batch, length, heads, head_dim)


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
    active = active_mesh()
    if active is None:  # no mesh: the step runs on the default device
        interpret = jax.default_backend() != "tpu"
        return _splash_local(q_BxLxHxK, k_BxLxGxK, v_BxLxGxK, segment_ids_BxL, interpret)
    mesh, rules = active
    # The mesh's devices, not the host's backend: a CPU host compiling for a TPU slice
    # must get the real kernel.
    interpret = mesh.devices.flat[0].platform != "tpu"
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
    """Queries at positions p attend to cache slots 0..p (the plain kernel: decoding has
    no backward pass to tune)."""
    slots = k_BxSxGxK.shape[1]
    visible_BxTxS = jnp.arange(slots)[None, None, :] <= positions_BxT[:, :, None]
    dt = q_BxTxHxK.dtype
    return softmax_attention(q_BxTxHxK, k_BxSxGxK.astype(dt), v_BxSxGxK.astype(dt),
                             visible_BxTxS)
