"""Sampling options beyond the grids: guidance intervals (REPA's evaluation), adaptive solvers and their
tolerance, SDE settings, presets, and one-line errors for bad input."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ditlab.diffusion.config import SamplingConfig
from ditlab.diffusion.flow import FlowMatching
from ditlab.diffusion.gaussian import GaussianDiffusion
from ditlab.diffusion.presets import SAMPLING_PRESETS, sampling_preset
from ditlab.diffusion.sample import ANCESTRAL_SEED, sample_images, seeded_noise

LABELS = torch.tensor([0, 3, 1])
MU, STD = 1.5, 0.4


@pytest.fixture(scope="module")
def network(tiny_dit):
    return tiny_dit(std=0.2, in_channels=4, depth=2, num_heads=2, num_classes=4, learn_sigma=False)


class Rows:
    """The network, recording the batch size and time of every call."""

    def __init__(self, network) -> None:
        self.network, self.config, self.calls = network, network.config, []

    def __call__(self, x, t, y):
        self.calls.append((x.shape[0], round(float(t[0]), 6)))
        return self.network(x, t, y)


def reference_repa_sde(network, noise, steps: int, scale: float, high: float, seed: int = 0) -> torch.Tensor:
    """REPA's ``euler_maruyama_sampler`` (written from its formulas, REPA's time = ditlab's): ``linspace(1, 0.04,
    steps)`` then 0, drift ``v - t score``, noise ``sqrt(2t |dt|)``, guidance on all channels only for t <= high,
    a noise-free last step."""
    generators = [torch.Generator().manual_seed(ANCESTRAL_SEED + seed + i) for i in range(len(noise))]
    grid = torch.cat([torch.linspace(1.0, 0.04, steps, dtype=torch.float64), torch.zeros(1, dtype=torch.float64)])
    x = noise
    for index, (t, t_next) in enumerate(zip(grid[:-1].tolist(), grid[1:].tolist())):
        time = torch.full((len(x),), t)
        v = network(x, time, LABELS)
        if t <= high:
            v = network(x, time, torch.full_like(LABELS, 4)) + scale * (v - network(x, time, torch.full_like(LABELS, 4)))
        score = (-(1 - t) * v - x) / t
        drift, dt = v - t * score, t_next - t
        if index == len(grid) - 2:
            return x + drift * dt
        z = torch.stack([torch.randn(x.shape[1:], generator=g) for g in generators])
        x = x + drift * dt + (2 * t * abs(dt)) ** 0.5 * z
    return x


def test_repa_guidance_interval_sde_equals_the_reference(network):
    noise = seeded_noise((len(LABELS), 4, 8, 8), seed=0)
    preset = sampling_preset("repa-sde-guidance-interval", steps=12)
    options = {k: v for k, v in vars(preset).items() if k not in ("cache", "batch_size")}
    ours = sample_images(network, FlowMatching(), LABELS, **options)
    theirs = reference_repa_sde(network, noise, 12, scale=1.8, high=0.7)
    assert (ours - theirs).abs().max() < 1e-5, (ours - theirs).abs().max()


def test_guidance_interval_batches_and_limits(network):
    objective = FlowMatching()
    recorder = Rows(network)
    interval = sample_images(recorder, objective, LABELS, steps=5, time_grid="sit", cfg_scale=2.0,
                             guidance_interval=(0.0, 0.5))  # fmt: skip
    # calls at t = 1, 0.75 (conditional rows only), 0.5 (closed interval) and 0.25 (guided: cond and null rows)
    assert recorder.calls == [(3, 1.0), (3, 0.75), (6, 0.5), (6, 0.25)]
    everywhere = sample_images(network, objective, LABELS, steps=5, time_grid="sit", cfg_scale=2.0)
    assert torch.equal(everywhere, sample_images(network, objective, LABELS, steps=5, time_grid="sit", cfg_scale=2.0,
                                                 guidance_interval=(0.0, 1.0)))  # fmt: skip
    unguided = sample_images(network, objective, LABELS, steps=5, time_grid="sit")
    assert torch.equal(unguided, sample_images(network, objective, LABELS, steps=5, time_grid="sit", cfg_scale=2.0,
                                               guidance_interval=(0.9, 0.95)))  # fmt: skip
    assert (interval - everywhere).abs().max() > 1e-4 and (interval - unguided).abs().max() > 1e-4
    # Gaussian noise level is step / T: DDIM on the dit grid {999, 666, 333, 0} guided below 0.5 only
    recorder.calls.clear()
    sample_images(recorder, GaussianDiffusion(learn_sigma=False), LABELS, steps=4, sampler="ddim", time_grid="dit",
                  cfg_scale=2.0, guidance_interval=(0.0, 0.5))  # fmt: skip
    assert [rows for rows, _ in recorder.calls] == [3, 3, 6, 6]


class GaussianVelocity(nn.Module):
    """The exact velocity (ditlab time, linear path) for data ``N(MU, STD^2)``: its flow maps eps to MU + STD eps."""

    def __init__(self) -> None:
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(()))

    def forward(self, x, t, y):
        t, x = t.double().view(-1, 1, 1, 1), x.double()
        variance = (1 - t) ** 2 * STD**2 + t**2
        centred = x - (1 - t) * MU
        return (-(MU + (1 - t) * STD**2 * centred / variance) + t * centred / variance).float()


def test_dopri5_meets_its_tolerance_and_reports_its_calls():
    exact = MU + STD * seeded_noise((4, 2, 8, 8), seed=0)
    errors, calls = [], []
    for rtol in (1e-3, 1e-6):
        stats: dict = {}
        samples = sample_images(GaussianVelocity(), FlowMatching(), torch.zeros(4, dtype=torch.long), shape=(2, 8, 8),
                                sampler="dopri5", steps=None, rtol=rtol, atol=rtol * 1e-3, stats=stats)  # fmt: skip
        errors.append((samples - exact).pow(2).mean().sqrt().item())
        calls.append(stats["nfe"][0])
    assert errors[0] < 0.02 and errors[1] < 1e-5 * exact.abs().max(), errors  # RMS error, as torchdiffeq's norm
    assert calls[1] > calls[0] > 6, calls  # more calls for a tighter tolerance, several per step


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"time_grid": "karras"}, r"unknown time_grid 'karras'; choices: \['dit', 'dit-ddim', 'leading'"),
        ({"time_grid": [10, 500, 0], "steps": None}, r"time_grid \[10, 500, 0\] must be strictly decreasing"),
        ({"time_grid": [1200, 10], "steps": None, "sampler": "ddpm"}, r"whole DDPM steps within \[0, 999\]"),
        ({"time_grid": [999.5, 10], "steps": None, "sampler": "ddim"}, r"whole DDPM steps"),
        ({"time_grid": [999, 500, 0], "steps": 50}, r"lists 3 times but steps=50; set steps to 3 or null"),
        ({"time_grid": "sit"}, r"time_grid 'sit' is for the flow objective"),
        ({"sampler": "euler"}, r"'euler' does not apply to the Gaussian objective"),
        ({"guidance_interval": (0.8, 0.2)}, r"guidance_interval \[0.8, 0.2\] must be \[low, high\]"),
    ],
)
def test_bad_gaussian_options_are_one_line(network, options, message):
    with pytest.raises(ValueError, match=message) as error:
        sample_images(network, GaussianDiffusion(learn_sigma=False), LABELS[:1], **{"steps": 3, **options})
    assert "\n" not in str(error.value)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"sampler": "dopri5", "steps": 50}, r"'dopri5' is adaptive: atol/rtol set its steps, so it takes steps: null"),
        ({"sampler": "dopri5", "steps": None, "time_grid": [1.0, 0.0]}, r"'dopri5' is adaptive"),
        ({"time_grid": "dit"}, r"time_grid 'dit' is for the Gaussian objective"),
        ({"time_grid": [1.0, 0.5, 0.1], "steps": None}, r"from at most 1 \(noise\) down to exactly 0"),
        ({"time_grid": [1.5, 0.5, 0.0], "steps": None}, r"from at most 1"),
        ({"sampler": "sde", "sde": {"diffusion": "SBDM"}}, r"'SBDM' is infinite at pure noise"),
        ({"sampler": "sde", "sde": {"diffusion": "cosine"}}, r"unknown sde.diffusion 'cosine'; choices"),
        ({"sampler": "sde", "sde": {"last_step": "Mean"}}, r"unknown sde.last_step 'Mean'"),
        ({"time_grid": "sit", "steps": 1}, r"the sit grid needs at least 2 points"),
    ],
)
def test_bad_flow_options_are_one_line(network, options, message):
    with pytest.raises(ValueError, match=message) as error:
        sample_images(network, FlowMatching(), LABELS[:1], **{"steps": 3, **options})
    assert "\n" not in str(error.value)


def test_config_refuses_bad_options_when_made_and_round_trips():
    with pytest.raises(ValueError, match="'dopri5' is adaptive"):
        SamplingConfig(sampler="dopri5")  # steps defaults to 50: refused before any training starts
    with pytest.raises(ValueError, match="unknown time_grid"):
        SamplingConfig(time_grid="uniform")
    with pytest.raises(ValueError, match="unknown sampling preset 'dit'"):
        sampling_preset("dit")
    from dataclasses import asdict

    for name in SAMPLING_PRESETS:
        config = sampling_preset(name, batch_size=8)
        assert SamplingConfig(**asdict(config)) == config  # as a checkpoint stores and reloads it
    assert SamplingConfig().time_grid is None and SamplingConfig().steps == 50  # the defaults are unchanged


def test_sde_options_change_the_samples(network):
    base = sample_images(network, FlowMatching(), LABELS, sampler="sde", steps=8)
    for sde in ({"diffusion": "constant", "norm": 0.5}, {"last_step": "tweedie"}, {"last_step": "none"},
                {"diffusion": "decreasing"}, {"diffusion": "increasing-decreasing"}):  # fmt: skip
        other = sample_images(network, FlowMatching(), LABELS, sampler="sde", steps=8, sde=sde)
        assert torch.isfinite(other).all() and (other - base).abs().max() > 1e-3, sde
    again = sample_images(network, FlowMatching(), LABELS, sampler="sde", steps=8)
    assert torch.equal(base, again)  # seeded per sample
    # SiT's "linear" w = 1 - s is sigma_t on the linear path, not on the GVP path
    linear = sample_images(network, FlowMatching(), LABELS, sampler="sde", steps=8, sde={"diffusion": "linear"})
    torch.testing.assert_close(linear, base, atol=1e-6, rtol=0)
    gvp = {"objective": FlowMatching(path="gvp"), "labels": LABELS, "sampler": "sde", "steps": 8}
    assert (sample_images(network, **gvp, sde={"diffusion": "linear"}) - sample_images(network, **gvp)).abs().max() > 1e-3
