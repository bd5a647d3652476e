"""Nothing lost when a run is stopped: the end of fit writes ``final.ckpt``; Ctrl-C, SIGTERM or a crash
``interrupted.ckpt``.

Lightning 2.6 only notes a SIGTERM (cluster preemption) on one device and acts on it at the *end of the
epoch*, which a scheduler's grace period may not reach; this callback stops after the current step
(``SIGTERMException``, exit code 143 from ``ditlab``) and saves ``interrupted.ckpt`` on the way out; Ctrl-C
stops at once, saves the same way, and ``ditlab`` exits 130.

Out of space (or quota) is different: there is no room for ``interrupted.ckpt``, so nothing is saved; the
error is noted with the newest complete checkpoint (every checkpoint is written atomically, so each one found is
complete) for ``ditlab`` to name in its one line, and a resume from it is exact.

Lightning's ``OnExceptionCheckpoint`` also turns every later ``fit()`` into a resume from "last"; this
callback only saves, so resuming stays an explicit ``--ckpt_path``. ``final.ckpt`` exists whatever the
periodic checkpoint interval, so a short run (or a teacher build) always leaves its trained weights.
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
from lightning.pytorch.utilities.exceptions import SIGTERMException

from ditlab.atomic import note_saved, out_of_space
from ditlab.callbacks.run_dir import run_dir


class SaveOnInterrupt(L.Callback):
    """Saves ``<log_dir>/checkpoints/final.ckpt`` after fit and ``interrupted.ckpt`` when fit raises."""

    def __init__(self, filename: str = "interrupted.ckpt", final: str = "final.ckpt") -> None:
        self.filename = filename
        self.final = final
        self.path: Path | None = None
        self._saved_step = -1

    def on_train_batch_end(self, trainer: L.Trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if trainer.received_sigterm:
            raise SIGTERMException(143)
        if 0 < trainer.max_steps <= trainer.global_step:  # the last step: save while the epoch is still open, so
            self.save_final(trainer, pl_module)          # resuming it (with more max_steps) continues mid-epoch

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._saved_step != trainer.global_step:  # ended otherwise (max_epochs, early stopping)
            self.save_final(trainer, pl_module)

    def save_final(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.global_step == 0 or not trainer.log_dir:  # log_dir is a collective: every process calls it
            return
        self.path = Path(trainer.log_dir) / "checkpoints" / self.final
        trainer.save_checkpoint(self.path, weights_only=False)  # the full state, to resume
        self._saved_step = trainer.global_step
        if hasattr(pl_module, "summary"):
            pl_module.summary["checkpoint"] = str(self.path)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if out_of_space(exception) is not None:
            self.note_newest(trainer, pl_module, exception)
            return
        if trainer.state.fn != "fit" or trainer.global_step == 0 or not trainer.log_dir:
            return
        self.path = Path(trainer.log_dir) / "checkpoints" / self.filename
        trainer.save_checkpoint(self.path, weights_only=False)  # the full state, to resume
        if trainer.is_global_zero and isinstance(exception, SIGTERMException):
            print(f"received SIGTERM; stopped after step {trainer.global_step}", flush=True)
        if trainer.is_global_zero:
            print(f"interrupted at step {trainer.global_step}; saved {self.path} "
                  f"(resume with --ckpt_path {self.path})", flush=True)  # fmt: skip

    def note_newest(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        """Name the newest complete checkpoint on the out-of-space error, as the one to resume from."""
        newest = newest_checkpoint(trainer) if trainer.is_global_zero else None
        if newest is None:
            return
        if hasattr(pl_module, "summary"):
            pl_module.summary["checkpoint"] = str(newest)
        note_saved(exception, [f"{newest} (the newest complete checkpoint)"],
                   f"free some space; --ckpt_path {newest} resumes from it")  # fmt: skip


def newest_checkpoint(trainer: L.Trainer) -> Path | None:
    """The most recently written checkpoint (file or sharded folder) of this run, else the one it resumed from."""
    folders = {Path(callback.dirpath) for callback in trainer.checkpoint_callbacks if getattr(callback, "dirpath", None)}
    if run_dir(trainer):
        folders.add(run_dir(trainer) / "checkpoints")
    found = [path for folder in folders if folder.is_dir() for path in folder.glob("*.ckpt")]
    resumed = Path(trainer.ckpt_path) if trainer.ckpt_path and Path(trainer.ckpt_path).exists() else None
    return max(found, key=lambda path: path.stat().st_mtime_ns, default=resumed)
