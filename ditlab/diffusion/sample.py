"""Sampling loops with classifier-free guidance, seeded and batched, on the time grids and solvers of the papers.

The loop calls a *model function* ``model(x, t, y) -> output`` (a DiT is one; so is a feature cache or a
learned router wrapped around one) once per step of a :class:`~ditlab.diffusion.trajectory.Trajectory`, which
owns the stepper, the network time, guidance (``ditlab.diffusion.guidance``) and the call count; the loop
calls ``model.reset()``, when the model function has one, at the start of every trajectory, so a stateful
sampler-time method starts each batch of samples from an empty state. With guidance both CFG branches ride in
one call as ``[cond; uncond]``; outside a ``guidance_interval`` the call has the conditional rows only.

Model calls per trajectory: one per step for DDPM, DDIM, DPM-Solver++, Euler and the SDE; two per step for
Heun (diffusers' Heun makes one on its last step); as many as the error control needs for the adaptive
solvers (``dopri5``, ...), so :func:`model_call_times` can list the calls of every sampler but those.

Gaussian objective: DDPM (ancestral, with the learned variance when the network has it), DDIM and
DPM-Solver++, on diffusers' spacings or the public DiT's respacing (``time_grid: dit``). Flow objective:
Euler and Heun, SiT's SDE, and torchdiffeq's adaptive solvers, integrating from t=1 (noise) to t=0 (data) in
ditlab's convention; they step in ``t`` generically, so they also sample the GVP path. Time grids:
``ditlab.diffusion.grids``. Every sample's noise comes from ``seed + index`` so results do not depend on batch
size or on how many processes share the work.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from rich.progress import Progress

from ditlab.diffusion.grids import TimeGrid
from ditlab.diffusion.guidance import EMPTY_CAPTION, Guidance, ModelFunction
from ditlab.diffusion.ode import integrate_adaptive
from ditlab.diffusion.sde import SDEConfig
from ditlab.diffusion.trajectory import (
    Trajectory,
    check_sampler,
    check_sampling_options,
    is_adaptive,
    make_stepper,
)

ANCESTRAL_SEED = 1 << 32  # per-step noise (DDPM, SDE) of sample i is seeded ANCESTRAL_SEED + seed + i


def seeded_noise(shape: tuple[int, ...], seed: int, start: int = 0) -> torch.Tensor:
    """Noise for samples ``start .. start+shape[0]-1``, each from its own seed ``seed + index``."""
    return torch.stack(
        [torch.randn(shape[1:], generator=torch.Generator().manual_seed(seed + start + i)) for i in range(shape[0])]
    )


def null_label_of(model: ModelFunction) -> int | str | None:
    """The guidance null condition of a DiT-like model function: its ``config.num_classes`` (the null class), or
    :data:`~ditlab.diffusion.guidance.EMPTY_CAPTION` for a text-conditioned network; else None."""
    config = getattr(model, "config", None)
    if getattr(config, "text_conditioned", False):
        return EMPTY_CAPTION
    return getattr(config, "num_classes", None)


def model_call_times(objective, sampler: str | None = None, steps: int | None = None, time_grid: TimeGrid = None,
                     **options) -> torch.Tensor | None:  # fmt: skip
    """The network time of every model call one trajectory makes, in order (a two-stage solver lists both of its
    calls), built as :func:`denoise` builds its loop; None for an adaptive solver, whose calls are not known ahead."""
    if is_adaptive(sampler):
        return None
    known = {k: v for k, v in options.items() if k in ("ddim_alpha_to_one", "sde")}
    return objective.model_time(make_stepper(objective, sampler, steps, time_grid, **known).times)


@torch.no_grad()
def denoise(
    model: ModelFunction,
    objective,
    noise: torch.Tensor,
    labels: torch.Tensor,
    steps: int | None = None,
    sampler: str | None = None,
    cfg_scale: float = 1.0,
    cfg_channels: int | None = None,
    null_label: int | None = None,
    generator: torch.Generator | list[torch.Generator] | None = None,
    progress: Progress | None = None,
    time_grid: TimeGrid = None,
    guidance_interval: Sequence[float] | None = None,
    ddim_alpha_to_one: bool | None = None,
    sde: SDEConfig | dict | None = None,
    atol: float = 1e-6,
    rtol: float = 1e-3,
    stats: dict | None = None,
) -> torch.Tensor:
    """Integrate one trajectory from ``noise: (B, C, H, W)`` to data for class ``labels: (B,)``.

    ``steps`` (default 50 on a named grid) and ``time_grid`` (``ditlab.diffusion.grids``; None: the
    scheduler's own) fix the schedule of a fixed-step sampler; an adaptive one (``dopri5``, ...) takes ``atol`` and
    ``rtol`` instead and refuses a step count. ``null_label`` (the unconditional class for guidance) defaults to
    ``model.config.num_classes``; ``guidance_interval`` limits guidance to noise levels ``[low, high]``.
    ``generator`` drives the per-step noise of DDPM and the SDE (the others are deterministic); a list gives
    one generator per sample. ``stats``, when given, gets the number of model calls appended to ``stats["nfe"]``.
    """
    sampler = sampler or objective.default_sampler
    if cfg_scale != 1.0 and null_label is None:
        null_label = null_label_of(model)
    check_sampler(objective, sampler)
    check_sampling_options(sampler, steps, time_grid, guidance_interval)
    if is_adaptive(sampler):
        interval = tuple(guidance_interval) if guidance_interval is not None else None
        guidance = Guidance(cfg_scale, cfg_channels, null_label, interval)
        return denoise_adaptive(model, objective, noise, labels, sampler, guidance, atol, rtol, stats)
    trajectory = Trajectory(objective, noise, labels, sampler=sampler, steps=steps, time_grid=time_grid,
                            ddim_alpha_to_one=ddim_alpha_to_one, sde=sde, cfg_scale=cfg_scale,
                            cfg_channels=cfg_channels, null_label=null_label, guidance_interval=guidance_interval,
                            generator=generator)  # fmt: skip
    reset_model(model)
    task = progress.add_task("denoising", total=trajectory.calls) if progress else None
    while not trajectory.done:
        trajectory.step(model(*trajectory.inputs()))
        if progress:
            progress.advance(task)
    if progress:
        progress.remove_task(task)
    if stats is not None:
        stats.setdefault("nfe", []).append(trajectory.nfe)
    return trajectory.x


def denoise_adaptive(model: ModelFunction, objective, noise: torch.Tensor, labels: torch.Tensor, sampler: str,
                     guidance: Guidance, atol: float, rtol: float, stats: dict | None) -> torch.Tensor:  # fmt: skip
    """:func:`denoise` with a torchdiffeq adaptive solver, whose error control picks the calls (no trajectory)."""
    channels, batch, calls = noise.shape[1], noise.shape[0], 0

    def velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        nonlocal calls
        calls += 1
        time = objective.model_time(t).to(x.device).expand(batch)
        return guidance(model, x, time, labels, objective.noise_level(t))[:, :channels]

    reset_model(model)
    sample = integrate_adaptive(velocity, noise, sampler, atol, rtol)
    if stats is not None:
        stats.setdefault("nfe", []).append(calls)
    return sample


def reset_model(model: ModelFunction) -> None:
    """Start a trajectory: ``model.reset()`` when the model function keeps state."""
    reset = getattr(model, "reset", None)
    if callable(reset):
        reset()


def sample_shape(model: ModelFunction) -> tuple[int, int, int]:
    """``(C, H, W)`` of a DiT-like model function's inputs (from its ``config``)."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "in_channels"):
        raise ValueError(f"cannot tell the sample shape of {type(model).__name__}; pass shape=(C, H, W)")
    return (config.in_channels, config.input_size, config.input_size)


def model_device(model: ModelFunction) -> torch.device:
    parameter = next(model.parameters(), None) if hasattr(model, "parameters") else None
    return parameter.device if parameter is not None else torch.device("cpu")


def sample_images(
    model: ModelFunction,
    objective,
    labels: torch.Tensor,
    seed: int = 0,
    start: int = 0,
    batch_size: int = 64,
    show_progress: bool = False,
    shape: tuple[int, int, int] | None = None,
    device: torch.device | str | None = None,
    **denoise_kwargs,
) -> torch.Tensor:
    """Samples for ``labels: (N,)`` in batches (one trajectory each); sample ``i`` uses noise seed
    ``seed + start + i``. ``shape`` ``(C, H, W)`` and ``device`` default to the model's."""
    device = torch.device(device) if device is not None else model_device(model)
    shape = tuple(shape) if shape is not None else sample_shape(model)
    outputs = []
    progress = Progress(transient=True, disable=not show_progress)
    with progress:
        overall = progress.add_task("sampling", total=len(labels))
        for offset in range(0, len(labels), batch_size):
            chunk = labels[offset : offset + batch_size].to(device)
            noise = seeded_noise((len(chunk), *shape), seed, start + offset).to(device)
            # one per-step noise stream per sample (seeds far from the initial-noise seeds), so DDPM and the SDE are
            # batch-size independent too; diffusers' schedulers accept a list of generators, one per row
            generators = [torch.Generator(device=device).manual_seed(ANCESTRAL_SEED + seed + start + offset + i)
                          for i in range(len(chunk))]  # fmt: skip
            outputs.append(
                denoise(model, objective, noise, chunk, generator=generators,
                        progress=progress if show_progress else None, **denoise_kwargs).cpu()
            )  # fmt: skip
            progress.advance(overall, len(chunk))
    return torch.cat(outputs) if outputs else torch.empty(0, *shape)
