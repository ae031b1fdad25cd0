"""Flax NNX decoder-only transformer with logical-axis annotations."""

from model.loss import cross_entropy, fused_cross_entropy
from model.params import (
    abstract_params,
    init_params,
    logical_axes,
    merge,
    stack_layers,
    unstack_layers,
)
from model.transformer import Transformer

__all__ = ["Transformer", "abstract_params", "cross_entropy", "fused_cross_entropy",
           "init_params", "logical_axes", "merge", "stack_layers", "unstack_layers"]
