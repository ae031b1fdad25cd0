"""The train step compiled ahead of time, and what it will need of each device's memory."""

from __future__ import annotations

import dataclasses
import functools
import pathlib
import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

import configs
import sharding
from configs.schema import Config
from train import state as train_state
from train.compile import chips, executables, jax_cache
from train.optimizer import lr_schedule
from train.step import train_step

BATCH_DTYPES = {"inputs": np.int32, "targets": np.int32, "weights": np.float32,
                "segment_ids": np.int32, "positions": np.int32}


@dataclasses.dataclass(frozen=True)
class StepMemory:
    """Bytes per device of the compiled step (XLA's buffer assignment)."""

    arguments: int
    outputs: int
    aliased: int
    """Outputs that reuse donated argument buffers (the new state in the old one)."""
    temporaries: int

    @property
    def total(self) -> int:
        return self.arguments + self.outputs - self.aliased + self.temporaries

    def describe(self) -> str:
        gib = 2.0 ** 30
        return (f"arguments {self.arguments / gib:.2f} GiB + temporaries "
                f"{self.temporaries / gib:.2f} GiB + outputs not aliased "
                f"{(self.outputs - self.aliased) / gib:.2f} GiB = total {self.total / gib:.2f} GiB")


class OutOfMemory(configs.ConfigError):
    """The step cannot fit in a device's memory: the compiler refused it, or its buffers
    exceed what a device has."""


@dataclasses.dataclass
class CompiledStep:
    fn: Any
    """(state, batch) -> (state, metrics); the state argument is donated."""
    seconds: float
    source: str
    """"compiled", "compilation cache" (XLA's compile skipped) or "saved executable"
    (tracing and lowering skipped too)."""
    memory: StepMemory | None


def compile_train_step(config: Config, mesh: jax.sharding.Mesh, tx: Any,
                       target: train_state.TrainState, saved: pathlib.Path | None = None,
                       report: Callable[[str], None] = print) -> CompiledStep:
    """The step with explicit in/out shardings for a state like `target` (sharded shapes);
    refuses a step whose memory per device exceeds what the device has.

    With `saved` (a directory), the step is loaded from there when an executable for the
    same config, code, libraries and devices was saved, and saved there when this call
    compiled it. `tx` must be `make_optimizer(config.optim, config.train.steps)`: the key
    knows the optimizer only through the config.
    """
    started = time.perf_counter()
    devices = list(mesh.devices.flat)
    digest = executables.key(configs.to_dict(config), devices) if saved else ""
    compiled = executables.load(saved, digest, devices, report) if saved else None
    if compiled is not None:
        source = "saved executable"
    else:
        hits = jax_cache.hits()
        compiled = compile_or_refuse(_lower(config, mesh, tx, target))
        source = "compilation cache" if jax_cache.hits() > hits else "compiled"
        if saved and source == "compiled":  # see executables.save
            executables.save(saved, digest, compiled, report)
    seconds = time.perf_counter() - started
    memory = step_memory(compiled)
    if memory is not None:
        check_fits(memory, device_memory_bytes(mesh.local_devices[0]))
    return CompiledStep(compiled, seconds, source, memory)


def _lower(config: Config, mesh: jax.sharding.Mesh, tx: Any,
           target: train_state.TrainState) -> jax.stages.Lowered:
    batch_sharding = sharding.batch_sharding(mesh, config.mesh.rules)
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    step = functools.partial(train_step, cfg=config.model, tx=tx,
                             schedule=lr_schedule(config.optim, config.train.steps),
                             microbatches=config.train.microbatches, seed=config.seed)
    shardings = sharding.shardings_of(target)
    jitted = jax.jit(step, in_shardings=(shardings, batch_sharding),
                     out_shardings=(shardings, replicated), donate_argnums=0)
    shape = (config.train.batch_size, config.data.seq_len)
    batch_shapes = {name: jax.ShapeDtypeStruct(shape, dtype, sharding=batch_sharding)
                    for name, dtype in BATCH_DTYPES.items()}
    with sharding.use_rules(mesh, config.mesh.rules):  # the step is traced here
        return jitted.lower(target, batch_shapes)


def compile_or_refuse(lowered: jax.stages.Lowered) -> Any:
    """`lowered.compile()`; the TPU compiler's out-of-memory refusal as `OutOfMemory`."""
    try:
        return lowered.compile()
    except jax.errors.JaxRuntimeError as e:
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        detail = str(e).split("\n", 1)[0].removeprefix("RESOURCE_EXHAUSTED: ").rstrip(".")
        raise OutOfMemory(f"the train step does not fit: {detail}; {_WHAT_TO_CHANGE}") from None


def step_memory(compiled: Any) -> StepMemory | None:
    """Per-device memory of a compiled executable, if the backend reports it."""
    try:
        stats = compiled.memory_analysis()
    except (NotImplementedError, jax.errors.JaxRuntimeError):
        return None
    if stats is None:
        return None
    return StepMemory(arguments=stats.argument_size_in_bytes, outputs=stats.output_size_in_bytes,
                      aliased=stats.alias_size_in_bytes, temporaries=stats.temp_size_in_bytes)


def device_memory_bytes(device: jax.Device) -> int | None:
    """Memory the device lets programs use (GPU/TPU); None where unknown (CPU).

    A device of a slice compiled for ahead of time is not this process's to ask: its
    chip's usable HBM is taken from the table in `chips`.
    """
    try:
        stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    except jax.errors.JaxRuntimeError:  # "only supported for addressable devices"
        generation = chips.generation_of(device)
        return chips.CHIPS[generation].usable_bytes if generation else None
    return (stats or {}).get("bytes_limit")


def check_fits(memory: StepMemory, limit: int | None) -> None:
    """Raise before the first step, rather than fail in it, if the step cannot fit."""
    if limit is None or memory.total <= limit:
        return
    raise OutOfMemory(
        f"the train step needs {memory.total / 2**30:.2f} GiB per device "
        f"({memory.describe()}) but a device has {limit / 2**30:.2f} GiB; {_WHAT_TO_CHANGE}")


_WHAT_TO_CHANGE = ("shard more (mesh.fsdp, mesh.tensor), recompute activations "
                   "(model.remat=full), split the batch (train.microbatches) or make it smaller "
                   "(train.batch_size, data.seq_len)")
