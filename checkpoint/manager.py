"""Orbax checkpoints of {train state, data position, resolved config}, saved asynchronously.

A checkpoint is written to a temporary directory and renamed into place only
when complete, so a crash mid-write never becomes the latest step.
"""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Any

import orbax.checkpoint as ocp

from configs.schema import CheckpointConfig

ITEMS = ("state", "data", "config")


class CheckpointError(ValueError):
    """A checkpoint cannot be used with the current run."""


@dataclasses.dataclass(frozen=True)
class Restored:
    step: int
    state: Any
    data_position: dict[str, Any]
    config: dict[str, Any]


class Checkpointer:
    """Save and restore run checkpoints under `directory`."""

    def __init__(self, directory: str | pathlib.Path, cfg: CheckpointConfig):
        self.directory = pathlib.Path(directory).absolute()
        self.cfg = cfg
        options = ocp.CheckpointManagerOptions(
            max_to_keep=cfg.keep, enable_async_checkpointing=cfg.async_save, create=True)
        self._manager = ocp.CheckpointManager(self.directory, options=options, item_names=ITEMS)

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def should_save(self, step: int) -> bool:
        return self.cfg.every > 0 and step % self.cfg.every == 0

    def save(self, step: int, state: Any, data_position: dict[str, Any],
             config: dict[str, Any]) -> None:
        """Start saving; returns once the arrays are copied off the device buffers."""
        if step in self._manager.all_steps():
            return
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=ocp.args.JsonSave(data_position),
            config=ocp.args.JsonSave(config))
        self._manager.save(step, args=args, force=True)

    def restore(self, step: int, target: Any) -> Restored:
        """Read step `step` into `target`'s structure, each array straight into its sharding."""
        args = ocp.args.Composite(
            state=ocp.args.StandardRestore(target),
            data=ocp.args.JsonRestore(),
            config=ocp.args.JsonRestore())
        try:
            restored = self._manager.restore(step, args=args)
        except (ValueError, KeyError, FileNotFoundError) as e:
            raise CheckpointError(
                f"checkpoint step {step} in {self.directory} could not be restored: {e}") from e
        return Restored(step, restored.state, dict(restored.data), dict(restored.config))

    def read_config(self, step: int) -> dict[str, Any]:
        """Only the resolved config saved with a step."""
        args = ocp.args.Composite(config=ocp.args.JsonRestore())
        return dict(self._manager.restore(step, args=args).config)

    def wait(self) -> None:
        """Block until background writes have finished."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()
