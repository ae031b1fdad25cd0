"""Next-token cross-entropy, computed in float32 whatever the compute dtype.

`cross_entropy` takes logits. `fused_cross_entropy` takes the final hidden states and
the output projection instead, and never holds the B x L x V logits: it walks each
device's rows in sequence chunks and computes each chunk's loss and its gradients
together, the way fused linear-cross-entropy kernels do. The backward pass then only
scales those gradients, so the projection's matmuls are done once each, as in the plain
path, while the big logits never leave the cache.

Under a mesh the chunk loop runs per device (`shard_map`): the projection is gathered
once, in the compute dtype, before the loop, and its gradient is summed over the batch
shards once, after it, and scattered to the projection's own layout. A loop over global
chunks would gather the projection and reduce its gradient on every trip.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from sharding import active_mesh, logical_to_spec


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
    """`cross_entropy(h @ unembed, ...)` in sequence chunks of about `chunk_tokens` tokens
    of each device's rows."""
    weights = weights_BxL.astype(jnp.float32)
    count = jnp.sum(weights)
    loss_sum = _loss_sum(h_BxLxD, unembed_DxV, targets_BxL, weights, chunk_tokens)
    return loss_sum / jnp.maximum(count, 1.0), count


@dataclasses.dataclass(frozen=True)
class _Layout:
    """Mesh axes the loss's operands are split over; all empty without a mesh."""

    rows: tuple[str, ...] = ()
    """Batch rows (the chunk loop runs over each device's rows)."""
    embed: tuple[str, ...] = ()
    """The projection's D dimension, as the parameter is stored."""
    vocab: tuple[str, ...] = ()
    """Its V dimension: logits, softmax sums and target logits are split over these."""

    def spec(self, *dims: tuple[str, ...]) -> PartitionSpec:
        return PartitionSpec(*(axes or None for axes in dims))


def _axes(entry: str | tuple[str, ...] | None) -> tuple[str, ...]:
    return (entry,) if isinstance(entry, str) else tuple(entry or ())


def _layout(rows: int) -> tuple[jax.sharding.Mesh | None, _Layout]:
    active = active_mesh()
    if active is None:
        return None, _Layout()
    mesh, rules = active
    row_axes = _axes(logical_to_spec(("batch", "length"), rules)[0])
    # Rows that cannot be split over all batch axes (a micro-batch smaller than the batch
    # ways) are split over the leading axes that divide them, and repeated over the rest.
    while row_axes and rows % math.prod(mesh.shape[a] for a in row_axes):
        row_axes = row_axes[:-1]
    embed, vocab = logical_to_spec(("embed", "vocab"), rules)
    layout = _Layout(rows=row_axes, embed=_axes(embed), vocab=_axes(vocab))
    if set(layout.rows) & set(layout.vocab):
        raise ValueError(f"the fused loss needs batch rows {layout.rows} and vocab "
                         f"{layout.vocab} on different mesh axes (mesh.rules)")
    return mesh, layout


def _per_device(fn, rows: int, chunk_tokens: int, with_grads: bool):
    """`fn` (local arrays, chunk_tokens, layout) on each device's block of `rows` rows, or
    whole without a mesh."""
    mesh, layout = _layout(rows)
    local = functools.partial(fn, chunk_tokens=chunk_tokens, layout=layout)
    if mesh is None:
        return local
    rows_BxL = layout.spec(layout.rows, ())
    rows_BxLxD = layout.spec(layout.rows, (), ())
    gathered_DxV = layout.spec((), layout.vocab)
    # The gradient leaves scattered over the batch axes that also split D (FSDP), so the
    # sum over the batch shards is one reduce-scatter, not an all-reduce.
    scattered = tuple(a for a in layout.embed if a in layout.rows)
    grads = (rows_BxLxD, layout.spec(scattered, layout.vocab))
    return jax.shard_map(local, mesh=mesh,
                         in_specs=(rows_BxLxD, gathered_DxV, rows_BxL, rows_BxL),
                         out_specs=(PartitionSpec(), grads) if with_grads else PartitionSpec(),
                         check_vma=False)


def _chunk_length(rows: int, length: int, chunk_tokens: int) -> int:
    """The largest divisor of `length` whose chunk (rows x it) has at most chunk_tokens."""
    target = max(1, chunk_tokens // rows)
    return max(c for c in range(1, min(target, length) + 1) if length % c == 0)


def _chunked(x_BxLx_: jax.Array, chunk: int) -> jax.Array:
    """B x L x ... -> N x B x C x ... with N = L / C chunks along the sequence."""
    rows, length = x_BxLx_.shape[:2]
    x = x_BxLx_.reshape(rows, length // chunk, chunk, *x_BxLx_.shape[2:])
    return jnp.swapaxes(x, 0, 1)


def _psum(x: jax.Array, axes: tuple[str, ...]) -> jax.Array:
    return jax.lax.psum(x, axes) if axes else x


def _chunk_losses(h_BxCxD, unembed_DxV, targets_BxC, vocab_axes):
    """Per-token losses, logits and log-partition of a chunk, on this device's vocab slice."""
    logits_BxCxV = jnp.einsum("bcd,dv->bcv", h_BxCxD, unembed_DxV,
                              preferred_element_type=jnp.float32)
    # The max only steadies the exponentials, so it needs no gradient.
    peak_BxC = jax.lax.stop_gradient(jnp.max(logits_BxCxV, axis=-1))
    if vocab_axes:
        peak_BxC = jax.lax.pmax(peak_BxC, vocab_axes)
    sum_exp_BxC = _psum(jnp.sum(jnp.exp(logits_BxCxV - peak_BxC[..., None]), axis=-1),
                        vocab_axes)
    log_z_BxC = peak_BxC + jnp.log(sum_exp_BxC)
    onehot_BxCxV = _target_onehot(targets_BxC, logits_BxCxV.shape[-1], vocab_axes)
    target_logit_BxC = _psum(jnp.sum(jnp.where(onehot_BxCxV, logits_BxCxV, 0.0), axis=-1),
                             vocab_axes)
    return log_z_BxC - target_logit_BxC, logits_BxCxV, log_z_BxC, onehot_BxCxV


def _target_onehot(targets_BxC, vocab_slice: int, vocab_axes):
    """True at each token's target within this device's slice of the vocabulary."""
    first = 0
    if vocab_axes:
        first = jax.lax.axis_index(vocab_axes) * vocab_slice
    return jnp.arange(vocab_slice) + first == targets_BxC[..., None]


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _loss_sum(h_BxLxD, unembed_DxV, targets_BxL, weights_BxL, chunk_tokens):
    """Sum over tokens of weight x loss; without gradients (evaluation)."""
    local = _per_device(_local_loss_sum, h_BxLxD.shape[0], chunk_tokens, with_grads=False)
    return local(h_BxLxD, unembed_DxV.astype(h_BxLxD.dtype), targets_BxL, weights_BxL)


def _local_loss_sum(h_BxLxD, unembed_DxV, targets_BxL, weights_BxL, *, chunk_tokens, layout):
    def add_chunk(total, part):
        h_BxCxD, targets_BxC, weights_BxC = part
        losses_BxC = _chunk_losses(h_BxCxD, unembed_DxV, targets_BxC, layout.vocab)[0]
        return total + jnp.sum(losses_BxC * weights_BxC), None

    chunk = _chunk_length(*h_BxLxD.shape[:2], chunk_tokens)
    parts = (_chunked(h_BxLxD, chunk), _chunked(targets_BxL, chunk), _chunked(weights_BxL, chunk))
    total = jax.lax.scan(add_chunk, jnp.zeros((), jnp.float32), parts)[0]
    return _psum(total, layout.rows)


def _loss_sum_and_grads(h_BxLxD, unembed_DxV, targets_BxL, weights_BxL, chunk_tokens):
    """The loss sum and, as residuals, its gradients w.r.t. h and the projection."""
    local = _per_device(_local_loss_sum_and_grads, h_BxLxD.shape[0], chunk_tokens, with_grads=True)
    total, (d_h_BxLxD, d_unembed_DxV) = local(
        h_BxLxD, unembed_DxV.astype(h_BxLxD.dtype), targets_BxL, weights_BxL)
    return total, (d_h_BxLxD, d_unembed_DxV.astype(unembed_DxV.dtype))


def _local_loss_sum_and_grads(h_BxLxD, unembed_DxV, targets_BxL, weights_BxL, *,
                              chunk_tokens, layout):
    """Chunk by chunk on this device: d loss / d logits = weight * (softmax - onehot)."""
    dt = h_BxLxD.dtype

    def add_chunk(carry, part):
        total, d_unembed_DxV = carry
        h_BxCxD, targets_BxC, weights_BxC = part
        losses_BxC, logits_BxCxV, log_z_BxC, onehot_BxCxV = _chunk_losses(
            h_BxCxD, unembed_DxV, targets_BxC, layout.vocab)
        probs_BxCxV = jnp.exp(logits_BxCxV - log_z_BxC[..., None])
        d_logits_BxCxV = ((probs_BxCxV - onehot_BxCxV) * weights_BxC[..., None]).astype(dt)
        d_h_BxCxD = _psum(jnp.einsum("bcv,dv->bcd", d_logits_BxCxV, unembed_DxV),
                          layout.vocab)
        d_unembed_DxV = d_unembed_DxV + jnp.einsum(
            "bcd,bcv->dv", h_BxCxD, d_logits_BxCxV, preferred_element_type=jnp.float32)
        return (total + jnp.sum(losses_BxC * weights_BxC), d_unembed_DxV), d_h_BxCxD

    chunk = _chunk_length(*h_BxLxD.shape[:2], chunk_tokens)
    parts = (_chunked(h_BxLxD, chunk), _chunked(targets_BxL, chunk), _chunked(weights_BxL, chunk))
    start = (jnp.zeros((), jnp.float32), jnp.zeros(unembed_DxV.shape, jnp.float32))
    (total, d_unembed_DxV), d_h_NxBxCxD = jax.lax.scan(add_chunk, start, parts)
    d_h_BxLxD = jnp.swapaxes(d_h_NxBxCxD, 0, 1).reshape(h_BxLxD.shape)
    # Summed over devices in the compute dtype, as the other weights' gradients are.
    return _psum(total, layout.rows), (d_h_BxLxD, _sum_over_rows(d_unembed_DxV.astype(dt),
                                                                  layout))


def _sum_over_rows(d_unembed_DxV: jax.Array, layout: _Layout) -> jax.Array:
    """This device's partial projection gradient summed over the batch shards: reduced
    and scattered along D over the axes that split D, reduced over the rest."""
    scattered = tuple(a for a in layout.embed if a in layout.rows)
    reduced = tuple(a for a in layout.rows if a not in scattered)
    if scattered:
        d_unembed_DxV = jax.lax.psum_scatter(d_unembed_DxV, scattered, scatter_dimension=0,
                                             tiled=True)
    return _psum(d_unembed_DxV, reduced)


def _loss_sum_backward(chunk_tokens, grads, cotangent):
    d_h_BxLxD, d_unembed_DxV = grads
    return (d_h_BxLxD * cotangent.astype(d_h_BxLxD.dtype), d_unembed_DxV * cotangent, None, None)


# The forward pass already has the gradients: they are the residuals.
_loss_sum.defvjp(_loss_sum_and_grads, _loss_sum_backward)
