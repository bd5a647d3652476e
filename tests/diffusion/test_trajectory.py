"""The step-wise trajectory: stepped by hand one model call at a time it samples bitwise what ``denoise`` samples, on
every stepper, grid, SDE and guidance interval, and it tells a caller the rows of each call."""

from __future__ import annotations

import pytest
import torch

from ditlab.diffusion.flow import FlowMatching
from ditlab.diffusion.gaussian import GaussianDiffusion
from ditlab.diffusion.sample import denoise, model_call_times, seeded_noise
from ditlab.diffusion.trajectory import Trajectory

LABELS = torch.tensor([0, 3, 1])
INTERVAL = (0.2, 0.7)  # guided in the middle of the trajectory only: both row layouts occur

CASES = {
    "ddpm": (GaussianDiffusion(learn_sigma=True), {"sampler": "ddpm", "steps": 6}),
    "ddpm-dit-grid": (GaussianDiffusion(learn_sigma=True), {"sampler": "ddpm", "steps": 6, "time_grid": "dit"}),
    "ddim-trailing": (GaussianDiffusion(learn_sigma=True), {"sampler": "ddim", "steps": 6, "time_grid": "trailing"}),
    "ddim-list": (GaussianDiffusion(learn_sigma=True), {"sampler": "ddim", "time_grid": [999, 700, 500, 250, 100, 0]}),
    "dpm++": (GaussianDiffusion(learn_sigma=True), {"sampler": "dpm++", "steps": 6}),
    "euler": (FlowMatching(), {"sampler": "euler", "steps": 6}),
    "euler-list": (FlowMatching(), {"sampler": "euler", "time_grid": [1.0, 0.8, 0.5, 0.3, 0.1, 0.0]}),
    "heun": (FlowMatching(), {"sampler": "heun", "steps": 4}),
    "heun-sit": (FlowMatching(), {"sampler": "heun", "steps": 5, "time_grid": "sit"}),
    "sde": (FlowMatching(), {"sampler": "sde", "steps": 6, "sde": {"last_step": "tweedie"}}),
}


def generators(seed: int = 7) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(seed + i) for i in range(len(LABELS))]


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("interval", [None, INTERVAL])
def test_stepping_by_hand_is_denoise_bitwise(tiny_dit, name, interval):
    objective, options = CASES[name]
    dit = tiny_dit(depth=2, learn_sigma=isinstance(objective, GaussianDiffusion))
    noise = seeded_noise((len(LABELS), 1, 8, 8), seed=3)
    options = {**options, "cfg_scale": 2.5, "guidance_interval": interval}
    stats: dict = {}
    expected = denoise(dit, objective, noise, LABELS, null_label=10, generator=generators(), stats=stats, **options)
    trajectory = Trajectory(objective, noise, LABELS, null_label=10, generator=generators(), **options)
    rows, times = [], []
    with torch.no_grad():
        while not trajectory.done:
            x, t, y = trajectory.inputs()
            rows.append(len(x))
            times.append(float(t[0]))
            assert len(trajectory.rows(torch.arange(len(LABELS)))) == len(x)
            trajectory.step(dit(x, t, y))
    assert torch.equal(trajectory.x, expected)
    assert trajectory.nfe == trajectory.calls == len(rows) == stats["nfe"][0]
    schedule = {key: value for key, value in options.items() if key not in ("cfg_scale", "guidance_interval")}
    assert times == pytest.approx(model_call_times(objective, **schedule).tolist())
    both = {len(LABELS), 2 * len(LABELS)}
    assert set(rows) == (both if interval else {2 * len(LABELS)})


def test_rows_follow_the_guidance_of_each_call():
    objective = FlowMatching()
    trajectory = Trajectory(objective, torch.zeros(2, 1, 4, 4), torch.tensor([4, 5]), steps=10, cfg_scale=2.0,
                            null_label=9, guidance_interval=(0.0, 0.5))  # fmt: skip
    values = torch.tensor([1.0, 2.0])
    seen = []
    while not trajectory.done:
        x, _, y = trajectory.inputs()
        level = objective.noise_level(trajectory.time)
        assert trajectory.guided == (level <= 0.5)
        if trajectory.guided:
            assert y.tolist() == [4, 5, 9, 9] and torch.equal(trajectory.rows(values), torch.tensor([1.0, 2.0, 1.0, 2.0]))
        else:
            assert y.tolist() == [4, 5] and torch.equal(trajectory.rows(values), values)
        seen.append(trajectory.guided)
        trajectory.step(torch.zeros_like(x))
    assert seen[0] is False and seen[-1] is True


def test_adaptive_solvers_and_bad_settings_are_one_line():
    with pytest.raises(ValueError, match="is adaptive"):
        Trajectory(FlowMatching(), torch.zeros(1, 1, 4, 4), torch.tensor([0]), sampler="dopri5")
    with pytest.raises(ValueError, match="needs the null class"):
        Trajectory(FlowMatching(), torch.zeros(1, 1, 4, 4), torch.tensor([0]), steps=3, cfg_scale=2.0)
    with pytest.raises(ValueError, match="guidance_interval"):
        Trajectory(FlowMatching(), torch.zeros(1, 1, 4, 4), torch.tensor([0]), steps=3, guidance_interval=(0.8, 0.2))
