"""A diffusers pipeline user samples the same latents through ditlab's sampler as through the pipeline's own
scheduler loop, on the same noise and captions with classifier-free guidance (tiny random transformers, offline).

The pipelines are the real ``StableDiffusion3Pipeline`` and ``PixArtAlphaPipeline`` objects, built without a VAE,
text encoders or tokenizers (``None`` components) and called with pre-encoded ``prompt_embeds`` and
``output_type="latent"``. The captions are encoded once by ditlab's ``random-words`` encoder; the pipeline gets its
token and pooled embeddings as the prompt embeddings and the empty caption's (``TextFeatures.null``) as the
negative prompt embeddings, which is exactly what ditlab's text guidance uses as its unconditional rows.

Settings, scheduler -> ditlab:

- SD3, ``FlowMatchEulerDiscreteScheduler(shift=s)`` -> ``FlowMatching(path="linear", t_scale=1000)``, sampler
  ``euler``; ``shift=1``: ``steps=N`` on ditlab's default grid; ``shift=s``: ``time_grid="shift:s"``, ``steps=N``
  (checked against SD3's own formula, ``sd3_grid`` below, shifted twice at its low end as diffusers does).
- PixArt, ``DDIMScheduler(linear betas 1e-4..0.02, clip_sample=False, set_alpha_to_one=a)`` ->
  ``GaussianDiffusion()``, sampler ``ddim``, ``steps=N``, ``ddim_alpha_to_one=a``; the pipeline's default
  ``DPMSolverMultistepScheduler(algorithm_type="dpmsolver++")`` -> sampler ``dpm++``, ``steps=N``.
- ``guidance_scale=w`` -> ``cfg_scale=w`` (the null condition: the features' empty caption).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    FlowMatchEulerDiscreteScheduler,
    PixArtAlphaPipeline,
    PixArtTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
)

from ditlab.diffusion.flow import FlowMatching
from ditlab.diffusion.gaussian import GaussianDiffusion
from ditlab.diffusion.grids import flow_grid
from ditlab.diffusion.sample import denoise, model_call_times
from ditlab.models.diffusers_t2i import from_model
from ditlab.models.text.features import TextFeatures
from ditlab.models.text.random_words import RandomWords

CAPTIONS = ["a red circle above a blue square", "two digits"]
TEXT_DIM, TEXT_LENGTH = 24, 8
STEPS, GUIDANCE = 8, 3.0
TOLERANCE = 1e-4
SD3_SCALE, PIXART_SCALE = 0.1, 0.05  # random weights this size keep the tiny models' latents O(1)
SD3_TINY = {"sample_size": 8, "patch_size": 2, "in_channels": 4, "num_layers": 2, "attention_head_dim": 16,
            "num_attention_heads": 2, "joint_attention_dim": TEXT_DIM, "caption_projection_dim": 32,
            "pooled_projection_dim": TEXT_DIM, "out_channels": 4, "pos_embed_max_size": 12,
            "qk_norm": "rms_norm"}  # fmt: skip
PIXART_TINY = {"num_attention_heads": 2, "attention_head_dim": 8, "in_channels": 4, "out_channels": 8, "num_layers": 2,
               "sample_size": 8, "patch_size": 2, "caption_channels": TEXT_DIM, "cross_attention_dim": 16}  # fmt: skip
LINEAR_BETAS = {"beta_start": 1e-4, "beta_end": 0.02, "beta_schedule": "linear", "num_train_timesteps": 1000}


def randomise(module: torch.nn.Module, seed: int, scale: float) -> torch.nn.Module:
    """Every parameter random (norm scales around 1), so the sample depends on every converted weight."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in module.named_parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * scale)
            if "norm" in name and name.endswith("weight"):
                parameter.add_(1.0)
    return module.eval()


def captions() -> TextFeatures:
    """The captions' features with padding (mask), and the empty caption's as ``null``."""
    return RandomWords(dim=TEXT_DIM, context_length=TEXT_LENGTH)(CAPTIONS)


def initial_noise(seed: int = 7) -> torch.Tensor:
    return torch.randn(len(CAPTIONS), 4, 8, 8, generator=torch.Generator().manual_seed(seed))


def sd3_grid(steps: int, shift: float, num_train_timesteps: int = 1000) -> list[float]:
    """``FlowMatchEulerDiscreteScheduler(shift=shift).set_timesteps(steps)``'s sigmas as a ditlab flow time grid
    (t = sigma): ``steps`` points evenly spaced from 1 to the scheduler's shifted ``sigma_min`` (its smallest
    training sigma 1/T, shifted), each then shifted ``s -> shift s / (1 + (shift - 1) s)``; then 0."""

    def shifted(sigma):
        return shift * sigma / (1 + (shift - 1) * sigma)

    points = shifted(np.linspace(1.0, shifted(1.0 / num_train_timesteps), steps))
    return [float(point) for point in points] + [0.0]


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_sd3_pipeline_and_ditlab_euler_sample_the_same_latents(shift):
    torch.manual_seed(0)
    transformer = randomise(SD3Transformer2DModel(**SD3_TINY), seed=1, scale=SD3_SCALE)
    pipeline = StableDiffusion3Pipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=shift),
                                        vae=None, text_encoder=None, tokenizer=None, text_encoder_2=None,
                                        tokenizer_2=None, text_encoder_3=None, tokenizer_3=None)  # fmt: skip
    pipeline.set_progress_bar_config(disable=True)
    text, noise = captions(), initial_noise()
    assert not text.mask.all() and text.null is not None  # padded captions; the empty caption for guidance
    null = text.null_rows()
    theirs = pipeline(prompt_embeds=text.tokens, pooled_prompt_embeds=text.pooled, negative_prompt_embeds=null.tokens,
                      negative_pooled_prompt_embeds=null.pooled, latents=noise.clone(), num_inference_steps=STEPS,
                      guidance_scale=GUIDANCE, output_type="latent").images  # fmt: skip

    objective = FlowMatching(path="linear", t_scale=1000)
    grid = None if shift == 1.0 else f"shift:{shift}"  # ditlab's named shifted grid (SD3's)
    steps = STEPS
    # the same time points, and the same network times (SD3's timesteps, sigma * 1000), as the pipeline's scheduler
    if grid is not None:
        assert torch.allclose(flow_grid(grid, STEPS), torch.tensor(sd3_grid(STEPS, shift), dtype=torch.float64),
                              atol=1e-6, rtol=0)  # SD3's formula, written out below  # fmt: skip
        assert torch.allclose(flow_grid(grid, STEPS), pipeline.scheduler.sigmas.double(), atol=1e-6, rtol=0)
    times = model_call_times(objective, "euler", steps, grid)
    assert torch.allclose(times.float(), pipeline.scheduler.timesteps, atol=1e-3, rtol=0)

    ours = denoise(from_model(transformer), objective, noise.clone(), text, steps=steps, sampler="euler",
                   time_grid=grid, cfg_scale=GUIDANCE)  # fmt: skip
    diff = (ours - theirs).abs().max().item()
    print(f"SD3 shift={shift}, {STEPS} Euler steps, guidance {GUIDANCE}: max |ditlab - pipeline| = {diff:.3g} "
          f"(latents up to {theirs.abs().max():.3g})")  # fmt: skip
    assert ours.shape == theirs.shape == noise.shape
    assert not torch.allclose(theirs, noise, atol=1e-2)  # the loop moved the sample
    assert diff < TOLERANCE


PIXART_SCHEDULERS = {
    "ddim": lambda: DDIMScheduler(**LINEAR_BETAS, clip_sample=False, set_alpha_to_one=False),
    "ddim-alpha-to-one": lambda: DDIMScheduler(**LINEAR_BETAS, clip_sample=False, set_alpha_to_one=True),
    # the PixArt pipeline's own scheduler class
    "dpm++": lambda: DPMSolverMultistepScheduler(**LINEAR_BETAS, algorithm_type="dpmsolver++"),
}
DITLAB_SETTINGS = {
    "ddim": {"sampler": "ddim", "ddim_alpha_to_one": False},
    "ddim-alpha-to-one": {"sampler": "ddim", "ddim_alpha_to_one": True},
    "dpm++": {"sampler": "dpm++"},
}


@pytest.mark.parametrize("scheduler", list(PIXART_SCHEDULERS))
def test_pixart_pipeline_and_ditlab_sample_the_same_latents(scheduler):
    torch.manual_seed(0)
    transformer = randomise(PixArtTransformer2DModel(**PIXART_TINY), seed=1, scale=PIXART_SCALE)
    pipeline = PixArtAlphaPipeline(tokenizer=None, text_encoder=None, vae=None, transformer=transformer,
                                   scheduler=PIXART_SCHEDULERS[scheduler]())  # fmt: skip
    pipeline.set_progress_bar_config(disable=True)
    text, noise = captions(), initial_noise()
    null = text.null_rows()
    theirs = pipeline(prompt_embeds=text.tokens, prompt_attention_mask=text.mask.long(), negative_prompt=None,
                      negative_prompt_embeds=null.tokens, negative_prompt_attention_mask=null.mask.long(),
                      latents=noise.clone(), num_inference_steps=STEPS, guidance_scale=GUIDANCE, output_type="latent",
                      use_resolution_binning=False).images  # fmt: skip

    objective = GaussianDiffusion()  # linear betas 1e-4..0.02 over 1000 steps, epsilon prediction
    times = model_call_times(objective, DITLAB_SETTINGS[scheduler]["sampler"], STEPS)
    assert torch.equal(times, pipeline.scheduler.timesteps)  # the same DDPM steps
    ours = denoise(from_model(transformer), objective, noise.clone(), text, steps=STEPS, cfg_scale=GUIDANCE,
                   **DITLAB_SETTINGS[scheduler])  # fmt: skip
    diff = (ours - theirs).abs().max().item()
    print(f"PixArt {scheduler}, {STEPS} steps, guidance {GUIDANCE}: max |ditlab - pipeline| = {diff:.3g} "
          f"(latents up to {theirs.abs().max():.3g})")  # fmt: skip
    assert ours.shape == theirs.shape == noise.shape
    assert not torch.allclose(theirs, noise, atol=1e-2)
    # a random epsilon-predictor's x0 estimates are (x - eps) / sqrt(alpha_bar), ~50x its error at the first steps,
    # so these latents are O(100): 1e-4 relative to their scale (0 on the CPU this was written on)
    assert diff < TOLERANCE * max(1.0, theirs.abs().max().item())
