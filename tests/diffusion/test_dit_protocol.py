"""The public DiT's sampling protocol: its respaced time grid, respaced DDPM with the learned variance, and DDIM
whose last step returns x0, each against a reference loop written here from the formulas of facebookresearch/DiT's
``diffusion/respace.py`` and ``gaussian_diffusion.py`` (ADM): float64 tables, the respaced betas
``1 - abar_k / abar_{k-1}``, the model called with the original step number."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ditlab.diffusion.gaussian import GaussianDiffusion
from ditlab.diffusion.grids import ddim_striding, dit_respacing, gaussian_grid
from ditlab.diffusion.sample import ANCESTRAL_SEED, model_call_times, sample_images, seeded_noise

LABELS = torch.tensor([0, 3, 1])


class ToyEpsilon(nn.Module):
    """A learned-sigma DiT (4 channels, 2 blocks, adaLN not at its zero init) plus the exact ``E[eps | x_t]`` of data
    ``N(0.3, 0.5^2)``: the DiT gives label-, time- and variance-dependence, the exact part keeps samples at data
    scale (a bare untrained DiT's eps sends x0 predictions to ~1e3)."""

    def __init__(self, dit) -> None:
        super().__init__()
        self.dit, self.config = dit, dit.config  # the sampler reads the shape and the null class off config
        self.alphas_cumprod = GaussianDiffusion().tables["alphas_cumprod"]

    def forward(self, x, t, y):
        abar = self.alphas_cumprod[t.long()].view(-1, 1, 1, 1).float()
        exact = (1 - abar).sqrt() * (x - abar.sqrt() * 0.3) / (abar * 0.25 + 1 - abar)
        output = self.dit(x, t, y)
        return torch.cat([exact + 0.1 * output[:, :4], output[:, 4:]], dim=1)


@pytest.fixture(scope="module")
def dit(tiny_dit):
    return ToyEpsilon(tiny_dit(std=0.2, in_channels=4, depth=2, num_heads=2, num_classes=4, learn_sigma=True))


@pytest.mark.parametrize("steps", [2, 10, 20, 25, 50, 100, 250, 1000])
def test_dit_grid_is_the_closed_form_rounding(steps):
    grid = dit_respacing(1000, steps)
    assert grid == [round(i * 999 / (steps - 1)) for i in range(steps)]
    assert grid[0] == 0 and grid[-1] == 999 and len(set(grid)) == steps


def test_dit_grid_follows_the_public_float_path_at_ties():
    """At an exact .5 the public code's accumulated stride lands just below it: for 21 steps step 10 is 499
    (10 * 999 / 20 = 499.5 would round to 500)."""
    stride, position, expected = 999 / 20, 0.0, []
    for _ in range(21):
        expected.append(round(position))
        position += stride
    assert dit_respacing(1000, 21) == expected and expected[10] == 499
    assert dit_respacing(1000, 25)[:3] == [0, 42, 83] and dit_respacing(1000, 25)[-2:] == [957, 999]


def test_ddim_striding_and_descending_order():
    assert ddim_striding(1000, 50) == list(range(0, 1000, 20))
    assert gaussian_grid("dit", 4, 1000) == [999, 666, 333, 0]
    assert gaussian_grid([900, 10], None, 1000) == [900, 10]
    assert gaussian_grid("leading", 4, 1000) is None  # built by diffusers itself
    with pytest.raises(ValueError, match="no integer stride gives exactly steps=999"):
        ddim_striding(1000, 999)


def respaced_tables(steps: int) -> dict[str, torch.Tensor]:
    """The public DiT's respaced process for ``steps`` steps of the linear 1e-4..0.02 schedule, float64."""
    kept = [round(i * 999 / (steps - 1)) for i in range(steps)]
    alphas_cumprod = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64), 0)[kept]
    previous = torch.cat([torch.ones(1, dtype=torch.float64), alphas_cumprod[:-1]])
    betas = 1 - alphas_cumprod / previous
    posterior = betas * (1 - previous) / (1 - alphas_cumprod)
    return {"kept": torch.tensor(kept), "abar": alphas_cumprod, "abar_prev": previous, "betas": betas,
            "log_posterior": torch.log(torch.cat([posterior[1:2], posterior[1:]])),
            "coef_x0": betas * previous.sqrt() / (1 - alphas_cumprod),
            "coef_xt": (1 - previous) * (1 - betas).sqrt() / (1 - alphas_cumprod)}  # fmt: skip


def guided(dit, x, t, y, scale: float, channels: int = 3) -> torch.Tensor:
    """The public DiT's ``forward_with_cfg``: guidance on the first 3 channels, the conditional rest."""
    cond, uncond = dit(x, t, y), dit(x, t, torch.full_like(y, dit.config.num_classes))
    mixed = uncond[:, :channels] + scale * (cond[:, :channels] - uncond[:, :channels])
    return torch.cat([mixed, cond[:, channels:]], dim=1)


def reference_dit_sampling(dit, labels, steps: int, ddim: bool, scale: float, seed: int = 0,
                           last: float = 1.0) -> torch.Tensor:  # fmt: skip
    """``p_sample_loop`` / ``ddim_sample_loop`` of the public DiT (``clip_denoised=False``, eta 0), per-sample
    noise drawn from ditlab's per-sample seeds; ``last`` is DDIM's alpha-bar after its last step (public: 1)."""
    table = respaced_tables(steps)
    table["abar_prev"][0] = last
    table = {k: v if k == "kept" else v.float() for k, v in table.items()}
    x = seeded_noise((len(labels), 4, 8, 8), seed)
    generators = [torch.Generator().manual_seed(ANCESTRAL_SEED + seed + i) for i in range(len(labels))]
    for k in reversed(range(steps)):
        t = table["kept"][k].float().expand(len(labels))
        output = guided(dit, x, t, labels, scale)
        eps, v = output[:, :4], output[:, 4:]
        abar = table["abar"][k].double()
        x0 = (1 / abar).sqrt().float() * x - (1 / abar - 1).sqrt().float() * eps
        if ddim:
            x = table["abar_prev"][k].sqrt() * x0 + (1 - table["abar_prev"][k]).sqrt() * eps
            continue
        mean = table["coef_x0"][k] * x0 + table["coef_xt"][k] * x
        fraction = (v + 1) / 2
        log_variance = fraction * torch.log(table["betas"][k]) + (1 - fraction) * table["log_posterior"][k]
        noise = torch.cat([torch.randn((1, 4, 8, 8), generator=g) for g in generators])
        x = mean + (k > 0) * torch.exp(0.5 * log_variance) * noise
    return x


@pytest.mark.parametrize(("sampler", "steps"), [("ddpm", 25), ("ddpm", 250), ("ddim", 25), ("ddim", 50)])
def test_dit_grid_samples_what_the_public_dit_samples(dit, sampler, steps):
    ours = sample_images(dit, GaussianDiffusion(), LABELS, steps=steps, sampler=sampler, time_grid="dit",
                         cfg_scale=1.5, cfg_channels=3)  # fmt: skip
    theirs = reference_dit_sampling(dit, LABELS, steps, ddim=sampler == "ddim", scale=1.5)
    assert 0.5 < ours.abs().max() < 5
    assert (theirs - ours).abs().max() < 1e-5, (theirs - ours).abs().max()
    # diffusers' default leading grid is another protocol: the difference this grid exists to remove
    leading = sample_images(dit, GaussianDiffusion(), LABELS, steps=steps, sampler=sampler, cfg_scale=1.5,
                            cfg_channels=3)  # fmt: skip
    assert (leading - theirs).abs().max() > 1e-3


def test_ddim_last_step_lands_on_x0_by_default_and_on_abar0_on_request(dit):
    """The public DiT's last DDIM step returns the x0 prediction; ``ddim_alpha_to_one=False`` stops at step 0's
    noise level like diffusers' default, ``sqrt(abar_0) x0 + sqrt(1 - abar_0) eps``."""
    objective = GaussianDiffusion()
    public = sample_images(dit, objective, LABELS, steps=5, sampler="ddim", time_grid="dit", cfg_scale=1.5,
                           cfg_channels=3)  # fmt: skip
    stopped = sample_images(dit, objective, LABELS, steps=5, sampler="ddim", time_grid="dit", cfg_scale=1.5,
                            cfg_channels=3, ddim_alpha_to_one=False)  # fmt: skip
    abar0 = objective.tables["alphas_cumprod"][0].item()
    torch.testing.assert_close(public, reference_dit_sampling(dit, LABELS, 5, ddim=True, scale=1.5), atol=1e-5, rtol=0)
    torch.testing.assert_close(stopped, reference_dit_sampling(dit, LABELS, 5, ddim=True, scale=1.5, last=abar0),
                               atol=1e-5, rtol=0)  # fmt: skip
    assert (public - stopped).abs().max() > 1e-3


def test_dit_grid_call_times_and_default_unchanged(dit):
    times = model_call_times(GaussianDiffusion(), "ddpm", 25, time_grid="dit")
    assert times.tolist() == [float(t) for t in reversed(dit_respacing(1000, 25))]
    assert model_call_times(GaussianDiffusion(), "ddpm", 25).tolist()[:2] == [960.0, 920.0]  # leading
    assert model_call_times(GaussianDiffusion(), "ddim", 5, time_grid="trailing").tolist() == [999, 799, 599, 399, 199]
