"""SiT's sampling protocol: its ``linspace(0, 1, N)`` grid with Euler and Heun, its SDE sampler, torchdiffeq's
dopri5, and public SiT checkpoints (t = 0 noise, velocity = data - noise) loaded into ditlab's convention. The
reference loops below are written here in SiT's own time from the formulas of willisma/SiT ``transport/``."""

from __future__ import annotations

import argparse

import pytest
import torch
from torchdiffeq import odeint

from ditlab.diffusion.flow import FlowMatching
from ditlab.diffusion.grids import flow_grid
from ditlab.diffusion.sample import ANCESTRAL_SEED, model_call_times, sample_images, seeded_noise
from ditlab.models.interop import load_dit_checkpoint, load_sit_checkpoint, save_sit_checkpoint

LABELS = torch.tensor([0, 3, 1])
SHAPE = (4, 8, 8)


@pytest.fixture(scope="module")
def network(tiny_dit):
    """A 4-channel learned-sigma DiT like the public SiT-XL/2 (its second half unused), adaLN not at zero."""
    return tiny_dit(std=0.2, in_channels=4, depth=2, num_heads=2, num_classes=4, learn_sigma=True)


def sit_guided(network, x, t, y, scale: float = 1.5):
    """SiT's ``forward_with_cfg``: guidance on the first 3 channels; the velocity is the first 4 (learn_sigma)."""
    cond, uncond = network(x, t, y), network(x, t, torch.full_like(y, network.num_classes))
    return torch.cat([uncond[:, :3] + scale * (cond[:, :3] - uncond[:, :3]), cond[:, 3:4]], dim=1)


def sit_velocity_of(network, convention: str):
    """SiT's drift ``v(x, s)`` in SiT's time ``s`` (0 noise): the network's own output for a SiT-convention
    network, ``-u(x, 1 - s)`` for a ditlab-convention one."""
    if convention == "sit":
        return lambda x, s: sit_guided(network, x, s.expand(len(x)), LABELS)
    return lambda x, s: -sit_guided(network, x, (1 - s).expand(len(x)), LABELS)


def reference_ode(velocity, noise: torch.Tensor, points: int, heun: bool) -> torch.Tensor:
    """torchdiffeq's fixed-grid ``euler`` / ``heun2`` as SiT calls them on ``linspace(0, 1, points)``."""
    grid, x = torch.linspace(0, 1, points), noise
    for s, s_next in zip(grid[:-1], grid[1:]):
        slope = velocity(x, s)
        if heun:
            x = x + 0.5 * (s_next - s) * (slope + velocity(x + (s_next - s) * slope, s_next))
        else:
            x = x + (s_next - s) * slope
    return x


def reference_sde(velocity, noise: torch.Tensor, points: int, last: float = 0.04, seed: int = 0) -> torch.Tensor:
    """SiT's ``sample_sde`` defaults (Euler-Maruyama, linear path, diffusion ``sigma = 1 - s``, last step "Mean"):
    ``linspace(0, 1 - last, points)``, then one drift-only step of ``last``; per-sample noise streams."""
    generators = [torch.Generator().manual_seed(ANCESTRAL_SEED + seed + i) for i in range(len(noise))]
    grid, x = torch.linspace(0, 1 - last, points), noise
    step = grid[1] - grid[0]

    def drift(x, s):
        v = velocity(x, s)
        score = (s * v - x) / (1 - s)  # SiT's get_score_from_velocity for the linear path
        return v + (1 - s) * score

    for s in grid[:-1]:
        z = torch.stack([torch.randn(x.shape[1:], generator=g) for g in generators])
        x = x + drift(x, s) * step + torch.sqrt(2 * (1 - s)) * torch.sqrt(step) * z
    return x + drift(x, grid[-1]) * last


def ours(network, sampler: str, steps: int | None, **options) -> torch.Tensor:
    return sample_images(network, FlowMatching(), LABELS, sampler=sampler, steps=steps, cfg_scale=1.5,
                         cfg_channels=3, **options)  # fmt: skip


def test_sit_grid_and_call_counts():
    torch.testing.assert_close(flow_grid("sit", 5), torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0], dtype=torch.float64))
    sde_grid = flow_grid("sit", 3, end=0.04)
    torch.testing.assert_close(sde_grid, torch.tensor([1.0, 0.52, 0.04, 0.0], dtype=torch.float64))
    objective = FlowMatching()
    assert len(model_call_times(objective, "euler", 250, time_grid="sit")) == 249  # SiT's N counts grid points
    assert model_call_times(objective, "heun", 3, time_grid="sit").tolist() == [1.0, 0.5, 0.5, 0.0]
    assert len(model_call_times(objective, "sde", 250)) == 250  # 249 Euler-Maruyama steps and the last step
    assert model_call_times(objective, "dopri5") is None


@pytest.mark.parametrize(("sampler", "points"), [("euler", 10), ("euler", 50), ("heun", 10), ("heun", 25)])
def test_sit_grid_euler_and_heun_equal_the_reference(network, sampler, points):
    """To 1e-6 per unit of sample scale (a float32 ulp at the samples' |x| ~ 3 is 2.4e-7)."""
    noise = seeded_noise((len(LABELS), *SHAPE), seed=0)
    theirs = reference_ode(sit_velocity_of(network, "ditlab"), noise, points, heun=sampler == "heun")
    mine = ours(network, sampler, points, time_grid="sit")
    assert (theirs - mine).abs().max() < 1e-6 * theirs.abs().max(), (theirs - mine).abs().max()
    if sampler == "euler":  # diffusers' grid, linspace(1, 1/1000, N) then 0, is another protocol
        assert (ours(network, sampler, points) - theirs).abs().max() > 1e-5


def test_sde_equals_the_reference(network):
    noise = seeded_noise((len(LABELS), *SHAPE), seed=0)
    theirs = reference_sde(sit_velocity_of(network, "ditlab"), noise, 20)
    mine = ours(network, "sde", 20)
    assert (theirs - mine).abs().max() < 1e-5, (theirs - mine).abs().max()
    again = ours(network, "sde", 20, batch_size=1)  # per-sample noise: the batch does not matter
    torch.testing.assert_close(again, mine, atol=1e-6, rtol=0)
    assert (ours(network, "sde", 20, sde={"last_step": "euler"}) - mine).abs().max() > 1e-3


def test_sit_checkpoint_samples_what_sit_samples(network, tmp_path):
    """A SiT-convention state dict loaded by ditlab equals the same network run by SiT's own loops."""
    converted = load_sit_checkpoint(network.state_dict(), num_heads=2)
    noise = seeded_noise((len(LABELS), *SHAPE), seed=0)
    sit = sit_velocity_of(network, "sit")
    for sampler, reference in (("euler", reference_ode(sit, noise, 20, heun=False)), ("sde", reference_sde(sit, noise, 20))):
        mine = ours(converted, sampler, 20, time_grid="sit")
        assert (mine - reference).abs().max() < 1e-5, (sampler, (mine - reference).abs().max())
    adaptive = odeint(lambda s, x: sit(x, s), noise, torch.tensor([0.0, 1.0]), method="dopri5", atol=1e-6, rtol=1e-3)
    stats: dict = {}
    mine = ours(converted, "dopri5", None, stats=stats)
    assert (mine - adaptive[-1]).abs().max() < 1e-4 and stats["nfe"][0] > 6
    # without the conversion the same weights sample something else: the trap this loader closes
    unconverted = load_dit_checkpoint(network.state_dict(), num_heads=2)
    assert (ours(unconverted, "euler", 20, time_grid="sit") - ours(converted, "euler", 20, time_grid="sit")).abs().max() > 0.1
    # writing back in SiT's convention restores the original weights
    restored = torch.load(save_sit_checkpoint(converted, tmp_path / "SiT-tiny.pt"), weights_only=True)
    for name, value in network.state_dict().items():
        torch.testing.assert_close(restored[name], value, atol=1e-6, rtol=0)


def test_sit_files_say_their_convention_or_must_be_told(network, tmp_path):
    weights = network.state_dict()
    training = tmp_path / "0400000.pt"  # a SiT train.py file: its args name SiT's path type
    args = argparse.Namespace(model="SiT-XL/2", path_type="Linear", prediction="velocity")
    torch.save({"model": weights, "ema": weights, "opt": {}, "args": args}, training)
    x, t = torch.randn(2, *SHAPE), torch.tensor([0.3, 0.9])
    read = load_dit_checkpoint(training, num_heads=2)
    torch.testing.assert_close(read(x, t, LABELS[:2])[:, :4], -network(x, 1 - t, LABELS[:2])[:, :4], atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="willisma/SiT checkpoint .* convention='sit'") as error:
        load_dit_checkpoint(training, convention="ditlab", num_heads=2)
    assert "\n" not in str(error.value)
    bare = tmp_path / "SiT-XL-2-256x256.pt"
    torch.save(weights, bare)
    with pytest.raises(ValueError, match="SiT-XL-2-256x256.pt looks like a SiT file.*convention='sit'"):
        load_dit_checkpoint(bare, num_heads=2)
    torch.testing.assert_close(load_dit_checkpoint(bare, convention="sit", num_heads=2).state_dict(),
                               read.state_dict())  # fmt: skip
    noise_model = tmp_path / "noise.pt"
    torch.save({"ema": weights, "args": argparse.Namespace(path_type="Linear", prediction="noise")}, noise_model)
    with pytest.raises(ValueError, match="prediction 'noise'"):
        load_dit_checkpoint(noise_model, num_heads=2)
    with pytest.raises(ValueError, match="unknown convention 'SiT'"):
        load_dit_checkpoint(weights, convention="SiT", num_heads=2)
