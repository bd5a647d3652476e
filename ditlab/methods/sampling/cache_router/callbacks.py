"""``ImageErrorProxy``: HarmoniCa's IEPO weights, refreshed every C training steps (Huang et al., ICML 2025)."""

from __future__ import annotations

import lightning as L


class ImageErrorProxy(L.Callback):
    """Recompute ``CacheRouterModule``'s per-step loss weights every ``every_n_steps`` steps (first at step 0).

    Args:
        every_n_steps: C (HarmoniCa on DiT-XL/2: 500).
        samples: trajectories the proxy averages over (fixed seed, the same on every process).
        seed: their noise and classes (captions of digit scenes, for a text-conditioned teacher).
    """

    def __init__(self, every_n_steps: int = 100, samples: int = 8, seed: int = 0) -> None:
        if every_n_steps < 1 or samples < 1:
            raise ValueError(f"ImageErrorProxy: every_n_steps={every_n_steps} and samples={samples} must be >= 1")
        self.every_n_steps, self.samples, self.seed = every_n_steps, samples, seed

    def on_train_batch_start(self, trainer: L.Trainer, pl_module, batch, batch_idx: int) -> None:
        if trainer.global_step % self.every_n_steps:
            return
        proxy = pl_module.refresh_weights(self.samples, self.seed)
        experiment = getattr(trainer.logger, "experiment", None) if trainer.logger is not None else None
        if trainer.global_rank == 0 and hasattr(experiment, "add_scalars"):
            experiment.add_scalars("router/proxy", {str(k): float(v) for k, v in enumerate(proxy)}, trainer.global_step)
