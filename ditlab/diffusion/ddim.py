"""Deterministic DDIM (Song et al., "Denoising Diffusion Implicit Models", 2021; eta = 0) on any list of DDPM steps.

diffusers' ``DDIMScheduler`` finds the previous step by a fixed stride ``T // N``, so it cannot follow the public
DiT's respacing, whose stride is fractional; this is the same update on an explicit grid:
``x_prev = sqrt(abar_prev) x0_hat + sqrt(1 - abar_prev) eps_hat``. After the last listed step it lands on the
predicted data ``x0_hat`` (``alpha_to_one``: the public DiT's ``ddim_sample_loop``, whose respaced process has
``abar = 1`` before its first step) or, like diffusers' ``set_alpha_to_one=False``, at step 0's noise level.
"""

from __future__ import annotations

import torch

from ditlab.diffusion.steppers import Stepper


class GridDDIM(Stepper):
    """DDIM over ``timesteps`` (descending DDPM steps) of a ``GaussianDiffusion``; one model call per step."""

    def __init__(self, objective, timesteps: list[int], alpha_to_one: bool = True) -> None:
        self.objective = objective
        self.times = torch.tensor(timesteps, dtype=torch.long)
        alphas_cumprod = objective.tables["alphas_cumprod"]  # float64, as the public code keeps it
        final = 1.0 if alpha_to_one else alphas_cumprod[0].item()
        self.next_alpha_cumprod = [alphas_cumprod[t].item() for t in timesteps[1:]] + [final]

    def step(self, output, index, sample, generator=None):
        t = self.times[index].to(sample.device).expand(sample.shape[0])
        x0 = self.objective.predict_x0(output, sample, t)
        eps = self.objective.predict_eps(output, sample, t)
        alpha_next = self.next_alpha_cumprod[index]
        return alpha_next**0.5 * x0 + (1.0 - alpha_next) ** 0.5 * eps
