"""``--eval.num_samples N`` and ``--eval.steps N``: one knob, in every config, for the images a run samples to measure.

The final FID (``Evaluation``) and the teacher-vs-student report (``CompressionReport``) sample hundreds of images
at 50 steps each, most of a short run's wall time. A quick look needs far fewer, and the callbacks sit in a list a
command line can only address by index, so ``ditlab fit`` carries these options (``DitlabCLI``) and they reach every
such callback, whichever config named it.
"""

from __future__ import annotations

import lightning as L


class EvalOptions(L.Callback):
    """Sets ``num_samples`` and the sampling ``steps`` of every measuring callback in the trainer (one with a
    ``num_samples`` attribute and an ``overrides`` dict: ``Evaluation``, ``CompressionReport``); None keeps theirs.

    Args:
        num_samples: images per measurement, in-loop evaluation included (at least 4; FID from a few images is a
            look at the run, not a number to compare with the config's).
        steps: sampling steps of those images.
    """

    def __init__(self, num_samples: int | None = None, steps: int | None = None) -> None:
        if num_samples is not None and num_samples < 4:
            raise ValueError(f"eval.num_samples={num_samples} is too few; use at least 4 (k=3 neighbours)")
        if steps is not None and steps < 1:
            raise ValueError(f"eval.steps={steps} must be at least 1")
        self.num_samples, self.steps = num_samples, steps

    def measuring(self, trainer: L.Trainer) -> list[L.Callback]:
        """The callbacks these options apply to."""
        return [callback for callback in trainer.callbacks if callback is not self
                and hasattr(callback, "num_samples") and isinstance(getattr(callback, "overrides", None), dict)]  # fmt: skip

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        for callback in self.measuring(trainer):
            if self.num_samples is not None:
                callback.num_samples = self.num_samples
            if self.steps is not None:
                callback.overrides["steps"] = self.steps
