"""Model FLOPs per token and device peak FLOP/s, for an honest MFU.

FLOPs of one training token (forward + backward = 3 x forward, 2 FLOPs per multiply-add),
matmuls only:

    6 * N_matmul                     every weight matrix of the blocks
  + 6 * D * V                        the output projection (tied or not)
  + 6 * layers * L * H * K           attention scores and weighted values:
                                     12 * layers * L * H * K, halved because causal
                                     attention needs only the lower triangle

with D embed, V vocab, L sequence length, H heads, K head dim. The embedding lookup
is a gather and counts nothing; norms, biases and softmax are not matmuls.
MFU = model FLOPs per second / peak FLOP/s of the devices the step runs on.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import platform
import time

import jax
import jax.numpy as jnp

from configs.schema import ModelConfig

# Dense bfloat16 peak FLOP/s per chip (per GPU), from the vendors' spec sheets; the
# usual MFU convention measures float32 runs against it too.
PEAK_FLOPS = {
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,  # v5e
    "TPU v5e": 197e12,
    "TPU v5p": 459e12,
    "TPU v5": 459e12,
    "TPU v6 lite": 918e12,  # v6e (Trillium)
    "TPU v6e": 918e12,
    "H100": 989e12,  # SXM
    "H200": 989e12,
    "A100": 312e12,
}


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token by the formula in this module's docstring."""
    d, k, f = cfg.embed_dim, cfg.head_dim, cfg.mlp_dim
    attention_weights = d * k * (2 * cfg.num_heads + 2 * cfg.num_kv_heads)  # q, o; k, v
    mlp_weights = (2 if cfg.family == "gpt2" else 3) * d * f
    matmul_params = cfg.num_layers * (attention_weights + mlp_weights)
    output_projection = d * cfg.vocab_size
    attention = cfg.num_layers * seq_len * cfg.num_heads * k
    return 6.0 * matmul_params + 6.0 * output_projection + 6.0 * attention


def peak_flops(devices: list[jax.Device], dtype: str) -> tuple[float, str]:
    """Peak FLOP/s of all `devices` together, and where the figure comes from.

    Accelerators: the table above times the device count. CPU: one large matmul,
    measured once per machine and dtype and cached; fake CPU devices share the
    host's cores, so the host peak is the peak of all of them.
    """
    kind = devices[0].device_kind
    if devices[0].platform == "cpu":
        hosts = jax.process_count()  # every process of a CPU job is taken as one host
        return cpu_matmul_peak(dtype) * hosts, f"measured matmul peak of this CPU x {hosts}"
    for name, flops in PEAK_FLOPS.items():
        if name.lower() in kind.lower():
            return flops * len(devices), f"{name} bf16 spec x {len(devices)}"
    return math.nan, f"no peak known for device kind {kind!r}"


def cpu_matmul_peak(dtype: str) -> float:
    """This CPU's `matmul_peak`, measured once per machine and dtype, then read from a
    cache in the user's cache dir (a run's start-up does not pay for it again)."""
    cache = _cache_file()
    key = f"{platform.processor() or platform.machine()}|{os.cpu_count()}|{dtype}"
    try:
        known = json.loads(cache.read_text())
    except (OSError, ValueError):
        known = {}
    if key not in known:
        known[key] = matmul_peak(dtype)
        cache.parent.mkdir(parents=True, exist_ok=True)
        partial = cache.with_suffix(f".{os.getpid()}.tmp")  # processes may write at once
        partial.write_text(json.dumps(known, indent=1))
        partial.replace(cache)
    return known[key]


def matmul_peak(dtype: str) -> float:
    """The best FLOP/s of 1024^3 and 2048^3 matmuls, ten of each: a peak, not a typical
    matmul, so a moment when the machine is busy does not lower it much."""
    return max(measure_matmul(dtype, size, repeats=10) for size in (1024, 2048))


def measure_matmul(dtype: str, size: int = 2048, repeats: int = 5) -> float:
    """FLOP/s of the fastest of `repeats` size x size matmuls on the default device."""
    a = jax.random.normal(jax.random.key(0), (size, size), jnp.dtype(dtype))
    b = jax.random.normal(jax.random.key(1), (size, size), jnp.dtype(dtype))
    matmul = jax.jit(jnp.matmul)
    matmul(a, b).block_until_ready()
    best = math.inf
    for _ in range(repeats):
        started = time.perf_counter()
        matmul(a, b).block_until_ready()
        best = min(best, time.perf_counter() - started)
    return 2.0 * size**3 / best


def _cache_file() -> pathlib.Path:
    root = os.environ.get("XDG_CACHE_HOME") or pathlib.Path.home() / ".cache"
    return pathlib.Path(root) / "io-first-lm" / "matmul_peak.json"
