"""Sampling time grids: which times a sampler visits, from noise down to data, named after the code that uses them.

Gaussian objective (integer DDPM steps ``0..T-1``, the model is called at each listed step, the last one lands on
the data):

- ``dit``: the public DiT's respacing (``create_diffusion(str(N))`` -> ``space_timesteps(T, "N")`` of
  facebookresearch/DiT ``diffusion/respace.py``, from ADM): ``N`` steps with a fractional stride ``(T-1)/(N-1)``
  accumulated from 0 and rounded half to even, so both ends ``0`` and ``T-1`` are always visited
  ({0, 42, ..., 957, 999} for 25 steps of 1000). This is DiT's "250 DDPM steps" of FID 2.27.
- ``dit-ddim``: the same file's ``"ddimN"`` form, the integer stride of the DDIM paper: the smallest stride ``s``
  with ``len(range(0, T, s)) == N`` (an error if there is none).
- ``leading`` / ``linspace`` / ``trailing``: diffusers' ``timestep_spacing`` choices, built by diffusers itself.
- a list of ints: those steps, strictly decreasing within ``[0, T-1]``.

Flow objective (continuous ``t`` in ``[0, 1]``, ditlab's convention: 1 is noise; the grid lists every time point,
both ends included):

- ``sit``: SiT's ``torch.linspace(0, 1, N)`` in SiT's time (``transport/integrators.py``), i.e. ``1 - k/(N-1)``
  here. As in SiT, ``N`` counts grid *points*: Euler takes ``N - 1`` steps. The SDE's grid stops at the last
  step size ``d`` (SiT's ``linspace(0, 1 - d, N)``) and its last step jumps from ``d`` to 0.
- ``shift:S`` (e.g. ``shift:3.0``): SD3's shifted grid (Esser et al., 2024: ``t' = S t / (1 + (S - 1) t)``, more
  steps at high noise), built by diffusers' ``FlowMatchEulerDiscreteScheduler(shift=S)`` itself, so ditlab samples
  what the SD3 pipeline samples; ``shift:1`` is the default grid.
- a list of floats: those times, strictly decreasing from at most 1 down to exactly 0.

``None`` keeps each diffusers scheduler's own grid (DDPM/DDIM ``leading``, DPM-Solver++ ``linspace``, flow Euler
and Heun ``linspace(1, 1/1000, N)`` then 0): ditlab's default before these grids existed.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

DIFFUSERS_SPACINGS = ("leading", "linspace", "trailing")
GAUSSIAN_GRIDS = ("dit", "dit-ddim", *DIFFUSERS_SPACINGS)
FLOW_GRIDS = ("sit",)

TimeGrid = str | Sequence[float] | None


def dit_respacing(num_timesteps: int, count: int) -> list[int]:
    """The public DiT's ``count`` retained steps of ``num_timesteps`` (one section), ascending."""
    if not 1 <= count <= num_timesteps:
        raise ValueError(f"the dit grid takes 1 to {num_timesteps} steps, not steps={count}")
    stride = (num_timesteps - 1) / (count - 1) if count > 1 else 1.0
    taken, position = [], 0.0
    for _ in range(count):
        taken.append(round(position))  # Python's round: half to even, as in the public code
        position += stride  # accumulated, not multiplied: the public grid's exact float path
    return taken


def ddim_striding(num_timesteps: int, count: int) -> list[int]:
    """The DDIM paper's integer-stride grid (DiT's ``"ddimN"``): ``range(0, T, s)`` with exactly ``count`` steps."""
    for stride in range(1, num_timesteps):
        if len(range(0, num_timesteps, stride)) == count:
            return list(range(0, num_timesteps, stride))
    raise ValueError(f"no integer stride gives exactly steps={count} of {num_timesteps} (time_grid 'dit-ddim'); "
                     "use time_grid 'dit' or another step count")  # fmt: skip


def is_named(time_grid: TimeGrid) -> bool:
    return time_grid is None or isinstance(time_grid, str)


def check_time_grid(time_grid: TimeGrid) -> None:
    """One-line errors for a grid no objective accepts (an unknown name, a list that is not strictly decreasing)."""
    if time_grid is None:
        return
    if isinstance(time_grid, str):
        if time_grid.startswith("shift:"):
            time_shift(time_grid)
            return
        if time_grid not in (*GAUSSIAN_GRIDS, *FLOW_GRIDS):
            raise ValueError(f"unknown time_grid {time_grid!r}; choices: {[*GAUSSIAN_GRIDS, *FLOW_GRIDS]} "
                             "'shift:S' (flow) or a list of times from noise to data")  # fmt: skip
        return
    values = list(time_grid)
    if len(values) < 1 or any(later >= earlier for earlier, later in zip(values, values[1:])):
        raise ValueError(f"time_grid {values} must be strictly decreasing (noise first, data last)")


def time_shift(time_grid: str) -> float:
    """``S`` of a ``shift:S`` grid name (one line unless a positive number)."""
    try:
        value = float(time_grid.removeprefix("shift:"))
    except ValueError:
        value = float("nan")
    if not value > 0:
        raise ValueError(f"time_grid {time_grid!r}: the shift must be a positive number, e.g. shift:3.0 (SD3)")
    return value


def gaussian_grid(time_grid: TimeGrid, steps: int | None, num_timesteps: int) -> list[int] | None:
    """The descending DDPM steps of ``time_grid``; None for diffusers' own spacings (built by the scheduler)."""
    check_time_grid(time_grid)
    if time_grid is None or time_grid in DIFFUSERS_SPACINGS:
        return None
    if isinstance(time_grid, str):
        if time_grid not in GAUSSIAN_GRIDS:
            raise ValueError(f"time_grid {time_grid!r} is for the flow objective; the Gaussian objective takes "
                             f"{list(GAUSSIAN_GRIDS)} or a list of steps")  # fmt: skip
        steps = steps_of(time_grid, steps)
        chosen = dit_respacing(num_timesteps, steps) if time_grid == "dit" else ddim_striding(num_timesteps, steps)
        return chosen[::-1]
    values = list(time_grid)
    if any(int(v) != v for v in values) or values[0] > num_timesteps - 1 or values[-1] < 0:
        raise ValueError(f"time_grid {values} must list whole DDPM steps within [0, {num_timesteps - 1}]")
    check_count(values, steps)
    return [int(v) for v in values]


def flow_grid(time_grid: TimeGrid, steps: int | None, end: float = 0.0) -> torch.Tensor:
    """Descending float64 time points of ``time_grid`` (``sit`` or a list), noise first, ending at 0.

    ``end`` > 0 makes the ``sit`` grid stop there (SiT's SDE stops at its last step size) and appends 0.
    """
    check_time_grid(time_grid)
    if isinstance(time_grid, str) and time_grid.startswith("shift:"):
        from diffusers import FlowMatchEulerDiscreteScheduler

        if steps is None or steps < 1:
            raise ValueError(f"time_grid {time_grid!r} needs a step count (steps={steps})")
        scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=time_shift(time_grid))
        scheduler.set_timesteps(steps)
        return scheduler.sigmas.double()
    if isinstance(time_grid, str):
        if time_grid not in FLOW_GRIDS:
            raise ValueError(f"time_grid {time_grid!r} is for the Gaussian objective; the flow objective takes "
                             f"{list(FLOW_GRIDS)} or a list of times")  # fmt: skip
        points = steps_of(time_grid, steps)
        if points < 2:
            raise ValueError(f"the sit grid needs at least 2 points (steps={points}); SiT's steps count grid points")
        sit_time = torch.linspace(0.0, 1.0 - end, points, dtype=torch.float64)
        grid = 1.0 - sit_time
        return torch.cat([grid, grid.new_zeros(1)]) if end > 0 else grid
    values = [float(v) for v in time_grid]
    if values[0] > 1 or values[-1] != 0 or len(values) < 2:
        raise ValueError(f"time_grid {values} must run from at most 1 (noise) down to exactly 0 (data)")
    check_count(values, steps)
    return torch.tensor(values, dtype=torch.float64)


def steps_of(name: str, steps: int | None) -> int:
    if steps is None:
        raise ValueError(f"time_grid {name!r} needs a step count; set steps")
    return int(steps)


def check_count(values: Sequence[float], steps: int | None) -> None:
    """An explicit grid fixes ``steps`` (its length, as for the named grids): None or its length."""
    if steps is not None and steps != len(values):
        raise ValueError(f"time_grid lists {len(values)} times but steps={steps}; set steps to {len(values)} or null")
