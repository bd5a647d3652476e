"""RAE's noise-schedule shift by latent dimension (Zheng et al. 2025, Sec. 4.2, after Esser et al. 2024).

A latent of ``n`` dimensions keeps more of its signal at a given noise level than one of ``m < n``, so the time
schedule is shifted towards noise by ``alpha = sqrt(n / m)``: ``t' = alpha t / (1 + (alpha - 1) t)`` in the
convention where ``t = 1`` is pure noise (ditlab's flow convention, and RAE's ``ICPlan``). RAE's ``m`` is
``time_dist_shift_base: 4096`` and ``n`` the latent's ``C x H x W`` (``time_dist_shift_dim: 196608`` for DINOv2-B at
16x16, ``alpha = 6.93``); the shift applies to the training times (bytetriper/RAE ``transport.py``, ``sample``) and
to the sampling grid (``integrators.py``: ``1 - linspace(0, 1, N)`` shifted). Here training draws go through
:class:`ShiftedFlowMatching`, and sampling uses ditlab's ``time_grid: shift:S`` (SD3's grid, diffusers'
``FlowMatchEulerDiscreteScheduler(shift=S)``: the same map of a uniform grid that starts at 1 and, where RAE's ends
at 0, ends at diffusers' smallest sigma before the final step to 0).
"""

from __future__ import annotations

import math

import torch

from ditlab.diffusion.flow import FlowMatching

RAE_BASE_DIM = 4096


def dimension_shift(latent_dim: int, base_dim: int = RAE_BASE_DIM) -> float:
    """``sqrt(latent_dim / base_dim)``: RAE's shift for a ``latent_dim``-dimensional diffusion space."""
    if latent_dim < 1 or base_dim < 1:
        raise ValueError(f"latent_dim={latent_dim} and base_dim={base_dim} must be positive")
    return math.sqrt(latent_dim / base_dim)


def shift_time(t: torch.Tensor | float, shift: float) -> torch.Tensor | float:
    """``shift t / (1 + (shift - 1) t)``: 0 and 1 stay, times in between move towards 1 (noise) for ``shift > 1``."""
    return shift * t / (1 + (shift - 1) * t)


class ShiftedFlowMatching(FlowMatching):
    """A flow objective whose training times are drawn as before, then shifted: ``t' = shift_time(t, shift)``."""

    def __init__(self, base: FlowMatching, shift: float) -> None:
        super().__init__(base.path, base.time_sampling, base.logit_mean, base.logit_std, base.t_eps, base.t_scale)
        if not shift > 0:
            raise ValueError(f"the time shift must be positive (1: none), got {shift}")
        self.shift = float(shift)

    def sample_time(self, batch: int, device: torch.device, generator: torch.Generator | None = None) -> torch.Tensor:
        return shift_time(super().sample_time(batch, device, generator), self.shift)
