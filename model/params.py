"""Parameters as plain nested dicts of arrays, the form jit, optax and Orbax all handle.

The NNX module is rebuilt from its graph definition inside the jitted step
(`merge`), so the train state is an ordinary pytree with no Flax objects in it.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from configs.platform import AUTO_FIELDS, resolve_auto
from configs.schema import ModelConfig
from model.transformer import Transformer

Params = dict[str, Any]


@functools.lru_cache(maxsize=8)
def _abstract(cfg: ModelConfig) -> tuple[nnx.GraphDef, nnx.State]:
    """Graph definition and abstract (shape-only) state, with metadata, of the model."""
    model = nnx.eval_shape(lambda: Transformer(cfg, nnx.Rngs(params=0)))
    return nnx.split(model)


def _parameters_only(cfg: ModelConfig) -> ModelConfig:
    """cfg with its platform-dependent choices fixed to one canonical platform's: the
    parameters (their shapes, axes and initial values) depend on none of them, so a config
    not yet resolved serves, and every resolution of it shares one abstract model."""
    unresolved = dataclasses.replace(cfg, **dict.fromkeys(AUTO_FIELDS, "auto"))
    return resolve_auto(unresolved, "cpu")


def abstract_params(cfg: ModelConfig) -> Params:
    """ShapeDtypeStructs of every parameter, as a nested dict."""
    return nnx.to_pure_dict(_abstract(_parameters_only(cfg))[1])


def logical_axes(cfg: ModelConfig) -> Params:
    """The logical axis names of every parameter, in the same nested-dict layout."""
    state = _abstract(_parameters_only(cfg))[1]
    axes = jax.tree.map(lambda v: v.get_metadata()["logical_axes"], state,
                        is_leaf=lambda x: isinstance(x, nnx.Variable))
    return nnx.to_pure_dict(axes)


def init_params(cfg: ModelConfig, seed: int) -> Params:
    """Freshly initialised parameters (call under jit to create them already sharded)."""
    _, state = nnx.split(Transformer(_parameters_only(cfg), nnx.Rngs(params=seed)))
    return nnx.to_pure_dict(state)


def merge(cfg: ModelConfig, params: Params) -> Transformer:
    """The NNX module with these parameter values; `cfg` must be resolved for the devices
    it runs on (`configs.resolve_auto`)."""
    graphdef, abstract_state = _abstract(cfg)
    state = jax.tree.map(lambda x: x, abstract_state)  # a copy we may fill in
    nnx.replace_by_pure_dict(state, params)
    return nnx.merge(graphdef, state)


def stack_layers(params: Params) -> Params:
    """Per-block parameters ({0: block, 1: block, ...}) -> the `scan_layers` layout, in which
    every block parameter has a leading layers axis."""
    blocks = params["blocks"]
    stacked = jax.tree.map(lambda *layers: jnp.stack(layers), *(blocks[i] for i in sorted(blocks)))
    return {**params, "blocks": stacked}


def unstack_layers(params: Params) -> Params:
    """The `scan_layers` layout -> one parameter dict per block."""
    stacked = params["blocks"]
    count = jax.tree.leaves(stacked)[0].shape[0]
    return {**params, "blocks": {i: jax.tree.map(lambda x, i=i: x[i], stacked)
                                 for i in range(count)}}
