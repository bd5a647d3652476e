"""Sampling loops: seeded noise, batch-size independence, every sampler, and analytic Gaussian data."""

from __future__ import annotations

from functools import partial

import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    FlowMatchEulerDiscreteScheduler,
)
from torch import nn

from ditlab.diffusion.flow import FlowMatching
from ditlab.diffusion.gaussian import GaussianDiffusion
from ditlab.diffusion.sample import denoise, sample_images, seeded_noise
from ditlab.models.dit import DiT

MU, STD = -0.5, 0.6


@pytest.fixture(scope="module")
def perturbed_dit(tiny_dit):
    """This file's DiT: 3 channels, 2 blocks of 4 heads, 4 classes, adaLN randomised with std 0.05."""
    return partial(tiny_dit, in_channels=3, depth=2, num_heads=4, num_classes=4, std=0.05)


@pytest.fixture(scope="module")
def dit(perturbed_dit) -> DiT:
    return perturbed_dit()


LABELS = torch.tensor([0, 1, 2, 3, 1])


def test_seeded_noise_is_per_sample():
    noise = seeded_noise((5, 3, 4, 4), seed=11)
    for i in range(5):
        assert torch.equal(noise[i], torch.randn(3, 4, 4, generator=torch.Generator().manual_seed(11 + i)))
    split = torch.cat([seeded_noise((2, 3, 4, 4), 11), seeded_noise((3, 3, 4, 4), 11, start=2)])
    assert torch.equal(noise, split)
    assert not torch.equal(noise[0], noise[1])
    assert not torch.equal(seeded_noise((1, 3, 4, 4), 12)[0], noise[0])


@pytest.mark.parametrize(
    ("kind", "sampler"), [("gaussian", "ddim"), ("gaussian", "dpm++"), ("flow", "euler"), ("flow", "heun")]
)
def test_deterministic_samplers_do_not_depend_on_batch_size(dit, kind, sampler):
    objective = GaussianDiffusion() if kind == "gaussian" else FlowMatching()
    kwargs = {"seed": 5, "steps": 4, "sampler": sampler, "cfg_scale": 2.0}
    in_twos = sample_images(dit, objective, LABELS, batch_size=2, **kwargs)
    at_once = sample_images(dit, objective, LABELS, batch_size=5, **kwargs)
    assert in_twos.shape == (5, 3, 8, 8)
    torch.testing.assert_close(in_twos, at_once, atol=1e-5, rtol=1e-5)
    # a second worker that owns samples 3.. reproduces them with start=3
    tail = sample_images(dit, objective, LABELS[3:], start=3, batch_size=5, **kwargs)
    torch.testing.assert_close(tail, at_once[3:], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(at_once[0], at_once[1], atol=1e-3)
    different_seed = sample_images(dit, objective, LABELS, batch_size=5, **{**kwargs, "seed": 6})
    assert not torch.allclose(different_seed, at_once, atol=1e-3)


def test_ddpm_does_not_depend_on_batch_size(dit):
    """The ancestral noise is per sample too, so a 50K-sample FID run is the same on any number of GPUs."""
    kwargs = {"seed": 5, "steps": 4, "sampler": "ddpm"}
    in_twos = sample_images(dit, GaussianDiffusion(), LABELS, batch_size=2, **kwargs)
    at_once = sample_images(dit, GaussianDiffusion(), LABELS, batch_size=5, **kwargs)
    torch.testing.assert_close(in_twos, at_once, atol=1e-5, rtol=1e-5)
    tail = sample_images(dit, GaussianDiffusion(), LABELS[3:], start=3, batch_size=5, **kwargs)
    torch.testing.assert_close(tail, at_once[3:], atol=1e-5, rtol=1e-5)
    again = sample_images(dit, GaussianDiffusion(), LABELS, batch_size=5, **kwargs)
    assert torch.equal(again, at_once)


@pytest.mark.parametrize(
    ("objective", "sampler", "learn_sigma"),
    [
        (GaussianDiffusion(), "ddpm", True),
        (GaussianDiffusion(), "ddim", True),
        (GaussianDiffusion(), "dpm++", True),
        (GaussianDiffusion(prediction="v_prediction", learn_sigma=False), "ddpm", False),
        (GaussianDiffusion(prediction="v_prediction", learn_sigma=False), "dpm++", False),
        (FlowMatching(), "euler", True),
        (FlowMatching(path="gvp"), "heun", False),
    ],
)
@pytest.mark.parametrize("cfg_scale", [1.0, 4.0])
def test_every_sampler_runs(objective, sampler, learn_sigma, cfg_scale, perturbed_dit):
    dit = perturbed_dit(learn_sigma=learn_sigma)
    samples = sample_images(dit, objective, torch.tensor([0, 3, 1]), batch_size=2, steps=3, sampler=sampler,
                            cfg_scale=cfg_scale)  # fmt: skip
    assert samples.shape == (3, 3, 8, 8)
    assert torch.isfinite(samples).all()


def test_default_sampler_and_scheduler_config():
    assert GaussianDiffusion().default_sampler == "ddpm" and FlowMatching().default_sampler == "euler"
    objective = GaussianDiffusion(
        num_timesteps=500, beta_start=2e-4, beta_end=0.03, prediction="v_prediction"
    )
    scheduler = objective.scheduler("ddpm")
    assert isinstance(scheduler, DDPMScheduler)
    config = scheduler.config
    assert (config.num_train_timesteps, config.beta_start, config.beta_end) == (500, 2e-4, 0.03)
    assert config.prediction_type == "v_prediction" and config.variance_type == "learned_range"
    torch.testing.assert_close(
        scheduler.alphas_cumprod.double(), objective.tables["alphas_cumprod"], atol=1e-6, rtol=1e-5
    )
    assert GaussianDiffusion(learn_sigma=False).scheduler("ddpm").config.variance_type == "fixed_small"
    assert isinstance(objective.scheduler("ddim"), DDIMScheduler)
    assert isinstance(objective.scheduler("dpm++"), DPMSolverMultistepScheduler)
    assert isinstance(FlowMatching().scheduler("euler"), FlowMatchEulerDiscreteScheduler)


def test_wrong_sampler_name_names_the_choices(dit):
    with pytest.raises(
        ValueError,
        match=r"'euler' does not apply to the Gaussian objective; choices: \['ddpm', 'ddim', 'dpm\+\+'\]",
    ):
        GaussianDiffusion().scheduler("euler")
    with pytest.raises(
        ValueError, match=r"'ddim' does not apply to the flow objective; choices: \['euler', 'heun'\]"
    ):
        FlowMatching().scheduler("ddim")
    with pytest.raises(ValueError, match="choices"):
        sample_images(dit, FlowMatching(), LABELS, sampler="ddpm", steps=2)
    with pytest.raises(ValueError, match="choices"):
        denoise(dit, GaussianDiffusion(), torch.randn(1, 3, 8, 8), LABELS[:1], sampler="heun", steps=2)


def test_cfg_scale_one_skips_guidance_and_other_scales_use_it(dit):
    noise = seeded_noise((2, 3, 8, 8), seed=0)
    labels = torch.tensor([0, 1])
    plain = denoise(dit, FlowMatching(), noise, labels, steps=3)
    calls = []
    handle = dit.register_forward_hook(lambda module, args, out: calls.append(args[0].shape[0]))
    try:
        assert torch.equal(denoise(dit, FlowMatching(), noise, labels, steps=3, cfg_scale=1.0), plain)
        assert calls == [2, 2, 2]
        calls.clear()
        guided = denoise(dit, FlowMatching(), noise, labels, steps=3, cfg_scale=3.0)
        assert calls == [4, 4, 4]  # conditional and null halves in one batch
    finally:
        handle.remove()
    assert not torch.allclose(guided, plain, atol=1e-4)


class GaussianEpsilon(nn.Module):
    """Exact ``E[eps | x_t]`` for data ``x0 ~ N(mu, std^2 I)``, with the variance channel at ``v = -1``
    (the posterior variance), called like a learned-sigma DiT with integer DDPM steps."""

    def __init__(self, objective: GaussianDiffusion) -> None:
        super().__init__()
        self.alphas_cumprod = objective.tables["alphas_cumprod"]
        self.shape = (2, 32, 32)  # a plain model function: the sampler is told its shape
        self.anchor = nn.Parameter(torch.zeros(()))

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        assert t.dtype == torch.float32 and (t == t.round()).all() and 0 <= t.min() and t.max() < 1000
        abar = self.alphas_cumprod[t.long()].view(-1, 1, 1, 1)
        var = abar * STD**2 + 1 - abar
        eps = (1 - abar).sqrt() * (x.double() - abar.sqrt() * MU) / var
        return torch.cat([eps, -torch.ones_like(eps)], dim=1).float()


@pytest.mark.parametrize(("sampler", "steps"), [("ddim", 250), ("dpm++", 50), ("ddpm", 1000)])
def test_gaussian_samplers_reach_gaussian_data(sampler, steps):
    """Also checks the time convention: the network gets the integer DDPM step, 999 (noise) down to 0."""
    objective = GaussianDiffusion()
    samples = sample_images(GaussianEpsilon(objective), objective, torch.zeros(8, dtype=torch.long), steps=steps, shape=(2, 32, 32),
                            sampler=sampler)  # fmt: skip
    assert abs(samples.mean().item() - MU) < 0.03 * abs(MU)
    assert abs(samples.std().item() - STD) < 0.03 * STD
    if sampler != "ddpm":  # deterministic: the probability-flow map is x0 = mu + std * eps
        exact = MU + STD * seeded_noise(samples.shape, seed=0)
        assert (samples - exact).abs().max() < 0.03


def test_ddpm_uses_the_learned_variance_channels():
    objective = GaussianDiffusion()
    model = GaussianEpsilon(objective)
    labels = torch.zeros(2, dtype=torch.long)
    small = sample_images(model, objective, labels, steps=20, sampler="ddpm", shape=model.shape)
    model.forward = lambda x, t, y: torch.cat([GaussianEpsilon.forward(model, x, t, y)[:, :2],
                                               torch.ones_like(x)], dim=1)  # fmt: skip
    large = sample_images(model, objective, labels, steps=20, sampler="ddpm", shape=model.shape)
    assert large.std() > small.std() * 1.05  # v = +1 samples with beta_t, v = -1 with the posterior variance
    deterministic = sample_images(model, objective, labels, steps=20, sampler="ddim", shape=model.shape)
    del model.forward
    torch.testing.assert_close(
        sample_images(model, objective, labels, steps=20, sampler="ddim", shape=model.shape), deterministic
    )
