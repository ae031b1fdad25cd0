"""A trained run's config and parameters, restored onto the devices present."""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Any

import jax

import checkpoint
import configs
import model
import sharding
from configs.resolve import apply_overrides
from configs.schema import Config, MeshConfig


@dataclasses.dataclass
class Loaded:
    config: Config
    params: dict[str, Any]
    step: int
    mesh: jax.sharding.Mesh


def load(run_dir: str | pathlib.Path, step: int | None = None,
         overrides: list[str] = ()) -> Loaded:
    """Parameters only (no optimizer state) of `step`, or of the latest complete step.

    The mesh is the saved config's rules over all devices present, batch-parallel
    unless `overrides` (e.g. `mesh.tensor=2`) say otherwise.
    """
    directory = checkpoint.checkpoint_dir(run_dir)
    step = checkpoint.latest_complete_step(directory, step)
    config = configs.from_dict(checkpoint.saved_config(directory, step))
    config = dataclasses.replace(config, mesh=MeshConfig(rules=config.mesh.rules))
    config = configs.validate(apply_overrides(config, list(overrides)))
    mesh = sharding.make_mesh(config.mesh)
    config = dataclasses.replace(
        config, model=configs.resolve_auto(config.model, mesh.devices.flat[0].platform))
    shapes = model.abstract_params(config.model)
    shardings = sharding.tree_shardings(mesh, model.logical_axes(config.model), shapes,
                                        config.mesh.rules)
    target = sharding.with_shardings(shapes, shardings)
    return Loaded(config, checkpoint.restore_params(directory, step, target), step, mesh)
