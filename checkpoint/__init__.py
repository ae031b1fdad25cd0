"""Asynchronous Orbax checkpoints of train state, data position and config."""

from checkpoint.compat import config_diff, model_mismatch
from checkpoint.manager import Checkpointer, Restored
from checkpoint.reader import (
    CheckpointError,
    checkpoint_dir,
    complete_steps,
    latest_complete_step,
    restore_params,
    saved_config,
)

__all__ = ["CheckpointError", "Checkpointer", "Restored", "checkpoint_dir", "complete_steps",
           "config_diff", "latest_complete_step", "model_mismatch", "restore_params",
           "saved_config"]
