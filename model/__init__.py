"""Flax NNX decoder-only transformer with logical-axis annotations."""

from model.loss import cross_entropy
from model.params import abstract_params, init_params, logical_axes, merge
from model.transformer import Transformer

__all__ = ["Transformer", "abstract_params", "cross_entropy", "init_params", "logical_axes",
           "merge"]
