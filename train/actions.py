"""What the loop does after each step: log, save, evaluate. Each action asks `itstime`
whether it is due; adding one is a class with `__call__(done)`."""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from typing import NamedTuple, Protocol

import jax

import checkpoint
import configs
from configs.schema import Config
from observe import flops
from observe.goodput import Goodput
from observe.metrics_log import MetricsLog
from observe.progress import Console
from train.evaluation import Evaluator
from train.feed import DataPosition
from train.process.preemption import Preemption
from train.schedule import itstime
from train.state import TrainState

Metrics = dict[str, jax.Array]


@dataclasses.dataclass(frozen=True)
class StepDone:
    """A step the loop has dispatched, as the actions see it."""

    step: int
    """Its number, from 1 (as on the log line)."""
    state: TrainState
    metrics: Metrics
    position: DataPosition
    """The data position after its batch."""
    last: bool
    """The last step of this invocation: its end, or the step a preemption stops at."""
    preempted: bool


class Action(Protocol):
    def __call__(self, done: StepDone) -> None: ...


class Interval(NamedTuple):
    """What happened between two log lines."""

    seconds: float
    steps: int
    data_wait: float
    checkpoint_blocked: float


@dataclasses.dataclass
class Meter:
    """Host-side timing between log lines (the device is never waited on for it)."""

    last_time: float
    last_step: int
    data_wait: float = 0.0
    checkpoint_blocked: float = 0.0

    def interval(self, step: int, now: float) -> Interval:
        interval = Interval(now - self.last_time, step - self.last_step, self.data_wait,
                            self.checkpoint_blocked)
        self.last_time, self.last_step = now, step
        self.data_wait = self.checkpoint_blocked = 0.0
        return interval


class Logger:
    """A log line, a metrics.jsonl record and TensorBoard scalars at step 1, every
    train.log_every steps and the last (`after_save`). A step's metrics are fetched once
    the next step is dispatched, so the device never idles for the host."""

    def __init__(self, config: Config, mesh: jax.sharding.Mesh, meter: Meter, log: MetricsLog,
                 console: Console, say: Callable[[str], None]):
        self.config, self.meter, self.log, self.console, self.say = config, meter, log, console, say
        self.losses: dict[int, float] = {}
        self.pending: StepDone | None = None
        self.flops_per_token = flops.flops_per_token(config.model, config.data.seq_len)
        self.peak, peak_source = flops.peak_flops(list(mesh.devices.flat), config.model.dtype)
        say(f"MFU: {self.flops_per_token / 1e6:,.1f} MFLOP per token (observe/flops.py) over a "
            f"peak of {self.peak / 1e12:,.2f} TFLOP/s ({peak_source})")

    def __call__(self, done: StepDone) -> None:
        if self.pending is not None and itstime(self.pending.step, self.config.train.log_every,
                                                first=True):
            self._report(self.pending)
        self.pending = done
        if done.last:  # a non-finite last loss stops the run before its state is saved
            self._values(done)

    def after_save(self, done: StepDone) -> None:
        """The last step's line, written once its save has blocked the loop: its
        checkpoint_blocked_ms counts that save, as every other line counts its interval's."""
        if done.last:
            self._report(done)
            self.pending = None

    def _values(self, done: StepDone) -> dict[str, float]:
        values = {k: float(v) for k, v in jax.device_get(done.metrics).items()}
        if not math.isfinite(values["loss"]):
            raise FloatingPointError(f"loss is {values['loss']} at step {done.step}; "
                                     "stopping the run")
        return values

    def _report(self, done: StepDone) -> None:
        values = self._values(done)
        self.losses[done.step] = values["loss"]
        interval = self.meter.interval(done.step, time.perf_counter())
        elapsed, steps = max(interval.seconds, 1e-9), max(interval.steps, 1)
        tokens = interval.steps * self.config.train.batch_size * self.config.data.seq_len
        tokens_per_s = tokens / elapsed
        record = {
            "step": done.step, "loss": values["loss"], "lr": values["lr"],
            "grad_norm": values["grad_norm"], "tokens_per_s": tokens_per_s,
            "mfu": tokens_per_s * self.flops_per_token / self.peak,
            "step_ms": 1e3 * interval.seconds / steps,
            "data_wait_ms": 1e3 * interval.data_wait / steps,
            "data_wait_pct": 100 * interval.data_wait / elapsed,
            "checkpoint_blocked_ms": 1e3 * interval.checkpoint_blocked}
        self.log.write(record)
        self.console.update_bar(loss=record["loss"])
        self.say(
            f"step {done.step:6d} | loss {record['loss']:.4f} | lr {record['lr']:.2e} | "
            f"grad norm {record['grad_norm']:.3f} | {record['tokens_per_s']:,.0f} tok/s | "
            f"MFU {100 * record['mfu']:.1f}% | step {record['step_ms']:.1f} ms | data wait "
            f"{record['data_wait_ms']:.2f} ms ({record['data_wait_pct']:.1f}%) | ckpt blocked "
            f"{record['checkpoint_blocked_ms']:.0f} ms")


class Saver:
    """A checkpoint every checkpoint.every steps, at the last step and on SIGUSR1; the time
    it blocks the loop counts as checkpoint blocking."""

    def __init__(self, config: Config, ckpt: checkpoint.Checkpointer, preemption: Preemption,
                 clock: Goodput, meter: Meter):
        self.ckpt, self.preemption, self.clock, self.meter = ckpt, preemption, clock, meter
        self.every = config.checkpoint.every
        self.saved_config = configs.to_dict(config)

    def __call__(self, done: StepDone) -> None:
        if itstime(done.step, self.every, last=done.last) or self.preemption.take_save_request():
            blocked = self.ckpt.save(done.step, done.state, done.position.to_dict(),
                                     self.saved_config)
            self.clock.attribute("checkpoint blocking", blocked)
            self.meter.checkpoint_blocked += blocked


class Evaluating:
    """Held-out loss every train.eval_every steps and at the end of the run (not when a
    preemption stops it). The loop waits only for the evaluation itself."""

    def __init__(self, config: Config, evaluator: Evaluator, clock: Goodput, log: MetricsLog,
                 console: Console):
        self.every = config.train.eval_every
        self.evaluator, self.clock, self.log, self.console = evaluator, clock, log, console
        self.seconds = 0.0
        """Time spent evaluating, for the caller to tell apart from training."""
        self.latest: float | None = None
        """The last weighted mean held-out loss."""

    def __call__(self, done: StepDone) -> None:
        if done.preempted or not itstime(done.step, self.every, last=done.last):
            return
        with self.clock.phase("evaluation") as phase:
            self.latest = self.evaluator.evaluate(done.step, done.state.params, self.log)
        self.seconds += phase.seconds
        if self.latest is not None:
            self.console.update_bar(eval_loss=self.latest)

