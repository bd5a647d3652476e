"""Classifier-free guidance (Ho & Salimans, 2022) for any model function ``(x, t, y) -> output``.

The conditional and unconditional rows run as one batch ``[cond; uncond]`` (as the public DiT does), so a
stateful model function (a feature cache) sees each CFG branch in its own rows and never mixes them.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

ModelFunction = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def guided_output(model: ModelFunction, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, null_label: int,
                  cfg_scale: float, cfg_channels: int | None = None) -> torch.Tensor:  # fmt: skip
    """``uncond + w (cond - uncond)`` on the first ``cfg_channels`` output channels (default: all input
    channels; ``3`` reproduces the public DiT), the conditional output on the rest (a learned variance)."""
    null = torch.full_like(y, null_label)
    both = model(torch.cat([x, x]), torch.cat([t, t]) if t.ndim else t, torch.cat([y, null]))
    channels = cfg_channels or x.shape[1]
    guided, rest = both[:, :channels], both[:, channels:]
    cond, uncond = guided.chunk(2)
    return torch.cat([uncond + cfg_scale * (cond - uncond), rest.chunk(2)[0]], dim=1)
