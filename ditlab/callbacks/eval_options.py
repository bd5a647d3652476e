"""``--eval.num_samples N`` and ``--eval.steps N``: one knob, in every config, for what a run samples to judge itself.

The final FID (``Evaluation``) and the teacher-vs-student report (``CompressionReport``) sample hundreds of images
at 50 steps each, and the last sample grid its own: most of a short run's wall time. A quick look needs far less,
and the callbacks sit in a list a command line can only address by index, so ``ditlab fit`` carries these options
(``DitlabCLI``) and they reach every such callback, whichever config named it.
"""

from __future__ import annotations

import lightning as L


class EvalOptions(L.Callback):
    """A quick look: fewer images and sampling steps for every FID and sample grid the run's callbacks make.

    Sets ``num_samples`` of every measuring callback in the trainer (a ``num_samples`` attribute and an ``overrides``
    dict: ``Evaluation``, ``CompressionReport``) and the sampling ``steps`` of every sampling callback (an
    ``overrides`` dict: those and ``SampleGrid``); None keeps each callback's own.

    Args:
        num_samples: images per measurement, in-loop evaluation included (at least 4; FID from a few images is a
            look at the run, not a number to compare with the config's).
        steps: sampling steps of those images and of the sample grids.
    """

    def __init__(self, num_samples: int | None = None, steps: int | None = None) -> None:
        if num_samples is not None and num_samples < 4:
            raise ValueError(f"eval.num_samples={num_samples} is too few; use at least 4 (k=3 neighbours)")
        if steps is not None and steps < 1:
            raise ValueError(f"eval.steps={steps} must be at least 1")
        self.num_samples, self.steps = num_samples, steps

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        for callback in trainer.callbacks:
            if callback is self or not isinstance(getattr(callback, "overrides", None), dict):
                continue
            if self.num_samples is not None and hasattr(callback, "num_samples"):
                callback.num_samples = self.num_samples
            if self.steps is not None:
                callback.overrides["steps"] = self.steps
