"""Progressive distillation: shrink the student in stages (e.g. 12 -> 9 -> 6 blocks), distilling in between.

Amber-Image (arXiv 2602.17047) and Dense2MoE convert or prune a few blocks at a time and distil after each
step, instead of one large cut. Stage ``i`` starts at global step ``at_steps[i]`` with ``blocks[i]`` blocks;
at that step (before its optimiser update) the student and its EMA are cut with the module's criterion
run on the *current student*, the optimiser is rebuilt for the new parameters, the finished stage's
student is saved as ``checkpoints/stage_<k>_blocks_<d>.ckpt``, and the change is logged
(``dicomp/blocks``, ``dicomp/parameters``) so TensorBoard shows where each stage starts.

It runs under DDP (the new student is re-wrapped; all processes must agree on the cut) and FSDP2 (the
student is gathered, cut and sharded again). Which stages have run is checkpointed; a resumed run rebuilds the student at its checkpointed depth
(``DicompModule.on_load_checkpoint``) and never applies a stage twice.
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
from lightning.pytorch.strategies import DDPStrategy


def rewrap(trainer: L.Trainer, kept: list[int]) -> None:
    """After a stage on several processes: check they all cut the same blocks, and give DDP the new student.

    (FSDP2 needs nothing here: ``shrink`` re-shards the new student, and Lightning does not wrap the module.)
    """
    agreed = trainer.strategy.broadcast(kept)
    if agreed != kept:
        raise RuntimeError(f"processes chose different blocks ({kept} here, {agreed} on rank 0) at a progressive "
                           "stage; use a deterministic criterion or a fixed calibration set")  # fmt: skip
    if isinstance(trainer.strategy, DDPStrategy):
        trainer.strategy.model = trainer.lightning_module
        trainer.strategy.configure_ddp()


class ProgressiveDistillation(L.Callback):
    """Cuts ``DicompModule``'s student to ``blocks[i]`` blocks at global step ``at_steps[i]``.

    Args:
        at_steps: global steps at which a stage starts (increasing, >= 1; the initial cut is ``model.prune``).
        blocks: student depth from each of those steps on (decreasing).
        criterion: block importance used at each stage; None uses the module's ``prune.criterion``.
        init: kept-block weights at each stage (copy | average | random); None uses ``prune.init``.
    """

    def __init__(self, at_steps: list[int], blocks: list[int], criterion: str | None = None,
                 init: str | None = None) -> None:  # fmt: skip
        if len(at_steps) != len(blocks):
            raise ValueError(f"progressive at_steps {at_steps} and blocks {blocks} must have the same length")
        if list(at_steps) != sorted(set(at_steps)) or any(step < 1 for step in at_steps):
            raise ValueError(f"progressive at_steps {at_steps} must increase and be >= 1 (the initial cut is model.prune)")
        if list(blocks) != sorted(set(blocks), reverse=True):
            raise ValueError(f"progressive blocks {blocks} must shrink the student at every stage")
        self.schedule = dict(zip(at_steps, blocks))
        self.criterion, self.init = criterion, init
        self.applied: list[int] = []
        self.stages: list[dict] = []

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if not hasattr(pl_module, "shrink"):
            raise ValueError("ProgressiveDistillation needs a compression module (ditlab.methods.compress.module.DicompModule)")

    def stage_starts(self, pl_module) -> list[tuple[int, str]]:
        """``(step, stage)`` of each stage still to run, for ``DicompModule``'s warning about a run cut short."""
        starts, depth = [], pl_module.network.depth
        for step, blocks in sorted(self.schedule.items()):
            if step not in self.applied:
                starts.append((step, f"progressive stage {depth} -> {blocks} blocks"))
                depth = blocks
        return starts

    def on_train_start(self, trainer: L.Trainer, pl_module) -> None:
        """The starting depth, so TensorBoard's ``dicomp/blocks`` curve steps down at each stage."""
        for logger in trainer.loggers:
            logger.log_metrics({"dicomp/blocks": pl_module.network.depth}, step=trainer.global_step)

    def on_train_batch_start(self, trainer: L.Trainer, pl_module, batch, batch_idx: int) -> None:
        step = trainer.global_step
        if step not in self.schedule or step in self.applied:
            return
        before = pl_module.describe(pl_module.network)
        if trainer.log_dir:
            path = Path(trainer.log_dir) / "checkpoints" / f"stage_{len(self.applied)}_blocks_{before['blocks']}.ckpt"
            trainer.save_checkpoint(path)
        kept = pl_module.shrink(self.schedule[step], self.criterion, self.init)
        if trainer.world_size > 1:
            rewrap(trainer, kept)
        trainer.strategy.setup_optimizers(trainer)  # new parameters: a fresh optimiser and warm-up
        self.applied.append(step)
        after = pl_module.describe(pl_module.network)
        self.stages.append({"step": step, "kept_student_blocks": kept, "teacher_blocks": list(pl_module.keep),
                            "segments": [list(s) for s in getattr(pl_module, "segments", [])], **after})  # fmt: skip
        pl_module.summary["stages"] = self.stages
        for logger in trainer.loggers:
            logger.log_metrics({"dicomp/blocks": after["blocks"], "dicomp/parameters": after["parameters"]}, step=step)
        if trainer.is_global_zero:
            print(f"progressive distillation: step {step}: {before['blocks']} -> {after['blocks']} blocks "
                  f"({after['parameters']:,} parameters)")  # fmt: skip

    def state_dict(self) -> dict:
        return {"applied": list(self.applied), "stages": list(self.stages)}

    def load_state_dict(self, state_dict: dict) -> None:
        self.applied = list(state_dict.get("applied", []))
        self.stages = list(state_dict.get("stages", []))
