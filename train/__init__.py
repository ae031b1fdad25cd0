"""The training loop: `run(config)` for notebooks, `python -m train` for the command line."""

from train.loop import RunResult, run

__all__ = ["RunResult", "run"]
