"""Stage-wise termination of representation alignment (HASTE: Wang et al., 2025, NUS-HPC-AI-Lab/HASTE).

HASTE argues that alignment to a frozen encoder helps early and then constrains the model, so it switches
every alignment term off at a fixed iteration and trains with the plain diffusion loss afterwards. At
global step ``step`` (before that step's loss is computed) this callback:

- calls ``pl_module.terminate_alignment(step)``: alignment losses off, the encoder (or teacher) dropped
  from the module and garbage-collected (``torch.cuda.empty_cache()`` on GPU), the step recorded in
  ``pl_module.summary["alignment"]`` (summary.json) and in every later checkpoint;
- logs the moment: ``align/terminated`` (the step) and ``align/released_mb`` as scalars at that step, a
  text marker ``align/termination`` in TensorBoard, and the module logs ``align/active`` (1 -> 0) every
  step.

The module owns the termination state (``terminated_at``, in its checkpoint's ``align`` entry); this callback
holds only the configured step. A resumed run past the step never loads the target, and the marker is
logged once. The step is a global optimiser step; HASTE uses 250K for SiT-XL/2 at batch 256.
"""

from __future__ import annotations

import lightning as L
from lightning.pytorch.loggers import TensorBoardLogger


class AlignmentTermination(L.Callback):
    """Switches alignment off for good at global step ``step`` and releases the frozen encoder.

    Args:
        step: the first global step trained without alignment (>= 0; 0 means never aligned).
    """

    def __init__(self, step: int) -> None:
        if step < 0:
            raise ValueError(f"AlignmentTermination step={step} must be >= 0 (a global optimiser step)")
        self.step = step
        self.enabled = True

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if not hasattr(pl_module, "terminate_alignment"):
            raise ValueError("AlignmentTermination needs an alignment module (ditlab.methods.align.AlignModule or "
                             "SelfTranscendenceModule)")  # fmt: skip
        self.enabled = pl_module.terminable
        if not self.enabled and trainer.is_global_zero:
            print(f"alignment: {type(pl_module).__name__} has no termination step here (REG, Self-Transcendence phase "
                  "1); the callback is idle")  # fmt: skip

    def stage_starts(self, pl_module) -> list[tuple[int, str]]:
        """The termination step while alignment is still on, for the module's warning about a run cut short."""
        return [(self.step, "alignment termination")] if self.enabled and pl_module.alignment_active else []

    def on_fit_start(self, trainer: L.Trainer, pl_module) -> None:
        """Runs before the module's own ``on_fit_start``, so a run resumed past the step never loads the target."""
        self.on_train_batch_start(trainer, pl_module, None, 0)

    def on_train_batch_start(self, trainer: L.Trainer, pl_module, batch, batch_idx: int) -> None:
        if self.enabled and pl_module.alignment_active and trainer.global_step >= self.step:
            self.terminate(trainer, pl_module, trainer.global_step)

    def terminate(self, trainer: L.Trainer, pl_module, step: int) -> None:
        released = pl_module.terminate_alignment(step)
        for logger in trainer.loggers:
            logger.log_metrics(
                {"align/terminated": float(step), "align/released_mb": released / 2**20}, step=step
            )
            if isinstance(logger, TensorBoardLogger) and trainer.is_global_zero:
                logger.experiment.add_text(
                    "align/termination", f"alignment terminated at step {step}; encoder released", step
                )
        if trainer.is_global_zero:
            print(f"alignment: terminated at step {step}; released {released / 2**20:.1f} MiB", flush=True)
