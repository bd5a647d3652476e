"""One small interface for every fixed-step sampler, so the sampling loop (``ditlab.diffusion.sample``) is the
same for diffusers' schedulers and for ditlab's own steps (DDIM on any grid, SiT's Heun and SDE).

A stepper is made for one trajectory. It lists the objective time of every model call, in call order
(``times``; a two-stage method lists both of its calls), and moves the sample with each call's output
(``step``); a multi-stage method keeps its intermediate state on itself between calls.
"""

from __future__ import annotations

import torch


class Stepper:
    """Base class: ``times`` (objective times of the model calls) and ``step``; ``uses_variance`` when the step
    reads a learned variance from the output's extra channels (DDPM), otherwise it gets the first C only."""

    times: torch.Tensor
    uses_variance: bool = False

    def initial(self, noise: torch.Tensor) -> torch.Tensor:
        """The starting sample for unit-variance ``noise`` (itself unless a scheduler scales it)."""
        return noise

    def model_input(self, sample: torch.Tensor, index: int) -> torch.Tensor:
        """What the network is given at call ``index`` (the sample itself unless a scheduler rescales it)."""
        return sample

    def step(self, output: torch.Tensor, index: int, sample: torch.Tensor,
             generator: torch.Generator | list[torch.Generator] | None = None) -> torch.Tensor:  # fmt: skip
        """The sample after call ``index``, whose (guided) network output is ``output``."""
        raise NotImplementedError


class DiffusersStepper(Stepper):
    """A diffusers scheduler whose timesteps are already set; ``objective`` maps its timesteps to objective time."""

    def __init__(self, scheduler, objective) -> None:
        from diffusers import DDIMScheduler, DDPMScheduler

        self.scheduler = scheduler
        self.times = torch.stack([torch.as_tensor(objective.scheduler_time(timestep, scheduler))
                                  for timestep in scheduler.timesteps])  # fmt: skip
        self.uses_variance = getattr(scheduler.config, "variance_type", None) == "learned_range"
        self.takes_generator = isinstance(scheduler, DDPMScheduler | DDIMScheduler)

    def initial(self, noise: torch.Tensor) -> torch.Tensor:
        return noise * getattr(self.scheduler, "init_noise_sigma", 1.0)

    def model_input(self, sample: torch.Tensor, index: int) -> torch.Tensor:
        scale = getattr(self.scheduler, "scale_model_input", None)
        return scale(sample, self.scheduler.timesteps[index]) if scale is not None else sample

    def step(self, output, index, sample, generator=None):
        options = {"generator": generator} if self.takes_generator else {}
        return self.scheduler.step(output, self.scheduler.timesteps[index], sample, **options).prev_sample


def row_noise(like: torch.Tensor, generator: torch.Generator | list[torch.Generator] | None) -> torch.Tensor:
    """Standard normal noise shaped like ``like``; a list of generators draws row ``i`` from generator ``i``, so a
    sample's noise does not depend on the batch it is drawn in."""
    if isinstance(generator, list | tuple):
        return torch.stack([torch.randn(like.shape[1:], generator=g, device=g.device, dtype=like.dtype)
                            for g in generator]).to(like.device)  # fmt: skip
    if generator is None:
        return torch.randn_like(like)
    return torch.randn(like.shape, generator=generator, device=generator.device, dtype=like.dtype).to(like.device)
