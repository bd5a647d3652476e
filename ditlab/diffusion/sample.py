"""Sampling loops on diffusers schedulers, with classifier-free guidance, seeded and batched.

Gaussian objective: DDPM (ancestral, with the learned variance when the network has it), DDIM and
DPM-Solver++. Flow objective: Euler and Heun flow-matching schedulers, which integrate ``dx/dt`` from
t=1 (noise) to t=0 (data) in ditlab's convention; they step in ``t`` generically, so they also sample the
GVP path. Every sample's noise comes from ``seed + index`` so results do not depend on batch size or on
how many processes share the work.
"""

from __future__ import annotations

import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    FlowMatchEulerDiscreteScheduler,
    FlowMatchHeunDiscreteScheduler,
)
from rich.progress import Progress

from ditlab.diffusion.flow import FlowMatching
from ditlab.diffusion.gaussian import GaussianDiffusion
from ditlab.models.dit import DiT

GAUSSIAN_SAMPLERS = ("ddpm", "ddim", "dpm++")
FLOW_SAMPLERS = ("euler", "heun")
ANCESTRAL_SEED = 1 << 32  # DDPM's per-sample noise stream for sample i is seeded ANCESTRAL_SEED + seed + i


def default_sampler(objective: GaussianDiffusion | FlowMatching) -> str:
    return "ddpm" if objective.kind == "gaussian" else "euler"


def make_scheduler(objective: GaussianDiffusion | FlowMatching, sampler: str):
    """The diffusers scheduler that integrates ``objective`` with ``sampler``."""
    if objective.kind == "gaussian":
        if sampler not in GAUSSIAN_SAMPLERS:
            raise ValueError(f"sampler {sampler!r} does not apply to the Gaussian objective; choices: {list(GAUSSIAN_SAMPLERS)}")
        common = {
            "num_train_timesteps": objective.num_timesteps, "beta_start": objective.beta_start,
            "beta_end": objective.beta_end, "beta_schedule": "linear", "prediction_type": objective.prediction,
        }  # fmt: skip
        if sampler == "ddpm":
            variance = "learned_range" if objective.learn_sigma else "fixed_small"
            return DDPMScheduler(**common, variance_type=variance, clip_sample=False)
        if sampler == "ddim":
            return DDIMScheduler(**common, clip_sample=False, set_alpha_to_one=False)
        return DPMSolverMultistepScheduler(**common, algorithm_type="dpmsolver++")
    if sampler not in FLOW_SAMPLERS:
        raise ValueError(f"sampler {sampler!r} does not apply to the flow objective; choices: {list(FLOW_SAMPLERS)}")
    scheduler = FlowMatchEulerDiscreteScheduler if sampler == "euler" else FlowMatchHeunDiscreteScheduler
    return scheduler(num_train_timesteps=1000, shift=1.0)


def seeded_noise(shape: tuple[int, ...], seed: int, start: int = 0) -> torch.Tensor:
    """Noise for samples ``start .. start+shape[0]-1``, each from its own seed ``seed + index``."""
    return torch.stack(
        [torch.randn(shape[1:], generator=torch.Generator().manual_seed(seed + start + i)) for i in range(shape[0])]
    )


@torch.no_grad()
def denoise(
    dit: DiT,
    objective: GaussianDiffusion | FlowMatching,
    noise: torch.Tensor,
    labels: torch.Tensor,
    steps: int = 50,
    sampler: str | None = None,
    cfg_scale: float = 1.0,
    cfg_channels: int | None = None,
    generator: torch.Generator | list[torch.Generator] | None = None,
    progress: Progress | None = None,
) -> torch.Tensor:
    """Integrate from ``noise: (B, C, H, W)`` to data for class ``labels: (B,)``.

    ``generator`` drives the ancestral noise of DDPM (other samplers are deterministic); a list gives
    one generator per sample.
    """
    scheduler = make_scheduler(objective, sampler or default_sampler(objective))
    scheduler.set_timesteps(steps, device=noise.device)
    channels = noise.shape[1]
    sample = noise * getattr(scheduler, "init_noise_sigma", 1.0)
    learned_variance = getattr(scheduler.config, "variance_type", None) == "learned_range"
    task = progress.add_task("denoising", total=len(scheduler.timesteps)) if progress else None
    for timestep in scheduler.timesteps:
        model_input = scheduler.scale_model_input(sample, timestep) if hasattr(scheduler, "scale_model_input") else sample
        if objective.kind == "gaussian":
            model_t = timestep.float().expand(sample.shape[0])
        else:
            model_t = (timestep.float() / scheduler.config.num_train_timesteps * objective.t_scale).expand(sample.shape[0])
        if cfg_scale == 1.0:
            output = dit(model_input, model_t, labels)
        else:
            output = dit.forward_with_cfg(model_input, model_t, labels, cfg_scale, cfg_channels)
        output = output if learned_variance else output[:, :channels]
        step_kwargs = {"generator": generator} if isinstance(scheduler, DDPMScheduler | DDIMScheduler) else {}
        sample = scheduler.step(output, timestep, sample, **step_kwargs).prev_sample
        if progress:
            progress.advance(task)
    if progress:
        progress.remove_task(task)
    return sample


def sample_images(
    dit: DiT,
    objective: GaussianDiffusion | FlowMatching,
    labels: torch.Tensor,
    seed: int = 0,
    start: int = 0,
    batch_size: int = 64,
    show_progress: bool = False,
    **denoise_kwargs,
) -> torch.Tensor:
    """Samples for ``labels: (N,)`` in batches; sample ``i`` uses noise seed ``seed + start + i``."""
    device = next(dit.parameters()).device
    shape = (dit.in_channels, dit.input_size, dit.input_size)
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
                denoise(dit, objective, noise, chunk, generator=generators,
                        progress=progress if show_progress else None, **denoise_kwargs).cpu()
            )  # fmt: skip
            progress.advance(overall, len(chunk))
    return torch.cat(outputs) if outputs else torch.empty(0, *shape)
