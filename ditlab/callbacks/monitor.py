"""Training health under stable names: gradient norm, throughput, and the resolved config in the HParams tab.

- ``train/grad_norm``: total L2 norm of the trainable parameters' gradients just before the optimiser step
  (after AMP unscaling), the first number to look at when a loss spikes or stalls.
- ``train/images_per_s``: training images per second over the last logging interval (``log_every_n_steps``
  optimiser steps, all processes counted), so slow-downs (evaluation, data stalls) show where they happen.
- HParams: the flattened resolved config (``RunSummary.config``, set by ``DitlabCLI.before_fit``) with the
  final metrics as columns (``val/loss``, ``eval/fid``, ...), so runs can be compared in one table. It is
  written in ``on_fit_start``, before Lightning's own hyper-parameter logging: TensorBoard keeps the first
  HParams record of a run, and the resolved config says more than the module's ``__init__`` arguments.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Mapping

import lightning as L
import torch
from lightning.pytorch.callbacks import ProgressBar, RichProgressBar

from ditlab.distributed import is_sharded, local
from ditlab.progress import TaskProgress, duration

HPARAM_METRICS = ("val/loss", "eval/fid", "train/loss", "train/images_per_s")


def flatten_config(config: Mapping, prefix: str = "", sep: str = ".") -> dict[str, bool | int | float | str]:
    """``{"model": {"init_args": {"lr": 1e-3}}}`` -> ``{"model.init_args.lr": 1e-3}``; lists and None as text.

    TensorBoard's HParams tab accepts only bool, number and string values.
    """
    flat: dict[str, bool | int | float | str] = {}
    for key, value in config.items():
        name = f"{prefix}{sep}{key}" if prefix else str(key)
        if isinstance(value, Mapping):
            flat.update(flatten_config(value, name, sep))
        elif isinstance(value, bool | int | float | str):
            flat[name] = value
        else:
            flat[name] = str(value)
    return flat


def gradient_norm(parameters) -> torch.Tensor | None:
    """Squared-sum-then-root L2 norm over every gradient in ``parameters`` (None when none has a gradient);
    of this process's shards when the gradients are sharded."""
    grads = [local(p.grad.detach()) for p in parameters if p.requires_grad and p.grad is not None]
    if not grads:
        return None
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads]))


class TrainingMonitor(L.Callback):
    """Logs ``train/grad_norm`` and ``train/images_per_s``, and the resolved config to the HParams tab.

    Args:
        grad_norm: log the gradient norm (one extra pass over the gradients per logged step).
        hparams: write the resolved config and ``metrics`` to the loggers' hyper-parameters.
        metrics: metric columns of the HParams table; their values are the last logged scalars.
    """

    def __init__(self, grad_norm: bool = True, hparams: bool = True,
                 metrics: list[str] | tuple[str, ...] = HPARAM_METRICS) -> None:  # fmt: skip
        self.grad_norm, self.hparams, self.metrics = grad_norm, hparams, tuple(metrics)
        self._interval_start: float | None = None
        self._interval_images = 0
        self.last_images_per_s: float | None = None

    # ------------------------------------------------------------------------------- hparams
    def resolved_config(self, trainer: L.Trainer) -> dict | None:
        """The config ``RunSummary`` holds (None outside the CLI)."""
        from ditlab.callbacks.summary import RunSummary

        for callback in trainer.callbacks:
            if isinstance(callback, RunSummary) and callback.config:
                return callback.config
        return None

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._interval_start, self._interval_images = None, 0
        config = self.resolved_config(trainer) if self.hparams else None
        if not config or not trainer.is_global_zero:
            return
        flat = flatten_config(config)
        for logger in trainer.loggers:
            writer = getattr(getattr(logger, "experiment", None), "_get_file_writer", None)
            if writer is None:  # CSV, W&B, ...: the generic call
                logger.log_hyperparams(flat)
                continue
            from torch.utils.tensorboard.summary import hparams

            if hasattr(logger, "hparams"):
                logger.hparams.update(flat)  # also lands in hparams.yaml
            # metric values are not logged here: the HParams tab reads each column's last scalar of the run
            for summary in hparams(flat, dict.fromkeys(self.metrics, 0.0)):
                writer().add_summary(summary)
            logger.experiment.flush()

    # ------------------------------------------------------------------------------- gradient norm
    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer) -> None:
        if not self.grad_norm:
            return
        norm = gradient_norm(pl_module.parameters())
        if norm is None:
            return
        if is_sharded(pl_module):  # sharded gradients: sum the squares across ranks
            norm = trainer.strategy.reduce(norm.square(), reduce_op="sum").sqrt()
        pl_module.log("train/grad_norm", norm, on_step=True, on_epoch=False, batch_size=1)

    # ------------------------------------------------------------------------------- throughput
    def on_train_batch_start(self, trainer: L.Trainer, pl_module, batch, batch_idx: int) -> None:
        if self._interval_start is None:
            self._interval_start = time.perf_counter()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        images = batch[0] if isinstance(batch, list | tuple) else batch
        self._interval_images += len(images) * trainer.world_size
        step, every = trainer.global_step, max(1, trainer.log_every_n_steps)
        if step == 0 or step % every or self._interval_start is None:
            return
        elapsed = time.perf_counter() - self._interval_start
        self.last_images_per_s = self._interval_images / elapsed if elapsed > 0 else None
        self._interval_start, self._interval_images = time.perf_counter(), 0
        if self.last_images_per_s is not None:  # this step is a logging step, so it lands beside train/loss
            pl_module.log(
                "train/images_per_s", self.last_images_per_s, on_step=True, on_epoch=False, batch_size=1
            )


def run_state(trainer: L.Trainer, pl_module: L.LightningModule) -> str:
    """What a method is doing now, for the progress line: the progressive stage and student depth (dicomp,
    Dense2MoE), whether representation alignment is on (REPA, HASTE, Self-Transcendence); "" otherwise."""
    parts = []
    stages = next((callback for callback in trainer.callbacks if hasattr(callback, "schedule")
                   and hasattr(callback, "applied")), None)  # fmt: skip
    network = getattr(pl_module, "network", None)
    if stages is not None:
        parts.append(f"stage {len(stages.applied) + 1}/{len(stages.schedule) + 1}")
    if stages is not None or hasattr(pl_module, "shrink"):
        depth = getattr(network, "depth", None)
        if depth is not None:
            parts.append(f"{depth} blocks")
    active = getattr(pl_module, "alignment_active", None)
    if active is not None:
        stopped = getattr(pl_module, "terminated_at", None)
        parts.append("alignment on" if active else
                     f"alignment off{f' since step {stopped}' if stopped is not None else ''}")  # fmt: skip
    return ", ".join(parts)


def live_bar(trainer: L.Trainer | None):
    """The rich ``Progress`` of the trainer's live step bar (None when there is none, e.g. in a log), for tasks
    such as in-loop evaluation to join (``ditlab.progress.hosted_by``)."""
    bar = getattr(trainer, "progress_bar_callback", None) if trainer is not None else None
    return getattr(bar, "progress", None) if isinstance(bar, RichProgressBar) else None


def progress_label(trainer: L.Trainer, what: str) -> str | None:
    """``[run] what`` for a task's progress lines in a log (``what`` in a terminal), as :class:`LineProgress` prefixes
    its own; None on the other ranks, which stay silent."""
    if not trainer.is_global_zero:
        return None
    name = getattr(trainer.logger, "name", None) if trainer.logger is not None else None
    return f"[{name}] {what}" if name and not sys.stdout.isatty() else what


def sample_with_progress(pl_module, labels: torch.Tensor | list[str], bar: TaskProgress, *, seed: int = 0,
                         start: int = 0, min_batch: int = 16, **options) -> torch.Tensor:  # fmt: skip
    """``pl_module.sample`` of ``labels`` in about ``bar.lines`` batches (of ``min_batch`` to ``sampling.batch_size``
    images), advancing ``bar``, so a long measurement shows progress; sample ``i`` still uses seed ``seed + start + i``,
    whatever the batch. A feature cache is planned (and maybe calibrated) per call, so with one, one call."""
    sampling = getattr(pl_module, "sampling", None)
    cached = getattr(getattr(sampling, "cache", None), "policy", "none") != "none"
    batch_size = max(min_batch, math.ceil(len(labels) / bar.lines))
    batch_size = min(getattr(sampling, "batch_size", None) or len(labels), batch_size)
    batch_size = max(1, len(labels) if cached else batch_size)
    chunks = []
    for offset in range(0, len(labels), batch_size):
        part = labels[offset : offset + batch_size]
        chunks.append(pl_module.sample(part, seed=seed, start=start + offset, **options))
        bar.advance(len(part))
    return torch.cat(chunks)


class StepProgressBar(RichProgressBar):
    """Lightning's rich progress bar, counting optimiser steps against ``max_steps``.

    ditlab runs are budgeted in steps (``max_epochs`` is -1), where Lightning's own description reads
    "Epoch 0/-2" and restarts every epoch; this one reads "step 120/2000 (epoch 4)", followed by the method's
    state (:func:`run_state`: the dicomp stage, whether alignment is on).
    """

    def _get_train_description(self, current_epoch: int) -> str:
        max_steps = self.trainer.max_steps
        if max_steps is None or max_steps < 0:
            return super()._get_train_description(current_epoch)
        state = run_state(self.trainer, self.trainer.lightning_module)
        return f"step {self.trainer.global_step}/{max_steps} (epoch {current_epoch}){f' {state}' if state else ''}"

    def on_train_batch_end(self, trainer: L.Trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if self.progress is not None and self.train_progress_bar_id is not None:
            description = self._get_train_description(trainer.current_epoch)
            self.progress.update(self.train_progress_bar_id, description=description)


class LineProgress(ProgressBar):
    """Progress as plain lines, for output that is not a terminal (a batch log, ``nohup``, CI, the teacher build
    a parent ``ditlab fit`` runs): a live bar there is either silent or a wall of carriage returns.

    Every ``every_n_steps`` optimiser steps or ``every_n_seconds`` seconds, whichever comes first, rank 0 prints
    ``<run> step 120/2000 (6%) loss 0.0412 | 512 images/s | ETA 3m05s | stage 2/2, 6 blocks``, and one line when
    validation starts and ends. ``every_n_steps`` None means about 20 lines a run (never more often than
    ``log_every_n_steps``). Images/s is measured over the training steps since the previous line (validation
    excluded); the ETA from the mean step time since training started (validation and sample grids included).
    """

    def __init__(self, every_n_steps: int | None = None, every_n_seconds: float = 60.0) -> None:
        super().__init__()
        self.every_n_steps, self.every_n_seconds = every_n_steps, every_n_seconds
        self._enabled = True
        self._start: tuple[float, int] = (0.0, 0)
        self._last: tuple[float, int] = (0.0, 0)
        self._images = 0
        self._validation_start = 0.0
        self._paused = 0.0  # seconds of validation since the previous line

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    @property
    def is_enabled(self) -> bool:
        return self._enabled and self.trainer.is_global_zero

    def interval(self, trainer: L.Trainer) -> int:
        if self.every_n_steps:
            return self.every_n_steps
        return max(1, trainer.log_every_n_steps, trainer.max_steps // 20 if trainer.max_steps > 0 else 0)

    def say(self, text: str) -> None:
        if self.is_enabled:
            logger = self.trainer.logger
            name = getattr(logger, "name", None) if logger is not None else None
            print(f"[{name}] {text}" if name else text, flush=True)

    def on_train_start(self, trainer: L.Trainer, pl_module) -> None:
        now = time.perf_counter()
        self._start = self._last = (now, trainer.global_step)
        self._images = 0
        target = f"{trainer.max_steps} steps" if trainer.max_steps > 0 else f"{trainer.max_epochs} epochs"
        self.say(f"training from step {trainer.global_step} to {target}")

    def on_train_batch_end(self, trainer: L.Trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        images = batch[0] if isinstance(batch, list | tuple) else batch
        self._images += len(images) * trainer.world_size
        now, step = time.perf_counter(), trainer.global_step
        last_time, last_step = self._last
        if step == last_step or (step % self.interval(trainer) and now - last_time < self.every_n_seconds):
            return
        self.say(self.line(trainer, pl_module, now))
        self._last, self._images, self._paused = (now, step), 0, 0.0

    def line(self, trainer: L.Trainer, pl_module, now: float) -> str:
        step, max_steps = trainer.global_step, trainer.max_steps
        text = f"step {step}/{max_steps} ({100 * step / max_steps:.0f}%)" if max_steps > 0 else f"step {step}"
        loss = trainer.callback_metrics.get("train/loss")
        if loss is not None:
            text += f" loss {float(loss):.4g}"
        elapsed = now - self._last[0] - self._paused
        if elapsed > 0:
            text += f" | {self._images / elapsed:.0f} images/s"
        start_time, start_step = self._start
        if max_steps > 0 and step > start_step:
            text += f" | ETA {duration((now - start_time) / (step - start_step) * (max_steps - step))}"
        state = run_state(trainer, pl_module)
        return f"{text} | {state}" if state else text

    def on_validation_start(self, trainer: L.Trainer, pl_module) -> None:
        if not trainer.sanity_checking:
            self._validation_start = time.perf_counter()
            self.say(f"validation at step {trainer.global_step}")

    def on_validation_end(self, trainer: L.Trainer, pl_module) -> None:
        if trainer.sanity_checking:
            return
        loss = trainer.callback_metrics.get("val/loss")
        result = f"val/loss {float(loss):.4g}, " if loss is not None else ""
        seconds = time.perf_counter() - self._validation_start
        self._paused += seconds
        self.say(f"validation done ({result}{seconds:.1f} s)")

    def on_train_end(self, trainer: L.Trainer, pl_module) -> None:
        self.say(f"training done: step {trainer.global_step} in {duration(time.perf_counter() - self._start[0])}")
