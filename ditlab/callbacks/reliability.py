"""Runs that resume bit for bit and survive bad numbers.

``ResumeState`` puts the torch / numpy / python RNG states into every checkpoint and restores them just
before the first optimiser step after a resume (after the sanity check and the dataloader's first
``iter()``, which may themselves draw random numbers), so the noise, timesteps and label drop-outs of
step ``k+1`` are the ones an uninterrupted run draws. The data order is restored by the loader itself
(``ditlab.data.digits.ResumableDataLoader``), the EMA network lives in the module's ``state_dict`` and
the progressive / evaluation / alignment callbacks checkpoint their own schedules.

``NaNGuard`` skips optimiser steps whose loss or gradients are not finite (no parameter, optimiser-state
or EMA update), logs ``train/skipped_steps`` and stops after ``max_bad_steps`` bad steps in a row with a
one-line ``NonFiniteTraining`` error; skipped steps never touch the weights, so every checkpoint written
meanwhile still holds the last good ones.
"""

from __future__ import annotations

import random

import lightning as L
import numpy as np
import torch

from ditlab.distributed import local


class ResumeState(L.Callback):
    """Checkpoints the RNG states and restores them at the first training batch after a resume."""

    def __init__(self) -> None:
        self._pending: dict | None = None

    def state_dict(self) -> dict:
        kind, keys, position, has_gauss, gauss = np.random.get_state()
        numpy_state = (
            kind,
            torch.from_numpy(keys.astype(np.int64)),
            int(position),
            int(has_gauss),
            float(gauss),
        )
        # plain tensors and numbers only, so the checkpoint still loads with torch.load(weights_only=True)
        state = {"torch": torch.get_rng_state(), "numpy": numpy_state, "python": random.getstate()}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        self._pending = dict(state_dict)

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx: int
    ) -> None:
        if self._pending is None:
            return
        state, self._pending = self._pending, None
        torch.set_rng_state(state["torch"])
        kind, keys, position, has_gauss, gauss = state["numpy"]
        np.random.set_state((kind, keys.numpy().astype(np.uint32), position, has_gauss, gauss))
        random.setstate(state["python"])
        if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(state["cuda"])


class NonFiniteTraining(ValueError):
    """Raised after too many non-finite steps in a row; ``ditlab`` prints it as one line."""


class NaNGuard(L.Callback):
    """Skips steps with a non-finite loss or gradient; stops after ``max_bad_steps`` of them in a row.

    Args:
        max_bad_steps: consecutive skipped steps that end the run (0 or less: never stop).
    """

    def __init__(self, max_bad_steps: int = 5) -> None:
        self.max_bad_steps = max_bad_steps
        self.skipped = 0
        self.in_a_row = 0
        self._loss_finite = True

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx: int
    ) -> None:
        self._loss_finite = True
        pl_module.skipped_step = False

    def on_before_backward(
        self, trainer: L.Trainer, pl_module: L.LightningModule, loss: torch.Tensor
    ) -> None:
        self._loss_finite = bool(torch.isfinite(loss.detach()).all())

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer) -> None:
        params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        grads = [local(p.grad) for p in params]  # under FSDP each process checks its shard
        grads_finite = not params or bool(torch.stack(torch._foreach_norm(grads)).isfinite().all())
        good = self._loss_finite and grads_finite
        if trainer.world_size > 1:  # every process skips or steps together (shards and losses differ by process)
            votes = trainer.strategy.reduce(torch.tensor(float(good), device=pl_module.device), reduce_op="sum")
            good = int(votes.item()) == trainer.world_size
        if good:
            self.in_a_row = 0
        else:
            for param in params:  # AdamW skips parameters without a gradient: no update, no moment change
                param.grad = None
            pl_module.skipped_step = True
            self.skipped += 1
            self.in_a_row += 1
        pl_module.log("train/skipped_steps", float(self.skipped), on_step=True, on_epoch=False, batch_size=1)
        if not pl_module.skipped_step or not 0 < self.max_bad_steps <= self.in_a_row:
            return
        what = "loss" if not self._loss_finite else "gradients"
        raise NonFiniteTraining(
            f"{self.in_a_row} steps in a row had a non-finite {what} (last at step {trainer.global_step}); "
            "stopped, and every checkpoint holds the last good weights (skipped steps change nothing). Lower "
            "model.lr, add warm-up, use bf16 instead of fp16, or raise --nan_guard.max_bad_steps"
        )

    def state_dict(self) -> dict:
        return {"skipped": self.skipped, "in_a_row": self.in_a_row}

    def load_state_dict(self, state_dict: dict) -> None:
        self.skipped = int(state_dict.get("skipped", 0))
        self.in_a_row = int(state_dict.get("in_a_row", 0))
