"""Sample grids with fixed noise and fixed classes (or captions), so progress is visible on the same seeds.

Every ``every_n_steps`` and at the end of fit, the EMA network samples ``per_class`` images of each
class in ``classes``; the grid (one row per class) goes to TensorBoard under ``samples/grid`` and to
``<log_dir>/samples/step_<N>.png``. A text-conditioned network samples one row per caption of ``prompts``
(default: the first 8 validation captions of the digit scenes); the captions, row by row, go to TensorBoard
(``samples/captions``) and to ``step_<N>.txt`` beside the image.
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from torchvision.utils import make_grid

from ditlab.atomic import save_image_file, save_text
from ditlab.callbacks.monitor import live_bar, progress_label, sample_with_progress
from ditlab.callbacks.run_dir import run_dir
from ditlab.progress import TaskProgress, hosted_by


class SampleGrid(L.Callback):
    """Logs an EMA sample grid every ``every_n_steps`` optimiser steps and at the end of fit."""

    def __init__(self, every_n_steps: int = 500, classes: list[int] | None = None, per_class: int = 8,
                 seed: int = 0, steps: int | None = None, cfg_scale: float | None = None,
                 prompts: list[str] | None = None) -> None:  # fmt: skip
        self.every_n_steps = every_n_steps
        self.classes = classes
        self.prompts = prompts
        self.rows: list[str] = []
        self.per_class = per_class
        self.seed = seed
        self.overrides = {k: v for k, v in {"steps": steps, "cfg_scale": cfg_scale}.items() if v is not None}
        self.last_path: Path | None = None

    def grid(self, trainer: L.Trainer, pl_module) -> torch.Tensor:
        """``(3, H', W')`` grid in [0, 1]: row ``r`` holds class ``classes[r]`` (or caption ``prompts[r]``); sampled
        with a progress line."""
        if getattr(pl_module, "text_conditioned", False):
            from ditlab.metrics.text_eval import caption_prompts

            self.rows = list(self.prompts) if self.prompts else caption_prompts("validation", 8)
            labels = [caption for caption in self.rows for _ in range(self.per_class)]
        else:
            classes = self.classes if self.classes is not None else list(range(min(pl_module.network.num_classes, 10)))
            self.rows = [str(c) for c in classes]
            labels = torch.tensor(classes).repeat_interleave(self.per_class)
        description = progress_label(trainer, f"sample grid at step {trainer.global_step}")
        with hosted_by(live_bar(trainer)), TaskProgress(description or "", len(labels), enabled=bool(description)) as bar:
            images = sample_with_progress(pl_module, labels, bar, seed=self.seed, **self.overrides)
        if images.shape[-1] < 48:  # small images (digits) are upscaled so the grid is readable
            images = F.interpolate(images, scale_factor=48 // images.shape[-1], mode="nearest")
        return make_grid((images + 1) / 2, nrow=self.per_class, padding=1, pad_value=1.0)

    def log_grid(self, trainer: L.Trainer, pl_module) -> None:
        if trainer.sanity_checking:
            return
        grid = self.grid(trainer, pl_module)
        text = getattr(pl_module, "text_conditioned", False)
        if not trainer.is_global_zero:
            return
        step = trainer.global_step
        for logger in trainer.loggers:
            experiment = getattr(logger, "experiment", None)
            if hasattr(experiment, "add_image"):
                experiment.add_image("samples/grid", grid, global_step=step)
            if text and hasattr(experiment, "add_text"):
                experiment.add_text("samples/captions", "  \n".join(f"{i}. {c}" for i, c in enumerate(self.rows)), step)
        if run_dir(trainer):
            self.last_path = save_image_file(grid, run_dir(trainer) / "samples" / f"step_{step:07d}.png")
            if text:
                save_text("".join(f"{c}\n" for c in self.rows), self.last_path.with_suffix(".txt"))
            pl_module.summary["last_sample_grid"] = str(self.last_path)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.every_n_steps and trainer.global_step % self.every_n_steps == 0 and trainer.global_step > 0:
            self.log_grid(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        if not (self.every_n_steps and trainer.global_step % self.every_n_steps == 0):
            self.log_grid(trainer, pl_module)
