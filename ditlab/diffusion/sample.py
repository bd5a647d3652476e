"""Sampling loops on diffusers schedulers, with classifier-free guidance, seeded and batched.

The loop calls a *model function* ``model(x, t, y) -> output`` (a DiT is one; so is a feature cache or a
learned router wrapped around one): it applies guidance itself (``ditlab.diffusion.guidance``), asks the
objective for the network's time (``objective.model_time``) and its schedulers, and calls
``model.reset()``, when the model function has one, at the start of every trajectory, so a stateful
sampler-time method starts each batch of samples from an empty state.

Gaussian objective: DDPM (ancestral, with the learned variance when the network has it), DDIM and
DPM-Solver++. Flow objective: Euler and Heun flow-matching schedulers, which integrate ``dx/dt`` from
t=1 (noise) to t=0 (data) in ditlab's convention; they step in ``t`` generically, so they also sample the
GVP path. Every sample's noise comes from ``seed + index`` so results do not depend on batch size or on
how many processes share the work.
"""

from __future__ import annotations

import torch
from diffusers import DDIMScheduler, DDPMScheduler
from rich.progress import Progress

from ditlab.diffusion.guidance import ModelFunction, guided_output

ANCESTRAL_SEED = 1 << 32  # DDPM's per-sample noise stream for sample i is seeded ANCESTRAL_SEED + seed + i


def default_sampler(objective) -> str:
    return objective.default_sampler


def make_scheduler(objective, sampler: str):
    """The diffusers scheduler that integrates ``objective`` with ``sampler``."""
    return objective.scheduler(sampler)


def seeded_noise(shape: tuple[int, ...], seed: int, start: int = 0) -> torch.Tensor:
    """Noise for samples ``start .. start+shape[0]-1``, each from its own seed ``seed + index``."""
    return torch.stack(
        [torch.randn(shape[1:], generator=torch.Generator().manual_seed(seed + start + i)) for i in range(shape[0])]
    )


def null_label_of(model: ModelFunction) -> int | None:
    """The guidance null class of a DiT-like model function (its ``config.num_classes``), else None."""
    config = getattr(model, "config", None)
    return getattr(config, "num_classes", None)


@torch.no_grad()
def denoise(
    model: ModelFunction,
    objective,
    noise: torch.Tensor,
    labels: torch.Tensor,
    steps: int = 50,
    sampler: str | None = None,
    cfg_scale: float = 1.0,
    cfg_channels: int | None = None,
    null_label: int | None = None,
    generator: torch.Generator | list[torch.Generator] | None = None,
    progress: Progress | None = None,
) -> torch.Tensor:
    """Integrate one trajectory from ``noise: (B, C, H, W)`` to data for class ``labels: (B,)``.

    ``null_label`` (the unconditional class for guidance) defaults to ``model.config.num_classes``.
    ``generator`` drives the ancestral noise of DDPM (other samplers are deterministic); a list gives
    one generator per sample.
    """
    scheduler = objective.scheduler(sampler or objective.default_sampler)
    scheduler.set_timesteps(steps, device=noise.device)
    if cfg_scale != 1.0:
        null_label = null_label if null_label is not None else null_label_of(model)
        if null_label is None:
            raise ValueError("guidance (cfg_scale != 1) needs the null class: pass null_label= for this model function")
    reset = getattr(model, "reset", None)
    if callable(reset):
        reset()
    channels = noise.shape[1]
    sample = noise * getattr(scheduler, "init_noise_sigma", 1.0)
    learned_variance = getattr(scheduler.config, "variance_type", None) == "learned_range"
    step_kwargs = {"generator": generator} if isinstance(scheduler, DDPMScheduler | DDIMScheduler) else {}
    task = progress.add_task("denoising", total=len(scheduler.timesteps)) if progress else None
    for timestep in scheduler.timesteps:
        model_input = scheduler.scale_model_input(sample, timestep) if hasattr(scheduler, "scale_model_input") else sample
        model_t = objective.model_time(objective.scheduler_time(timestep, scheduler)).expand(sample.shape[0])
        if cfg_scale == 1.0:
            output = model(model_input, model_t, labels)
        else:
            output = guided_output(model, model_input, model_t, labels, null_label, cfg_scale, cfg_channels)
        output = output if learned_variance else output[:, :channels]
        sample = scheduler.step(output, timestep, sample, **step_kwargs).prev_sample
        if progress:
            progress.advance(task)
    if progress:
        progress.remove_task(task)
    return sample


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
            # one ancestral-noise stream per sample (seeds far from the initial-noise seeds), so DDPM is
            # batch-size independent too; diffusers' schedulers accept a list of generators, one per row
            generators = [torch.Generator(device=device).manual_seed(ANCESTRAL_SEED + seed + start + offset + i)
                          for i in range(len(chunk))]  # fmt: skip
            outputs.append(
                denoise(model, objective, noise, chunk, generator=generators,
                        progress=progress if show_progress else None, **denoise_kwargs).cpu()
            )  # fmt: skip
            progress.advance(overall, len(chunk))
    return torch.cat(outputs) if outputs else torch.empty(0, *shape)
