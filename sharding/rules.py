"""Logical axis names -> mesh PartitionSpecs, using only the config's rules table.

The model names axes ("batch", "embed", "mlp", ...); this module alone turns those
names into mesh axes. Activation constraints use the rules installed by
`use_rules`, so the model code runs unchanged with or without a mesh.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import math
from collections.abc import Iterator, Sequence
from typing import Any

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from sharding.mesh import MeshError

Rules = tuple[tuple[str, tuple[str, ...]], ...]
LogicalAxes = tuple[str | None, ...]

_ACTIVE: contextvars.ContextVar[tuple[Mesh, Rules] | None] = contextvars.ContextVar(
    "sharding_rules", default=None)


def logical_to_spec(axes: Sequence[str | None], rules: Rules) -> PartitionSpec:
    """The PartitionSpec for a tuple of logical names.

    A mesh axis shards at most one dimension: the first dimension that claims it
    wins, so ("batch", "length", "embed") puts fsdp on batch, not on embed.
    """
    table = dict(rules)
    used: set[str] = set()
    spec = []
    for name in axes:
        mesh_axes = tuple(a for a in table.get(name, ()) if a not in used) if name else ()
        used.update(mesh_axes)
        spec.append(mesh_axes[0] if len(mesh_axes) == 1 else (mesh_axes or None))
    return PartitionSpec(*spec)


def named_sharding(mesh: Mesh, axes: Sequence[str | None], rules: Rules,
                   shape: Sequence[int] | None = None, what: str = "array") -> NamedSharding:
    """NamedSharding for logical axes, checking that each split dimension divides evenly."""
    spec = logical_to_spec(axes, rules)
    if shape is not None:
        for dim, (size, mesh_axes) in enumerate(zip(shape, spec, strict=True)):
            names = (mesh_axes,) if isinstance(mesh_axes, str) else (mesh_axes or ())
            ways = math.prod(mesh.shape[a] for a in names)
            if size % ways:
                raise MeshError(
                    f"{what}: dimension {dim} ({axes[dim]!r}, size {size}) cannot be split "
                    f"{ways} ways over mesh axes {names}; change the model shape, the mesh, "
                    "or mesh.rules")
    return NamedSharding(mesh, spec)


@contextlib.contextmanager
def use_rules(mesh: Mesh, rules: Rules) -> Iterator[None]:
    """Activate mesh + rules for `constrain` calls inside the model."""
    token = _ACTIVE.set((mesh, rules))
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def active_mesh() -> tuple[Mesh, Rules] | None:
    """The mesh and rules installed by `use_rules`, if any (for kernels run under shard_map)."""
    return _ACTIVE.get()


def constrain(x: jax.Array, axes: LogicalAxes) -> jax.Array:
    """Sharding constraint on an activation by logical names; a no-op without active rules."""
    active = _ACTIVE.get()
    if active is None:
        return x
    mesh, rules = active
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, logical_to_spec(axes, rules)))


def gathered(w: jax.Array, axes: LogicalAxes) -> jax.Array:
    """A weight about to be computed with, whole over the mesh axes that split the batch.

    Under FSDP a weight is stored split over the batch axes; asking for it whole right
    where it is used makes that one all-gather of the weight (in its compute dtype), and
    its gradient, a sum over the batch shards, goes straight back to the weight's own
    layout (which the compiler may sum as a reduce-scatter). Left to itself, XLA may
    instead pass activations around the ring, which costs more when a device holds more
    tokens than the weight has rows. Splits over other axes (tensor) stay. A no-op
    without active rules.

    The whole weight is not kept for the backward pass but gathered again there, as FSDP
    does: kept, every layer's whole weights would stay in memory until the backward.
    """
    active = _ACTIVE.get()
    if active is None:
        return w
    mesh, rules = active
    batch_axes = {a for a in _mesh_axes(logical_to_spec(("batch",), rules)[0])
                  if mesh.shape[a] > 1}
    split = logical_to_spec(axes, rules)
    kept = [tuple(a for a in _mesh_axes(entry) if a not in batch_axes) for entry in split]
    whole = PartitionSpec(*(a[0] if len(a) == 1 else (a or None) for a in kept))
    if whole == split:
        return w
    gather = functools.partial(_all_gather, whole=NamedSharding(mesh, whole),
                               split=NamedSharding(mesh, split))
    return jax.checkpoint(gather)(w)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def _all_gather(w: jax.Array, whole: NamedSharding, split: NamedSharding) -> jax.Array:
    return jax.lax.with_sharding_constraint(w, whole)


def _all_gather_forward(w, whole, split):
    return _all_gather(w, whole, split), None


def _all_gather_backward(whole, split, _, d_w):
    # The gradient goes straight to the weight's layout, so its partial sums can be
    # reduce-scattered; the plain constraint's transpose would ask for it whole on every
    # device first, which only an all-reduce gives.
    return (jax.lax.with_sharding_constraint(d_w, split),)


_all_gather.defvjp(_all_gather_forward, _all_gather_backward)


def _mesh_axes(entry: str | tuple[str, ...] | None) -> tuple[str, ...]:
    return (entry,) if isinstance(entry, str) else tuple(entry or ())


def tree_shardings(mesh: Mesh, logical_tree: Any, shape_tree: Any, rules: Rules) -> Any:
    """NamedShardings for a tree of arrays, given a same-structure tree of logical axes."""
    def one(path, axes, shaped):
        return named_sharding(mesh, axes, rules, shaped.shape, what=jax.tree_util.keystr(path))
    return jax.tree_util.tree_map_with_path(
        one, logical_tree, shape_tree, is_leaf=lambda x: isinstance(x, tuple))
