"""``ExpertLoad``: what the routers do, in TensorBoard, so a collapsing router is seen the step it starts.

Every ``every_n_steps`` optimiser steps, from the last training forward:

- ``moe/expert_<e>``: share of routed assignments that went to expert e, averaged over the MoE layers
  (1/E each when balanced);
- ``moe/imbalance``: the most loaded expert's share times E, averaged over layers (1 = balanced, E/K = collapse
  onto K experts), and ``moe/imbalance_block_<i>`` per MoE block;
- ``mob/block_<i>``: under a Mixture of Blocks, the share of images that ran block i.
"""

from __future__ import annotations

import lightning as L
import torch

from ditlab.methods.moe.blocks import MixtureOfBlocks
from ditlab.methods.moe.layer import MoEFeedForward


def expert_load(network: torch.nn.Module) -> dict[str, float]:
    """The scalars above from ``network``'s last forward (empty when it has no experts and no block mixture)."""
    metrics: dict[str, float] = {}
    layers = [(name, m) for name, m in network.named_modules() if isinstance(m, MoEFeedForward) and m.load is not None]
    if layers:
        loads = torch.stack([m.load.float().cpu() for _, m in layers])  # (layers, E)
        for expert, share in enumerate(loads.mean(0).tolist()):
            metrics[f"moe/expert_{expert}"] = share
        imbalance = loads.max(1).values * loads.shape[1]
        metrics["moe/imbalance"] = float(imbalance.mean())
        for (name, _), value in zip(layers, imbalance.tolist()):
            metrics[f"moe/imbalance_block_{name.split('.')[1]}"] = value
    trunk = getattr(network, "trunk", None)
    if isinstance(trunk, MixtureOfBlocks) and trunk.last_choice is not None:
        for block, share in enumerate(trunk.last_choice.float().mean(0).tolist()):
            metrics[f"mob/block_{block}"] = share
    return metrics


class ExpertLoad(L.Callback):
    """Logs expert load and block use of the trained network every ``every_n_steps`` steps (rank 0's batch),
    from step 0, at the step index its losses are logged under."""

    def __init__(self, every_n_steps: int = 10) -> None:
        if every_n_steps < 1:
            raise ValueError(f"ExpertLoad every_n_steps={every_n_steps} must be at least 1")
        self.every_n_steps = every_n_steps

    def on_train_batch_end(self, trainer: L.Trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        step = trainer.global_step - 1  # the step just trained, as the losses of its training_step are logged
        if step % self.every_n_steps or not trainer.is_global_zero:
            return
        metrics = expert_load(pl_module.network)
        for logger in trainer.loggers if metrics else []:
            logger.log_metrics(metrics, step=step)
