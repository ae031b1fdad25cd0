"""`run(config)`: the training loop, importable from a notebook or called by `python -m train`.

After each step the loop hands the step to its actions (log, save, evaluate); each one
asks `itstime` whether it is due at that step.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import functools
import pathlib
import time
from collections.abc import Callable, Iterator
from typing import Any

import jax

import checkpoint
import configs
import input as data_input
import sharding
import storage
from checkpoint import aftermath
from configs.schema import Config
from observe import progress
from observe.goodput import Goodput
from observe.metrics_log import MetricsLog
from observe.profiling import StepProfiler
from train import actions
from train import state as train_state
from train.compile import jax_cache
from train.compile.step import compile_train_step
from train.evaluation import Evaluator
from train.feed import DataPosition, DeviceFeed
from train.optimizer import make_optimizer
from train.process import collector, run_lock, storage_logs
from train.process.preemption import Preemption
from train.state import TrainState

StepFn = Callable[[TrainState, dict[str, jax.Array]], tuple[TrainState, actions.Metrics]]


@dataclasses.dataclass
class RunResult:
    """What a run leaves behind for its caller."""

    state: TrainState
    start_step: int
    final_step: int
    losses: dict[int, float]
    """Training loss of every logged step."""
    eval_loss: float | None
    """Held-out loss at the end (the weighted mean over held-out datasets)."""
    preempted: bool = False
    train_seconds: float = 0.0
    """Wall time of the step loop, from after compilation to the last step's save, less the
    evaluations during it."""
    data_wait_seconds: float = 0.0
    """Part of train_seconds the loop spent waiting for its next batch."""


# stdout of process 0: log lines, and on a terminal the step bar below them.
_console = progress.Console()


def say(message: str) -> None:
    if jax.process_index() == 0:
        _console.say(message)


def run(config: Config, devices: list[jax.Device] | None = None) -> RunResult:
    """Train (or resume) the run described by `config`; returns the final state and losses.

    `devices` defaults to all devices; the mesh in `config.mesh` is laid over them. The
    process is set up for a run here, once: the collector paused through start-up, the
    run directory locked, a failed checkpoint read or write reported once, without its
    debris (`checkpoint.aftermath`).
    """
    aftermath.install()
    storage_logs.install()
    with collector.StartUp() as startup, \
            run_lock.held(config.run_dir, jax.process_index(), report=say):
        return _run(config, devices, startup)


def _run(config: Config, devices: list[jax.Device] | None,
         startup: collector.StartUp) -> RunResult:
    clock = Goodput()
    with contextlib.ExitStack() as stack:
        with clock.phase("initialisation"):
            config, mesh, sources = _set_up(config, devices)
            saved_steps = _enable_compile_cache(config)
            tx = make_optimizer(config.optim, config.train.steps)
            target = train_state.state_target(config, mesh, tx)
            ckpt = stack.enter_context(contextlib.closing(checkpoint.Checkpointer(
                checkpoint.checkpoint_dir(config.run_dir), config.checkpoint, report=say)))
            state, position, step_fn = _restore_while_compiling(config, mesh, tx, target, ckpt,
                                                                clock, saved_steps)
            batches = _training_batches(config, sources, position)
            evaluator = Evaluator(config, mesh, sharding.shardings_of(target.params),
                                  sources.heldout, say)
        startup.done()
        result = _train(config, mesh, step_fn, state, position, batches, ckpt, clock, evaluator)
        waiting = time.perf_counter()
        ckpt.wait()
        clock.attribute("checkpoint blocking", time.perf_counter() - waiting)
    clock.save_and_print(config.run_dir, say)
    return result


def _set_up(config: Config, devices: list[jax.Device] | None,
            ) -> tuple[Config, jax.sharding.Mesh, data_input.DataSources]:
    """The validated config with `auto` settings resolved for the mesh, the mesh, and the
    data, each described in the log."""
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
    return config, mesh, sources


def _enable_compile_cache(config: Config) -> pathlib.Path | None:
    """Turn on XLA's cache; the folder for whole saved steps (single-process runs), if any."""
    if not config.train.compile_cache:
        return None
    cache_dir = config.train.compile_cache_dir or storage.path(config.run_dir) / "compile_cache"
    cache_dir = jax_cache.enable(cache_dir)
    say(f"compilation cache: {cache_dir}")
    if jax.process_count() > 1:
        return None
    if storage.is_remote(cache_dir):
        say("saved executables are kept on local disk only: on gs:// the train step is read "
            "from XLA's compilation cache, traced again")
        return None
    return pathlib.Path(cache_dir) / "train_steps"


def _check_fits(config: Config, mesh: jax.sharding.Mesh, tokenizer: Any) -> None:
    if config.model.vocab_size < tokenizer.vocab_size:
        raise configs.ConfigError(
            f"model.vocab_size ({config.model.vocab_size}) is smaller than the tokenizer's "
            f"vocabulary ({tokenizer.vocab_size})")
    sharding.check_batch(config, mesh)


def _training_batches(config: Config, sources: data_input.DataSources,
                      position: DataPosition) -> Iterator[dict[str, Any]]:
    """This process's batches from the data position on."""
    train = sources.train
    rows = train[0].rows if len(train) == 1 else [(s.rows, s.weight) for s in train]
    dataset = data_input.train_dataset(
        rows, seed=config.seed, global_batch=config.train.batch_size,
        process_index=jax.process_index(), process_count=jax.process_count())
    return data_input.train_iterator(dataset, config.data, position.next_index)


def _restore_while_compiling(config: Config, mesh: jax.sharding.Mesh, tx: Any,
                             target: TrainState, ckpt: checkpoint.Checkpointer,
                             clock: Goodput, saved_steps: pathlib.Path | None,
                             ) -> tuple[TrainState, DataPosition, StepFn | None]:
    """State, data position and compiled step; restore and compilation overlap.

    Compiling needs only shapes and shardings, so a restarted run reads its
    checkpoint while XLA compiles (or loads the step from a cache). The saved config is
    checked first: a run that cannot resume fails before it compiles.
    """
    def compile_step() -> StepFn:
        with clock.phase("compilation"):
            step = compile_train_step(config, mesh, tx, target, saved_steps, report=say)
        source = {"compiled": "compiled", "compilation cache": "from the compilation cache",
                  "saved executable": "loaded as a saved executable (no tracing)"}[step.source]
        say(f"train step {source} in {step.seconds:.1f} s")
        if step.memory is not None:
            say(f"memory per device: {step.memory.describe()}")
        return step.fn

    newest = _newest_resumable_step(config, ckpt)
    finished = newest is not None and newest >= config.train.steps
    with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="restore") as pool:
        restoring = pool.submit(_restore_or_init, config, ckpt, tx, target, newest)
        step_fn = None if finished else compile_step()
        state, position = restoring.result()
    if step_fn is None and int(state.step) < config.train.steps:
        step_fn = compile_step()  # fell back from a damaged final step: training goes on
    return state, position, step_fn


def _newest_resumable_step(config: Config, ckpt: checkpoint.Checkpointer) -> int | None:
    """The newest step whose saved config this run can resume from (only configs are read);
    None for a new run. A checkpoint of another model is refused, naming the fields."""
    found = ckpt.newest_readable(ckpt.read_config, fallback=config.checkpoint.fallback)
    if found is None:
        return None
    step, saved = found
    current = configs.to_dict(config)
    mismatch = checkpoint.model_mismatch(saved, current)
    if mismatch:
        raise checkpoint.CheckpointError(
            f"checkpoint step {step} in {ckpt.directory} was written for a different model; "
            "differing fields:\n  " + "\n  ".join(mismatch))
    for line in checkpoint.config_diff(saved, current):
        say(f"note: config differs from checkpoint: {line}")
    return step


def _restore_or_init(config: Config, ckpt: checkpoint.Checkpointer, tx: Any,
                     target: TrainState, newest: int | None) -> tuple[TrainState, DataPosition]:
    """The newest checkpoint up to step `newest` that restores, else a fresh state."""
    if newest is not None:
        restored = ckpt.restore_latest(target, config.checkpoint.fallback, newest=newest)
        if restored is not None:
            say(f"resumed from checkpoint step {restored.step} in {ckpt.directory}")
            return restored.state, DataPosition.from_dict(restored.data_position)
    init = jax.jit(functools.partial(train_state.init_state, config, tx),
                   out_shardings=sharding.shardings_of(target))
    return init(), DataPosition()


@contextlib.contextmanager
def _closed_after(log: MetricsLog) -> Iterator[MetricsLog]:
    """`log`, closed after the block. When the block failed (a save to a bucket that went
    down), a log that cannot be flushed either is a warning, not an error hiding the first."""
    try:
        yield log
    except BaseException:
        try:
            log.close()
        except Exception as e:
            cause = " ".join(str(e).split())[:300]
            say(f"warning: the metrics log could not be written ({cause})")
        raise
    log.close()


def _train(config: Config, mesh: jax.sharding.Mesh, step_fn: StepFn | None, state: TrainState,
           position: DataPosition, batches: Iterator[dict[str, Any]],
           ckpt: checkpoint.Checkpointer, clock: Goodput, evaluator: Evaluator) -> RunResult:
    """The step loop; after each step its actions (log, save, evaluate) in turn."""
    start = int(state.step)
    end = min(config.train.steps, start + (config.train.stop_after or config.train.steps))
    result = RunResult(state, start, start, {}, None)
    log = MetricsLog(config.run_dir)
    if start >= end:
        say(f"nothing to train: checkpoint is at step {start}, run ends at {end}")
        with log, clock.phase("evaluation"):
            result.eval_loss = evaluator.evaluate(start, state.params, log)
        return result
    meter = actions.Meter(time.perf_counter(), start)
    feed = DeviceFeed(batches, sharding.batch_sharding(mesh, config.mesh.rules),
                      depth=config.data.device_prefetch, start=position)
    profiler = StepProfiler(config.profile, config.run_dir, start, end, report=say)
    bar = _console.bar(start, end, show=jax.process_index() == 0)
    with Preemption() as preemption, feed, _closed_after(log), profiler, \
            bar as progress_bar:
        logger = actions.Logger(config, mesh, meter, log, _console, say)
        evaluating = actions.Evaluating(config, evaluator, clock, log, _console)
        saver = actions.Saver(config, ckpt, preemption, clock, meter)
        after_step = [logger, saver, logger.after_save, evaluating]
        with clock.phase("productive steps") as loop:
            for step in range(start + 1, end + 1):
                profiler.before_step(step, state)
                with clock.phase("data wait") as waited:
                    batch, position = next(feed)
                meter.data_wait += waited.seconds
                result.data_wait_seconds += waited.seconds
                state, metrics = step_fn(state, batch)
                profiler.after_step(step, (state, metrics))
                progress_bar.dispatched(step, metrics["loss"])
                stop = preemption.should_stop(step)
                done = actions.StepDone(step, state, metrics, position,
                                        last=stop or step == end, preempted=stop)
                for action in after_step:
                    action(done)
                if done.last:
                    break
    if done.preempted:
        cause = (f"signal {preemption.stop_signal}" if preemption.stop_signal is not None
                 else "a preemption notice")
        say(f"stopped by {cause} after step {done.step}; checkpoint written, run again with "
            f"run_dir={config.run_dir} to resume")
    result.state, result.final_step, result.preempted = state, done.step, done.preempted
    result.losses, result.eval_loss = logger.losses, evaluating.latest
    result.train_seconds = loop.seconds + loop.nested - evaluating.seconds
    return result
