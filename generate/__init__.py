"""Sampling from a trained model: KV-cached decoding, top-k/top-p, int8 weights."""

from generate.loading import Loaded, load
from generate.quantize import dequantize, quantize_int8
from generate.sampler import Generation, Sampling, generate

__all__ = ["Generation", "Loaded", "Sampling", "dequantize", "generate", "load",
           "quantize_int8"]
