"""Held-out loss of the current parameters over every held-out source."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import jax

import input as data_input
import sharding
from configs.schema import Config
from observe.metrics_log import MetricsLog
from train.step import eval_step


@dataclasses.dataclass(frozen=True)
class HeldOutLoss:
    dataset: str
    loss: float
    tokens: float
    weight: float


class Evaluator:
    """Evaluates parameters on up to train.eval_batches batches of each held-out source
    (-1: all their rows), compiled once for the run, and writes what it measured."""

    def __init__(self, config: Config, mesh: jax.sharding.Mesh, param_shardings: Any,
                 sources: tuple[data_input.Source, ...], say: Callable[[str], None]):
        self.config = config
        self.sources = sources if config.train.eval_batches else ()
        self.say = say
        self.batch_sharding = sharding.batch_sharding(mesh, config.mesh.rules)

        def step_fn(params, batch):
            with sharding.use_rules(mesh, config.mesh.rules):
                return eval_step(params, batch, cfg=config.model)

        self.step_fn = jax.jit(step_fn, in_shardings=(param_shardings, self.batch_sharding))

    def losses(self, params: Any) -> list[HeldOutLoss]:
        """The token-weighted mean loss of each source that has held-out tokens."""
        results = []
        for source in self.sources:
            loss_sum = tokens = 0.0
            for batch in data_input.eval_batches(source.rows, self.config.train.batch_size,
                                                 self.config.train.eval_batches):
                # Every process reads the whole held-out batch; each device keeps its rows.
                rows = sharding.to_global(batch, self.batch_sharding, whole=True)
                out = jax.device_get(self.step_fn(params, rows))
                loss_sum += float(out["loss_sum"])
                tokens += float(out["tokens"])
            if tokens:
                results.append(HeldOutLoss(source.name, loss_sum / tokens, tokens, source.weight))
        return results

    def evaluate(self, step: int, params: Any, log: MetricsLog) -> float | None:
        """Measure, write a record per source and a log line; the weighted mean loss (None
        when nothing is held out)."""
        results = self.losses(params)
        for result in results:
            perplexity = math.exp(min(result.loss, 50))
            log.write({"step": step, "dataset": result.dataset, "eval_loss": result.loss,
                       "eval_perplexity": perplexity, "eval_tokens": result.tokens})
            prefix = "eval:" if len(self.sources) == 1 else f"eval {result.dataset}:"
            self.say(f"{prefix} held-out loss {result.loss:.4f} | perplexity {perplexity:.2f} "
                     f"| {int(result.tokens):,} tokens (step {step})")
        if not results:
            return None
        total = sum(result.weight for result in results)
        return sum(result.loss * result.weight for result in results) / total
