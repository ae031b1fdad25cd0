"""Per-process host batches -> global jax.Arrays laid out on the mesh."""

from __future__ import annotations

import math
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding

from configs.coerce import ConfigError
from configs.schema import Config
from sharding.rules import Rules, logical_to_spec

BATCH_AXES = ("batch", "length")


def batch_sharding(mesh: Mesh, rules: Rules) -> NamedSharding:
    """Rows split over the batch mesh axes, tokens of a row kept together."""
    return NamedSharding(mesh, logical_to_spec(BATCH_AXES, rules))


def batch_ways(mesh: Mesh, rules: Rules) -> int:
    """How many ways the batch dimension is split over the mesh."""
    spec = logical_to_spec(BATCH_AXES, rules)[0]
    names = (spec,) if isinstance(spec, str) else (spec or ())
    return int(np.prod([mesh.shape[a] for a in names]))


def check_batch(config: Config, mesh: Mesh) -> None:
    """A ConfigError, before anything is compiled, if the batch cannot be split evenly over
    the mesh's batch axes (and into `train.microbatches`); XLA would only say that some
    dimension is indivisible."""
    ways = batch_ways(mesh, config.mesh.rules)
    parts = config.train.microbatches
    batch = config.train.batch_size
    if batch % (ways * parts):
        raise ConfigError(
            f"train.batch_size ({batch}) must be a multiple of the {ways} ways the batch is "
            f"split over the mesh {dict(mesh.shape)}"
            + (f" times train.microbatches ({parts})" if parts > 1 else "")
            + f"; e.g. train.batch_size={math.ceil(batch / (ways * parts)) * ways * parts}")


def to_global(local_batch: dict[str, np.ndarray], sharding: NamedSharding,
              whole: bool = False) -> dict[str, Any]:
    """Assemble each process's rows into global arrays (no cross-host copy).

    `whole`: every process holds the whole global batch (held-out batches do), and
    each device takes its own rows of it; otherwise each process holds only its share.
    """
    return {name: jax.make_array_from_process_local_data(
                sharding, rows, rows.shape if whole else None)
            for name, rows in local_batch.items()}
