"""The train state (step, parameters, optimizer state) and its shardings on a mesh."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import struct
from jax.sharding import Mesh, NamedSharding, PartitionSpec

import model
from configs.schema import Config
from sharding import tree_shardings, with_shardings


@struct.dataclass
class TrainState:
    step: jax.Array
    params: dict[str, Any]
    opt_state: Any


def init_state(cfg: Config, tx: optax.GradientTransformation) -> TrainState:
    """A fresh state; call under jit with out_shardings so it is created already sharded."""
    params = model.init_params(cfg.model, cfg.seed)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))


def abstract_state(cfg: Config, tx: optax.GradientTransformation) -> TrainState:
    """Shapes and dtypes of the state, without allocating it."""
    return jax.eval_shape(lambda: init_state(cfg, tx))


def state_target(cfg: Config, mesh: Mesh, tx: optax.GradientTransformation) -> TrainState:
    """Shapes, dtypes and shardings of the state: all that compiling the step and restoring
    a checkpoint need (tracing the model's init once serves both)."""
    shapes = abstract_state(cfg, tx)
    return with_shardings(shapes, _shardings(cfg, mesh, tx, shapes))


def state_shardings(cfg: Config, mesh: Mesh, tx: optax.GradientTransformation) -> TrainState:
    """Parameters by the logical rules; Adam moments like their parameters; the rest replicated."""
    return _shardings(cfg, mesh, tx, abstract_state(cfg, tx))


def _shardings(cfg: Config, mesh: Mesh, tx: optax.GradientTransformation,
               shapes: TrainState) -> TrainState:
    param_shardings = tree_shardings(mesh, model.logical_axes(cfg.model), shapes.params,
                                     cfg.mesh.rules)
    replicated = NamedSharding(mesh, PartitionSpec())
    opt_shardings = optax.tree_map_params(
        tx, lambda _, sharding: sharding, shapes.opt_state, param_shardings,
        transform_non_params=lambda _: replicated)
    return TrainState(step=replicated, params=param_shardings, opt_state=opt_shardings)
