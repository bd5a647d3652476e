"""The run's log directory, read without a collective call.

``Trainer.log_dir`` broadcasts from rank 0 every time it is read, so a callback that reads it on rank 0 only
(to write a grid or summary.json) leaves the other processes one broadcast behind, and the next collective
of the run (a checkpoint barrier) hangs. Rank-0-only code reads :func:`run_dir` instead.
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger


def run_dir(trainer: L.Trainer) -> Path | None:
    """This process's view of the log directory (rank 0's is the real one); None when there is none."""
    if trainer.loggers:
        logger = trainer.loggers[0]
        path = logger.log_dir if isinstance(logger, TensorBoardLogger | CSVLogger) else logger.save_dir
    else:
        path = trainer.default_root_dir
    return Path(path) if path else None
