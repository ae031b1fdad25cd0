"""Trees of shapes that carry their shardings: what Orbax restores into, and what
`jax.jit(..., out_shardings=...)` creates arrays with.

Train, generate and the Hugging Face converter all build such targets, so they live
here, below all three, rather than with the train state.
"""

from __future__ import annotations

from typing import Any

import jax


def with_shardings(shapes: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs that also carry the target sharding (what Orbax restores into)."""
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                        shapes, shardings)


def shardings_of(target: Any) -> Any:
    """The shardings of a tree of sharded shapes (such as `train.state.state_target`'s)."""
    return jax.tree.map(lambda shape: shape.sharding, target)
