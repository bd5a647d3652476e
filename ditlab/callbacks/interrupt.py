"""Nothing lost when a run is stopped: Ctrl-C or any crash during fit writes ``interrupted.ckpt``.

Lightning's ``OnExceptionCheckpoint`` also turns every later ``fit()`` into a resume from "last"; this
callback only saves, so resuming stays an explicit ``--ckpt_path``.
"""

from __future__ import annotations

from pathlib import Path

import lightning as L


class SaveOnInterrupt(L.Callback):
    """Saves ``<log_dir>/checkpoints/interrupted.ckpt`` when fit ends in an exception (KeyboardInterrupt too)."""

    def __init__(self, filename: str = "interrupted.ckpt") -> None:
        self.filename = filename
        self.path: Path | None = None

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if trainer.state.fn != "fit" or trainer.global_step == 0 or not trainer.log_dir:
            return
        self.path = Path(trainer.log_dir) / "checkpoints" / self.filename
        trainer.save_checkpoint(self.path)
        if trainer.is_global_zero:
            print(f"interrupted at step {trainer.global_step}; saved {self.path} "
                  f"(resume with --ckpt_path {self.path})")  # fmt: skip
