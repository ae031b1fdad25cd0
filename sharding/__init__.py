"""Mesh construction, logical->mesh sharding rules, and global batch assembly."""

from sharding.batch import batch_sharding, batch_ways, check_batch, to_global
from sharding.mesh import MeshError, make_mesh, mesh_shape
from sharding.rules import (
    active_mesh,
    constrain,
    logical_to_spec,
    named_sharding,
    tree_shardings,
    use_rules,
)
from sharding.trees import shardings_of, with_shardings

__all__ = [
    "MeshError", "active_mesh", "batch_sharding", "batch_ways", "check_batch", "constrain",
    "logical_to_spec", "make_mesh", "mesh_shape", "named_sharding", "shardings_of", "to_global",
    "tree_shardings", "use_rules", "with_shardings",
]
