"""Interpolant objectives for SiT (Ma et al., "SiT: Exploring Flow and Diffusion-based Generative
Models with Scalable Interpolant Transformers", 2024).

In ditlab's convention (t=0 data, t=1 noise): linear ``x_t = (1-t) x0 + t eps`` and GVP
``x_t = cos(pi t / 2) x0 + sin(pi t / 2) eps``. The network regresses the velocity ``dx_t/dt``; for the
linear path that is ``eps - x0``, the same quantity diffusers' flow-matching schedulers integrate, so
they sample this objective directly. A learned-sigma network's extra channels are ignored, as in SiT.
"""

from __future__ import annotations

import math

import torch

from ditlab.diffusion.gaussian import Noised, mean_flat
from ditlab.diffusion.global_batch import draw_rows
from ditlab.diffusion.grids import TimeGrid, flow_grid
from ditlab.diffusion.ode import ADAPTIVE_SOLVERS, HeunGrid
from ditlab.diffusion.sde import EulerMaruyama, SDEConfig
from ditlab.diffusion.steppers import DiffusersStepper, Stepper

PATHS = ("linear", "gvp")
TIME_SAMPLING = ("uniform", "logit_normal")


class FlowMatching:
    """Velocity-prediction interpolant objective with uniform or logit-normal time sampling."""

    kind = "flow"

    def __init__(
        self,
        path: str = "linear",
        time_sampling: str = "uniform",
        logit_mean: float = 0.0,
        logit_std: float = 1.0,
        t_eps: float = 0.0,
        t_scale: float = 1.0,
    ) -> None:
        if path not in PATHS:
            raise ValueError(f"unknown interpolant path {path!r}; choices: {list(PATHS)}")
        if time_sampling not in TIME_SAMPLING:
            raise ValueError(f"unknown time_sampling {time_sampling!r}; choices: {list(TIME_SAMPLING)}")
        self.path = path
        self.time_sampling = time_sampling
        self.logit_mean, self.logit_std = logit_mean, logit_std
        self.t_eps = t_eps
        self.t_scale = t_scale
        self.learn_sigma = False

    def coefficients(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(a, s, da/dt, ds/dt)`` at ``t``: data and noise coefficients and their derivatives."""
        if self.path == "linear":
            return 1 - t, t, -torch.ones_like(t), torch.ones_like(t)
        angle = 0.5 * math.pi * t
        return torch.cos(angle), torch.sin(angle), -0.5 * math.pi * torch.sin(angle), 0.5 * math.pi * torch.cos(angle)

    def sample_time(self, batch: int, device: torch.device, generator: torch.Generator | None = None) -> torch.Tensor:
        if self.time_sampling == "uniform":
            t = torch.rand(batch, device=device, generator=generator)
        else:
            normal = torch.randn(batch, device=device, generator=generator)
            t = torch.sigmoid(self.logit_mean + self.logit_std * normal)
        return self.t_eps + (1 - 2 * self.t_eps) * t

    def prepare(self, x0: torch.Tensor, generator: torch.Generator | None = None, rank: int = 0,
                world_size: int = 1) -> Noised:  # fmt: skip
        """Draw ``t`` and noise (this process's rows of the global batch's draws) and return the noisy input."""
        batch, device = x0.shape[0], x0.device
        t = draw_rows(lambda n: self.sample_time(n, device, generator), batch, rank, world_size)
        noise = draw_rows(lambda n: torch.randn((n, *x0.shape[1:]), device=device, dtype=x0.dtype, generator=generator),
                          batch, rank, world_size)  # fmt: skip
        return Noised(xt=self.add_noise(x0, t, noise), t=t, model_t=self.model_time(t), noise=noise)

    # ----------------------------------------------------------------------------------- time convention
    samplers = ("euler", "heun", "sde", *ADAPTIVE_SOLVERS)
    default_sampler = "euler"

    def model_time(self, t: torch.Tensor) -> torch.Tensor:
        """What the network is given for time ``t`` in [0, 1]: ``t * t_scale`` (REPA/SiT-style 1000 or 1)."""
        return t * self.t_scale

    def noise_level(self, t: torch.Tensor | float) -> float:
        """Where ``t`` lies between data (0) and noise (1): ``t`` itself (guidance intervals use it)."""
        return float(t)

    def time_at(self, fractions: torch.Tensor) -> torch.Tensor:
        """Objective times at ``fractions`` in (0, 1) of the noise range: the fractions themselves."""
        return fractions.float()

    def scheduler(self, sampler: str):
        """The diffusers flow-matching scheduler for ``sampler``; it steps in ``t`` generically (any path)."""
        from diffusers import FlowMatchEulerDiscreteScheduler, FlowMatchHeunDiscreteScheduler

        if sampler in self.samplers[2:]:
            raise ValueError(f"sampler {sampler!r} is ditlab's own and has no diffusers scheduler; use stepper()")
        if sampler not in ("euler", "heun"):
            raise ValueError(f"sampler {sampler!r} does not apply to the flow objective; choices: ['euler', 'heun'] "
                             f"with diffusers schedulers, {list(self.samplers[2:])} without")  # fmt: skip
        scheduler = FlowMatchEulerDiscreteScheduler if sampler == "euler" else FlowMatchHeunDiscreteScheduler
        return scheduler(num_train_timesteps=1000, shift=1.0)

    def scheduler_time(self, timestep: torch.Tensor, scheduler) -> torch.Tensor:
        """The objective time of a diffusers flow timestep (``sigma * num_train_timesteps``, sigma = t here)."""
        return timestep.float() / scheduler.config.num_train_timesteps

    def stepper(self, sampler: str, steps: int | None, time_grid: TimeGrid = None, sde: SDEConfig | dict | None = None,
                **_) -> Stepper:  # fmt: skip
        """``sampler`` on ``time_grid`` (``ditlab.diffusion.grids``). Euler: diffusers' scheduler (``sigmas=`` for
        a grid); Heun: diffusers' on its own grid, SiT's (:class:`~ditlab.diffusion.ode.HeunGrid`) on a ditlab grid;
        ``sde``: SiT's Euler-Maruyama (:mod:`ditlab.diffusion.sde`), on the ``sit`` grid unless a list is given.
        Adaptive solvers have no fixed steps (``ditlab.diffusion.ode.integrate_adaptive``)."""
        if sampler not in self.samplers:
            raise ValueError(f"sampler {sampler!r} does not apply to the flow objective; choices: {list(self.samplers)}")
        if sampler in ADAPTIVE_SOLVERS:
            raise ValueError(f"sampler {sampler!r} is adaptive: it has no fixed steps")
        if sampler == "sde":
            config = SDEConfig(**sde) if isinstance(sde, dict) else sde or SDEConfig()
            return EulerMaruyama(self, flow_grid(time_grid or "sit", steps, end=config.stop), config)
        if time_grid is not None:
            grid = flow_grid(time_grid, steps)
            if sampler == "heun":
                return HeunGrid(grid)
            scheduler = self.scheduler("euler")
            scheduler.set_timesteps(sigmas=grid[:-1].tolist())
            return DiffusersStepper(scheduler, self)
        scheduler = self.scheduler(sampler)
        scheduler.set_timesteps(steps)
        return DiffusersStepper(scheduler, self)

    def score_from_velocity(self, velocity: torch.Tensor, xt: torch.Tensor, t: float) -> torch.Tensor:
        """The score ``grad log p_t(x_t)`` implied by the velocity ``u = a' x0 + s' eps`` at time ``t`` (a float):
        solving ``x_t = a x0 + s eps`` and ``u`` for ``eps`` gives ``eps = (a u - a' x_t) / (a s' - a' s)``, and the
        score is ``-eps / s`` (SiT's ``get_score_from_velocity``, in ditlab's time)."""
        a, s, da, ds = (c.item() for c in self.coefficients(torch.tensor(t, dtype=torch.float64)))
        eps = (a * velocity - da * xt) / (a * ds - da * s)
        return -eps / s

    def add_noise(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        a, s, _, _ = (c.view(-1, *([1] * (x0.ndim - 1))).to(x0.dtype) for c in self.coefficients(t))
        return a * x0 + s * noise

    def target(self, x0: torch.Tensor, noised: Noised) -> torch.Tensor:
        _, _, da, ds = (c.view(-1, *([1] * (x0.ndim - 1))).to(x0.dtype) for c in self.coefficients(noised.t))
        return da * x0 + ds * noised.noise

    def losses(self, output: torch.Tensor, x0: torch.Tensor, noised: Noised) -> dict[str, torch.Tensor]:
        velocity = output[:, : x0.shape[1]]
        loss = mean_flat((velocity - self.target(x0, noised)) ** 2).mean()
        return {"loss_diffusion": loss, "loss": loss}
