"""One batch of samples on its way from noise to data, stepped one model call at a time.

Everything around a model call lives here once: the stepper built through the objective (sampler, steps, time
grid, DDIM's last step, the SDE), the network time of each call, the guidance rows (``[cond; uncond]`` inside the
guidance interval, the conditional rows alone outside it), the guidance formula, the per-sample noise generators
of the stochastic samplers and the count of model calls. :func:`ditlab.diffusion.sample.denoise` is a loop over
it, and every sampling-time method that must see the trajectory call by call (a learned router in training, ILF's
feedback block, REG's extra token) steps the same object, so each follows every grid, SDE and interval the
sampler does::

    trajectory = Trajectory(objective, noise, labels, sampler="ddim", steps=20, cfg_scale=1.5, null_label=1000)
    while not trajectory.done:
        trajectory.step(model(*trajectory.inputs()))

Adaptive solvers (``dopri5``, ...) choose their calls by error control, so they have no trajectory to step.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ditlab.diffusion.grids import TimeGrid, check_time_grid, is_named
from ditlab.diffusion.guidance import Guidance, check_guidance_interval, combine, guidance_rows
from ditlab.diffusion.ode import ADAPTIVE_SOLVERS
from ditlab.diffusion.sde import SDEConfig
from ditlab.diffusion.steppers import Stepper

Generators = torch.Generator | list[torch.Generator] | None
DEFAULT_STEPS = 50  # fixed-step samplers on a named grid when steps is None
OPTIONS = ("sampler", "steps", "time_grid", "ddim_alpha_to_one", "sde", "cfg_scale", "cfg_channels", "guidance_interval")
"""The ``SamplingConfig`` fields that shape a trajectory (the rest: batching, adaptive tolerances, the cache)."""


def trajectory_options(sampling, **overrides) -> dict:
    """The :data:`OPTIONS` of a ``SamplingConfig`` as :class:`Trajectory` keywords, ``overrides`` on top."""
    return {**{name: getattr(sampling, name) for name in OPTIONS}, **overrides}


def is_adaptive(sampler: str | None) -> bool:
    return sampler in ADAPTIVE_SOLVERS


def check_sampler(objective, sampler: str) -> None:
    if sampler not in objective.samplers:
        name = "Gaussian" if objective.kind == "gaussian" else objective.kind
        raise ValueError(f"sampler {sampler!r} does not apply to the {name} objective; choices: {list(objective.samplers)}")


def check_sampling_options(sampler: str | None, steps: int | None, time_grid: TimeGrid,
                           guidance_interval: Sequence[float] | None = None) -> None:  # fmt: skip
    """One-line errors for settings no objective accepts, checked as soon as a config is made."""
    check_time_grid(time_grid)
    check_guidance_interval(guidance_interval)
    if is_adaptive(sampler) and (steps is not None or time_grid not in (None, "sit")):
        raise ValueError(f"sampler {sampler!r} is adaptive: atol/rtol set its steps, so it takes steps: null and no "
                         f"time grid (got steps={steps}, time_grid={time_grid!r})")  # fmt: skip


def make_stepper(objective, sampler: str | None = None, steps: int | None = None, time_grid: TimeGrid = None,
                 ddim_alpha_to_one: bool | None = None, sde: SDEConfig | dict | None = None) -> Stepper:  # fmt: skip
    """The fixed-step stepper of ``sampler`` (default: the objective's) on ``time_grid`` for one trajectory."""
    sampler = sampler or objective.default_sampler
    check_sampler(objective, sampler)
    check_time_grid(time_grid)
    if is_adaptive(sampler):
        raise ValueError(f"sampler {sampler!r} is adaptive (atol/rtol decide its steps), so it has no fixed schedule")
    if steps is None and is_named(time_grid):
        steps = DEFAULT_STEPS
    return objective.stepper(sampler, steps, time_grid=time_grid, ddim_alpha_to_one=ddim_alpha_to_one, sde=sde)


class Trajectory:
    """The sample ``x`` of ``labels: (B,)`` from ``noise: (B, C, H, W)``, at model call ``index`` of ``calls``.

    The sampling options are those of ``SamplingConfig`` (``ditlab.diffusion.config``); ``null_label`` is needed
    when ``cfg_scale != 1``. ``generator`` drives the per-step noise of DDPM and the SDE (a list: one per sample).
    ``x`` and ``index`` may be set by hand to start mid-way (a sample noised to call ``index``'s time; exact for
    the one-step samplers, DDIM, DDPM, Euler and the SDE, while a multistep one starts its history afresh).
    """

    def __init__(self, objective, noise: torch.Tensor, labels: torch.Tensor, *, sampler: str | None = None,
                 steps: int | None = None, time_grid: TimeGrid = None, ddim_alpha_to_one: bool | None = None,
                 sde: SDEConfig | dict | None = None, cfg_scale: float = 1.0, cfg_channels: int | None = None,
                 null_label: int | None = None, guidance_interval: Sequence[float] | None = None,
                 generator: Generators = None) -> None:  # fmt: skip
        interval = tuple(guidance_interval) if guidance_interval is not None else None
        self.guidance = Guidance(cfg_scale, cfg_channels, null_label, interval)
        sampler = sampler or objective.default_sampler
        check_sampling_options(sampler, steps, time_grid, guidance_interval)
        self.objective, self.sampler, self.labels, self.generator = objective, sampler, labels, generator
        self.stepper = make_stepper(objective, sampler, steps, time_grid, ddim_alpha_to_one, sde)
        self.channels = noise.shape[1]
        self.x = self.stepper.initial(noise)
        self.index = 0
        self.nfe = 0

    @property
    def calls(self) -> int:
        """Model calls in the whole trajectory (a two-stage solver counts both of its calls)."""
        return len(self.stepper.times)

    @property
    def done(self) -> bool:
        return self.index >= self.calls

    @property
    def time(self) -> torch.Tensor:
        """The objective time of this call (network time: ``objective.model_time(time)``)."""
        return self.stepper.times[self.index]

    @property
    def guided(self) -> bool:
        """Whether this call is guided: ``[cond; uncond]`` rows, twice the samples."""
        return self.guidance.applies(self.objective.noise_level(self.time))

    def inputs(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(x, t, y)`` of this model call: the network's input, time and classes, on the guidance rows."""
        x = self.stepper.model_input(self.x, self.index)
        t = self.objective.model_time(self.time).to(x.device).expand(len(x))
        if not self.guided:
            return x, t, self.labels
        return guidance_rows(x, t, self.labels, self.guidance.null_label)

    def rows(self, values: torch.Tensor) -> torch.Tensor:
        """Per-sample ``values`` (first dimension ``B``) repeated for the rows of this call."""
        return torch.cat([values, values]) if self.guided else values

    def step(self, output: torch.Tensor) -> torch.Tensor:
        """Move on with the raw network ``output`` on :meth:`inputs`' rows (guidance is applied here); the new ``x``."""
        if self.guided:
            output = combine(output, self.channels, self.guidance.scale, self.guidance.channels)
        output = output if self.stepper.uses_variance else output[:, : self.channels]
        self.x = self.stepper.step(output, self.index, self.x, self.generator)
        self.index += 1
        self.nfe += 1
        return self.x
