"""SiT's stochastic sampler (Ma et al. 2024, ``transport/transport.py`` ``sample_sde`` and ``integrators.py``):
Euler-Maruyama on the SDE that shares the flow's marginals, with a diffusion coefficient ``w`` chosen after
training and a noise-free last step.

In SiT's time (s = 0 noise, 1 data) the step is ``x += (v + w score) ds + sqrt(2 w ds) z``, the score derived from
the predicted velocity ``v``. In ditlab's time (t = 1 noise) SiT's ``v`` is ``-u`` of ours and ``ds = -h`` for a
step ``h = t_next - t < 0``, so ``x += (u - w score) h + sqrt(2 w |h|) z``. ``w`` forms, written with SiT's
``alpha`` (data) and ``sigma`` (noise) coefficients and ``s = 1 - t``:

- ``constant``: ``norm``; ``SBDM``: ``norm (alpha'/alpha sigma^2 - sigma sigma')`` (infinite at pure noise);
- ``sigma``: ``norm sigma`` (SiT's and REPA's choice; REPA's ``2t`` diffusion is ``2 w`` with ``w = t``);
- ``linear``: ``norm (1 - s)``; ``decreasing``: ``(norm cos(pi s) + 1)^2 / 4``;
  ``increasing-decreasing``: ``norm sin(pi s)^2`` (SiT lists it but misspells its key, so there it errors).

The grid ends with a last step from ``last_step_size`` to 0: ``mean`` (the drift without noise, SiT's default),
``euler`` (the velocity only), ``tweedie`` (``E[x0 | x]``) or ``none`` (plain Euler-Maruyama to 0).
SiT's "Heun" SDE variant is not offered.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

from ditlab.diffusion.steppers import Stepper, row_noise

DIFFUSIONS = ("constant", "SBDM", "sigma", "linear", "decreasing", "increasing-decreasing")
LAST_STEPS = ("mean", "euler", "tweedie", "none")


@dataclass
class SDEConfig:
    """The SDE sampler's settings (``sampler: sde``); the defaults are SiT's and REPA's evaluation sampler.

    Args:
        diffusion: the diffusion coefficient ``w``: constant | SBDM | sigma | linear | decreasing |
            increasing-decreasing.
        norm: its magnitude (SiT's ``--diffusion-norm``).
        last_step: mean | euler | tweedie | none: the final step, from ``last_step_size`` to the data.
        last_step_size: where Euler-Maruyama stops on the ``sit`` grid (SiT's 0.04); an explicit time grid's
            last interval is the last step instead.
    """

    diffusion: Literal["constant", "SBDM", "sigma", "linear", "decreasing", "increasing-decreasing"] = "sigma"
    norm: float = 1.0
    last_step: Literal["mean", "euler", "tweedie", "none"] = "mean"
    last_step_size: float = 0.04

    def __post_init__(self) -> None:
        if self.diffusion not in DIFFUSIONS:
            raise ValueError(f"unknown sde.diffusion {self.diffusion!r}; choices: {list(DIFFUSIONS)}")
        if self.last_step not in LAST_STEPS:
            raise ValueError(f"unknown sde.last_step {self.last_step!r}; choices: {list(LAST_STEPS)}")
        if self.last_step != "none" and not 0 < self.last_step_size < 1:
            raise ValueError(f"sde.last_step_size={self.last_step_size} must lie in (0, 1)")

    @property
    def stop(self) -> float:
        """Where the ``sit`` grid's Euler-Maruyama steps stop (0 when there is no separate last step)."""
        return 0.0 if self.last_step == "none" else self.last_step_size


def diffusion_coefficient(objective, form: str, norm: float, t: float) -> float:
    """``w`` at ditlab time ``t`` for a ``FlowMatching`` path (see the module docstring)."""
    a, s, da, ds = (c.item() for c in objective.coefficients(torch.tensor(t, dtype=torch.float64)))
    sit_time = 1.0 - t
    if form == "SBDM":
        if a == 0:
            raise ValueError("sde.diffusion 'SBDM' is infinite at pure noise (t = 1); start an explicit time_grid below 1")
        return norm * (s * ds - da * s**2 / a)  # SiT's alpha'/alpha sigma^2 - sigma sigma' with d/ds = -d/dt
    return {"constant": norm, "sigma": norm * s, "linear": norm * (1.0 - sit_time),
            "decreasing": 0.25 * (norm * math.cos(math.pi * sit_time) + 1.0) ** 2,
            "increasing-decreasing": norm * math.sin(math.pi * sit_time) ** 2}[form]  # fmt: skip


class EulerMaruyama(Stepper):
    """SiT's SDE sampler over ``grid`` (descending, ending at 0): one model call per interval."""

    def __init__(self, objective, grid: torch.Tensor, config: SDEConfig) -> None:
        self.objective, self.config = objective, config
        self.grid = grid.tolist()
        self.times = grid[:-1].float()

    def step(self, output, index, sample, generator=None):
        t, size = self.grid[index], self.grid[index + 1] - self.grid[index]
        last = index == len(self.grid) - 2 and self.config.last_step != "none"
        if last and self.config.last_step == "euler":
            return sample + size * output
        score = self.objective.score_from_velocity(output, sample, t)
        if last and self.config.last_step == "tweedie":
            a, s, _, _ = (c.item() for c in self.objective.coefficients(torch.tensor(t, dtype=torch.float64)))
            return (sample + s**2 * score) / a
        w = diffusion_coefficient(self.objective, self.config.diffusion, self.config.norm, t)
        mean = sample + size * (output - w * score)
        if last:  # "mean": the drift of the last step, without its noise
            return mean
        return mean + math.sqrt(2.0 * w * abs(size)) * row_noise(sample, generator)
