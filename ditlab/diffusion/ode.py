"""Probability-flow ODE solvers for the flow objective beyond diffusers' schedulers, as SiT runs them (Ma et al.
2024, ``transport/integrators.py``: torchdiffeq's ``odeint`` on ``linspace(0, 1, N)``).

- :class:`HeunGrid`: Heun's method (explicit trapezoid, torchdiffeq's ``heun2``) on a fixed grid, two model calls
  per step at both ends of the step, the last step included. diffusers' ``FlowMatchHeunDiscreteScheduler`` instead
  takes an Euler last step (Karras et al.), so it cannot reproduce SiT's Heun.
- :func:`integrate_adaptive`: an adaptive Runge-Kutta solver of torchdiffeq (``dopri5``, SiT's default, with its
  ``atol=1e-6, rtol=1e-3``), integrating from t = 1 (noise) to 0 (data). The model is called as often as the
  error control asks, several times per accepted step (dopri5: 6 per step after the first, plus rejected steps),
  so a sampler-time method cannot plan its calls in advance; the count is reported (``stats``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ditlab.diffusion.steppers import Stepper

ADAPTIVE_SOLVERS = ("dopri5", "dopri8", "bosh3", "adaptive_heun", "fehlberg2")
"""torchdiffeq's adaptive-step methods (SiT's ``--sampling-method`` names)."""


class HeunGrid(Stepper):
    """Heun's method on ``grid`` (descending float64 times, ending at 0): calls at ``t_k`` and ``t_{k+1}``."""

    def __init__(self, grid: torch.Tensor) -> None:
        self.grid = grid.tolist()
        self.times = torch.stack([grid[:-1], grid[1:]], dim=1).flatten().float()

    def step(self, output, index, sample, generator=None):
        step, corrector = divmod(index, 2)
        size = self.grid[step + 1] - self.grid[step]
        if not corrector:
            self.start, self.slope = sample, output
            return sample + size * output  # the Euler predictor: where the second call is made
        return self.start + 0.5 * size * (self.slope + output)


def integrate_adaptive(velocity: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], sample: torch.Tensor,
                       method: str = "dopri5", atol: float = 1e-6, rtol: float = 1e-3) -> torch.Tensor:  # fmt: skip
    """``sample`` (at t = 1) integrated along ``dx/dt = velocity(x, t)`` to t = 0 by torchdiffeq's ``method``."""
    try:
        from torchdiffeq import odeint
    except ImportError:
        raise ImportError(f"sampler {method!r} integrates with torchdiffeq, which is not installed: "
                          "pip install torchdiffeq") from None  # fmt: skip
    times = torch.tensor([1.0, 0.0], dtype=sample.dtype, device=sample.device)
    return odeint(lambda t, x: velocity(x, t), sample, times, method=method, atol=atol, rtol=rtol)[-1]
