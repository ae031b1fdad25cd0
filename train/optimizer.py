"""AdamW with linear warmup, a decay schedule, a weight-decay mask and global-norm clipping."""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import optax

from configs.schema import OptimConfig

_EMBEDDINGS = ("embed_VxD", "positions_PxD")


def lr_schedule(cfg: OptimConfig, total_steps: int) -> optax.Schedule:
    """The learning rate of the step that `count` steps precede (0 for the first).

    Warmup steps s = 1..W run at s / W of the peak; then the schedule decays (cosine or
    linear) to the minimum at `decay_steps`, stays at the peak (constant), or stays at
    the peak until the last `wsd_decay_fraction` of `decay_steps` and decays linearly
    (wsd). Steps past `decay_steps` stay at the minimum.
    """
    peak = cfg.learning_rate
    floor = peak * cfg.min_lr_ratio if cfg.min_lr is None else cfg.min_lr
    end = cfg.decay_steps or total_steps
    warmup = min(cfg.warmup_steps, max(end - 1, 0))
    if cfg.schedule == "wsd":
        decay_start = max(warmup, end - max(1, round(cfg.wsd_decay_fraction * end)))
    else:
        decay_start = warmup
    span = max(end - decay_start, 1)

    def schedule(count: jax.Array) -> jax.Array:
        step = jnp.asarray(count, jnp.float32) + 1.0  # 1-based: the step being taken
        warming = peak * step / max(warmup, 1)
        progress = jnp.clip((step - decay_start) / span, 0.0, 1.0)
        if cfg.schedule == "constant":
            decayed = jnp.full_like(progress, peak)
        elif cfg.schedule == "cosine":
            decayed = floor + (peak - floor) * 0.5 * (1.0 + jnp.cos(math.pi * progress))
        else:  # linear, and wsd's final decay
            decayed = peak + (floor - peak) * progress
        return jnp.where(step <= warmup, warming, decayed)

    return schedule


def decays(path: tuple[Any, ...], decay_embeddings: bool) -> bool:
    """Whether AdamW's weight decay applies to the parameter at this key path."""
    names = [str(getattr(key, "key", key)) for key in path]
    if any(name.endswith("norm") for name in names):
        return False  # norm scales and LayerNorm biases
    leaf = names[-1]
    if leaf.startswith("b") and "_" in leaf:
        return False  # projection biases: bq_HxK, b_in_F, ...
    if leaf in _EMBEDDINGS:
        return decay_embeddings
    return True


def decay_mask(params: Any, decay_embeddings: bool = True) -> Any:
    """True for every parameter weight decay applies to (see `decays`)."""
    return jax.tree_util.tree_map_with_path(lambda path, _: decays(path, decay_embeddings),
                                            params)


def make_optimizer(cfg: OptimConfig, total_steps: int) -> optax.GradientTransformation:
    adamw = optax.adamw(lr_schedule(cfg, total_steps), b1=cfg.beta1, b2=cfg.beta2, eps=cfg.eps,
                        weight_decay=cfg.weight_decay,
                        mask=lambda params: decay_mask(params, cfg.decay_embeddings))
    if cfg.grad_clip > 0:
        return optax.chain(optax.clip_by_global_norm(cfg.grad_clip), adamw)
    return adamw
