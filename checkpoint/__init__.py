"""Asynchronous Orbax checkpoints of train state, data position and config."""

from checkpoint.compat import config_diff, model_mismatch
from checkpoint.manager import (
    Checkpointer,
    CheckpointError,
    Restored,
    checkpoint_dir,
    restore_params,
)

__all__ = ["CheckpointError", "Checkpointer", "Restored", "checkpoint_dir", "config_diff",
           "model_mismatch", "restore_params"]
