"""`run(config)`: the training loop, importable from a notebook or called by `python -m train`."""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import math
import pathlib
import time
from typing import Any

import jax

import checkpoint
import configs
import input as data_input
import sharding
from configs.schema import Config
from train import collector, compile_cache, flops, progress, run_lock
from train import state as train_state
from train.compiled import compile_train_step
from train.feed import DeviceFeed
from train.goodput import Goodput
from train.metrics_log import MetricsLog
from train.optimizer import make_optimizer
from train.preemption import Preemption
from train.profiling import StepProfiler
from train.step import eval_step


@dataclasses.dataclass
class RunResult:
    """What a run leaves behind for its caller."""

    state: train_state.TrainState
    start_step: int
    final_step: int
    losses: dict[int, float]
    eval_loss: float | None
    preempted: bool = False
    train_seconds: float = 0.0
    """Wall time of the step loop, from after compilation to the last step's save."""
    data_wait_seconds: float = 0.0
    """Part of train_seconds the loop spent waiting for its next batch."""


@dataclasses.dataclass
class _Meter:
    """Host-side timing between log lines (the device is never waited on for it)."""

    last_time: float
    last_step: int
    flops_per_token: float
    peak_flops: float
    """Of all devices of the mesh together; MFU = model FLOP/s / peak_flops."""
    data_wait: float = 0.0
    checkpoint_blocked: float = 0.0

    def interval(self, step: int, now: float) -> tuple[float, int, float, float]:
        elapsed, steps = now - self.last_time, step - self.last_step
        wait, blocked = self.data_wait, self.checkpoint_blocked
        self.last_time, self.last_step = now, step
        self.data_wait = self.checkpoint_blocked = 0.0
        return elapsed, steps, wait, blocked


# stdout of process 0: log lines, and on a terminal the step bar below them.
_console = progress.Console()


def say(message: str) -> None:
    if jax.process_index() == 0:
        _console.say(message)


def run(config: Config, devices: list[jax.Device] | None = None) -> RunResult:
    """Train (or resume) the run described by `config`; returns the final state and losses.

    `devices` defaults to all devices; the mesh in `config.mesh` is laid over them.
    """
    with collector.StartUp() as startup, \
            run_lock.held(config.run_dir, jax.process_index(), report=say):
        return _run(config, devices, startup)


def _run(config: Config, devices: list[jax.Device] | None,
         startup: collector.StartUp) -> RunResult:
    clock = Goodput()
    config = configs.validate(config)
    mesh = sharding.make_mesh(config.mesh, devices)
    platform = mesh.devices.flat[0].platform
    config = dataclasses.replace(config, model=configs.resolve_auto(config.model, platform))
    say(f"config:\n{configs.to_json(config)}")
    tokenizer = data_input.get_tokenizer(config.data.tokenizer)
    _check_fits(config, mesh, tokenizer)
    sources = data_input.data_sources(config.data, tokenizer)
    say(f"mesh {dict(mesh.shape)} on {mesh.devices.size} {platform} device(s)")
    eval_path, seq_len = config.data.eval_path, config.data.seq_len
    split_off = {} if eval_path else {s.name: len(s.rows) for s in sources.heldout}
    for source in sources.train:
        say(f"data {source.name} (weight {source.weight:g}): {len(source.rows)} train rows, "
            f"{split_off.get(source.name, 'no')} held-out rows of {seq_len} tokens")
    for source in sources.heldout if eval_path else ():
        say(f"data.eval_path {source.name}: {len(source.rows)} held-out rows of {seq_len} tokens")

    saved_steps = None
    if config.train.compile_cache:
        cache_dir = config.train.compile_cache_dir or pathlib.Path(config.run_dir) / "compile_cache"
        cache_dir = compile_cache.enable(cache_dir)
        say(f"compilation cache: {cache_dir}")
        if jax.process_count() == 1:
            saved_steps = pathlib.Path(cache_dir) / "train_steps"
    tx = make_optimizer(config.optim, config.train.steps)
    target = train_state.state_target(config, mesh, tx)
    ckpt = checkpoint.Checkpointer(checkpoint.checkpoint_dir(config.run_dir), config.checkpoint,
                                   report=say)
    try:
        state, position, step_fn = _restore_while_compiling(config, mesh, tx, target, ckpt,
                                                            clock, saved_steps)
        start = int(state.step)
        train_rows = (sources.train[0].rows if len(sources.train) == 1 else
                      [(source.rows, source.weight) for source in sources.train])
        dataset = data_input.train_dataset(
            train_rows, seed=config.seed, global_batch=config.train.batch_size,
            process_index=jax.process_index(), process_count=jax.process_count())
        batches = data_input.train_iterator(dataset, config.data, position["next_index"])
        clock.add("initialisation", time.perf_counter() - clock.started
                  - clock.seconds["compilation"])
        startup.done()
        with Preemption() as preemption:
            state, losses, seconds, waited = _train(config, mesh, step_fn, state, batches,
                                                    ckpt, preemption)
        loop_blocked = ckpt.blocked_seconds  # every save was inside the loop
        waiting = time.perf_counter()
        ckpt.wait()
        clock.add("checkpoint blocking", loop_blocked + time.perf_counter() - waiting)
        clock.add("data wait", waited)
        clock.add("productive steps", max(0.0, seconds - waited - loop_blocked))
    finally:
        ckpt.close()
    if preemption.stop_signal is not None:
        say(f"stopped by signal {preemption.stop_signal} after step {int(state.step)}; "
            f"checkpoint written, run again with run_dir={config.run_dir} to resume")
        clock.save_and_print(config.run_dir, say)
        return RunResult(state, start, int(state.step), losses, None, True, seconds, waited)
    evaluating = time.perf_counter()
    eval_loss = _evaluate(config, mesh, train_state.shardings_of(target.params), state.params,
                          sources.heldout, int(state.step))
    clock.add("evaluation", time.perf_counter() - evaluating)
    clock.save_and_print(config.run_dir, say)
    return RunResult(state, start, int(state.step), losses, eval_loss, False, seconds, waited)


def _check_fits(config: Config, mesh: jax.sharding.Mesh, tokenizer: Any) -> None:
    if config.model.vocab_size < tokenizer.vocab_size:
        raise configs.ConfigError(
            f"model.vocab_size ({config.model.vocab_size}) is smaller than the tokenizer's "
            f"vocabulary ({tokenizer.vocab_size})")
    ways = sharding.batch_ways(mesh, config.mesh.rules)
    parts = config.train.microbatches
    if config.train.batch_size % (ways * parts):
        raise configs.ConfigError(
            f"train.batch_size ({config.train.batch_size}) must be a multiple of the {ways} ways "
            f"the batch is split over the mesh {dict(mesh.shape)}"
            + (f" times train.microbatches ({parts})" if parts > 1 else ""))


def _restore_while_compiling(config: Config, mesh: jax.sharding.Mesh, tx: Any,
                             target: train_state.TrainState, ckpt: checkpoint.Checkpointer,
                             clock: Goodput, saved_steps: pathlib.Path | None,
                             ) -> tuple[Any, dict[str, Any], Any]:
    """State, data position and compiled step; restore and compilation overlap.

    Compiling needs only shapes and shardings, so a restarted run reads its
    checkpoint while XLA compiles (or loads the step from a cache).
    """
    def compile_step():
        compiling = time.perf_counter()
        step = compile_train_step(config, mesh, tx, target, saved_steps, report=say)
        clock.add("compilation", time.perf_counter() - compiling)
        source = {"compiled": "compiled", "compilation cache": "from the compilation cache",
                  "saved executable": "loaded as a saved executable (no tracing)"}[step.source]
        say(f"train step {source} in {step.seconds:.1f} s")
        if step.memory is not None:
            say(f"memory per device: {step.memory.describe()}")
        return step.fn

    latest = ckpt.latest_step()
    finished = latest is not None and latest >= config.train.steps
    with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="restore") as pool:
        restoring = pool.submit(_restore_or_init, config, ckpt, tx, target)
        step_fn = None if finished else compile_step()
        state, position = restoring.result()
    if step_fn is None and int(state.step) < config.train.steps:
        step_fn = compile_step()  # fell back from a damaged final step: training goes on
    return state, position, step_fn


def _restore_or_init(config: Config, ckpt: checkpoint.Checkpointer, tx: Any,
                     target: train_state.TrainState) -> tuple[Any, dict[str, Any]]:
    """The latest checkpoint if the run directory has one, else a fresh state."""
    found = ckpt.newest_readable(ckpt.read_config, fallback=config.checkpoint.fallback)
    if found is not None:
        step, saved = found
        current = configs.to_dict(config)
        mismatch = checkpoint.model_mismatch(saved, current)
        if mismatch:
            raise checkpoint.CheckpointError(
                f"checkpoint step {step} in {ckpt.directory} was written for a different model; "
                "differing fields:\n  " + "\n  ".join(mismatch))
        for line in checkpoint.config_diff(saved, current):
            say(f"note: config differs from checkpoint: {line}")
        restored = ckpt.restore_latest(target, config.checkpoint.fallback, newest=step)
        if restored is not None:
            say(f"resumed from checkpoint step {restored.step} in {ckpt.directory}")
            return restored.state, restored.data_position
    init = jax.jit(functools.partial(train_state.init_state, config, tx),
                   out_shardings=train_state.shardings_of(target))
    return init(), {"next_index": 0}


def _train(config: Config, mesh: jax.sharding.Mesh, step_fn: Any, state: Any,
           batches: Any, ckpt: checkpoint.Checkpointer,
           preemption: Preemption) -> tuple[Any, dict[int, float], float, float]:
    """The step loop. Metrics of step k are fetched after step k+1 is dispatched."""
    start = int(state.step)
    end = config.train.steps
    if config.train.stop_after:
        end = min(end, start + config.train.stop_after)
    if start >= end:
        say(f"nothing to train: checkpoint is at step {start}, run ends at {end}")
        return state, {}, 0.0, 0.0
    saved_config = configs.to_dict(config)
    log = MetricsLog(config.run_dir)
    profiler = StepProfiler(config.profile, config.run_dir, start, end, report=say)
    losses: dict[int, float] = {}
    per_token = flops.flops_per_token(config.model, config.data.seq_len)
    peak, peak_source = flops.peak_flops(list(mesh.devices.flat), config.model.dtype)
    say(f"MFU: {per_token / 1e6:,.1f} MFLOP per token (train/flops.py) over a peak of "
        f"{peak / 1e12:,.2f} TFLOP/s ({peak_source})")
    started = time.perf_counter()
    meter = _Meter(started, start, per_token, peak)
    total_wait = 0.0
    pending = None
    feed = DeviceFeed(batches, sharding.batch_sharding(mesh, config.mesh.rules),
                      depth=config.data.device_prefetch, start=start)
    bar = _console.bar(start, end, show=jax.process_index() == 0)
    with feed, log, profiler, bar as progress_bar:
        for step in range(start, end):
            profiler.before_step(step + 1, state)
            waited = time.perf_counter()
            batch, position = next(feed)
            waited = time.perf_counter() - waited
            meter.data_wait += waited
            total_wait += waited
            state, metrics = step_fn(state, batch)
            profiler.after_step(step + 1, (state, metrics))
            progress_bar.dispatched(step + 1, metrics["loss"])
            if pending is not None:
                _report(config, *pending, meter, losses, log)
            pending = (step + 1, metrics)
            stop = preemption.should_stop(step + 1)
            last = stop or step + 1 == end
            if last:  # the final figures do not wait for the final save
                _report(config, *pending, meter, losses, log, force=True)
            if last or ckpt.should_save(step + 1) or preemption.take_save_request():
                meter.checkpoint_blocked += ckpt.save(step + 1, state, position, saved_config)
            if last:
                elapsed = time.perf_counter() - started
            if stop:
                break
    return state, losses, elapsed, total_wait


def _report(config: Config, step: int, metrics: dict[str, jax.Array], meter: _Meter,
            losses: dict[int, float], log: MetricsLog, force: bool = False) -> None:
    if not (force or step == 1 or step % config.train.log_every == 0):
        return
    values = {k: float(v) for k, v in jax.device_get(metrics).items()}
    if not math.isfinite(values["loss"]):
        raise FloatingPointError(f"loss is {values['loss']} at step {step}; stopping the run")
    losses[step] = values["loss"]
    elapsed, steps, wait, blocked = meter.interval(step, time.perf_counter())
    tokens = steps * config.train.batch_size * config.data.seq_len
    record = {
        "step": step, "loss": values["loss"], "lr": values["lr"],
        "grad_norm": values["grad_norm"], "tokens_per_s": tokens / max(elapsed, 1e-9),
        "mfu": tokens / max(elapsed, 1e-9) * meter.flops_per_token / meter.peak_flops,
        "step_ms": 1e3 * elapsed / max(steps, 1), "data_wait_ms": 1e3 * wait / max(steps, 1),
        "data_wait_pct": 100 * wait / max(elapsed, 1e-9), "checkpoint_blocked_ms": 1e3 * blocked}
    log.write(record)
    _console.update_bar(loss=record["loss"])
    say(f"step {step:6d} | loss {record['loss']:.4f} | lr {record['lr']:.2e} | "
        f"grad norm {record['grad_norm']:.3f} | {record['tokens_per_s']:,.0f} tok/s | "
        f"MFU {100 * record['mfu']:.1f}% | "
        f"step {record['step_ms']:.1f} ms | data wait {record['data_wait_ms']:.2f} ms "
        f"({record['data_wait_pct']:.1f}%) | ckpt blocked {record['checkpoint_blocked_ms']:.0f} ms")


def _evaluate(config: Config, mesh: jax.sharding.Mesh, param_shardings: Any, params: Any,
              sources: tuple[data_input.Source, ...], step: int) -> float | None:
    """Held-out loss of each held-out source over up to train.eval_batches batches (-1: all
    its rows); their weighted mean. None when nothing is held out."""
    if config.train.eval_batches == 0 or not sources:
        return None
    batch_sharding = sharding.batch_sharding(mesh, config.mesh.rules)

    def step_fn(params, batch):
        with sharding.use_rules(mesh, config.mesh.rules):
            return eval_step(params, batch, cfg=config.model)

    evaluate = jax.jit(step_fn, in_shardings=(param_shardings, batch_sharding))
    losses = {}
    for source in sources:
        loss_sum = tokens = 0.0
        for batch in data_input.eval_batches(source.rows, config.train.batch_size,
                                             config.train.eval_batches):
            # Every process reads the whole held-out batch; each device keeps its rows.
            rows = sharding.to_global(batch, batch_sharding, whole=True)
            out = jax.device_get(evaluate(params, rows))
            loss_sum += float(out["loss_sum"])
            tokens += float(out["tokens"])
        if tokens:
            losses[source.name] = (loss_sum / tokens, source.weight, tokens)
    if not losses:
        return None
    with MetricsLog(config.run_dir) as log:
        for name, (loss, _, tokens) in losses.items():
            log.write({"step": step, "dataset": name, "eval_loss": loss,
                       "eval_perplexity": math.exp(min(loss, 50)), "eval_tokens": tokens})
            prefix = "eval:" if len(sources) == 1 else f"eval {name}:"
            say(f"{prefix} held-out loss {loss:.4f} | perplexity {math.exp(min(loss, 50)):.2f} "
                f"| {int(tokens):,} tokens")
    total = sum(weight for _, weight, _ in losses.values())
    return sum(loss * weight for loss, weight, _ in losses.values()) / total
