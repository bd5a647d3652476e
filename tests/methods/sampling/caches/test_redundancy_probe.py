"""The redundancy probe (DiTCacheAnalysis): its change measure, its cross-sample CoV and a run on a toy DiT."""

from __future__ import annotations

import numpy as np
import torch

from ditlab.methods.sampling.caches.redundancy import (
    UNITS,
    coefficient_of_variation,
    redundancy_profile,
    step_change,
    summarise,
)


def test_constant_features_do_not_change_and_linear_ones_change_at_a_constant_rate():
    base, slope = torch.randn(3, 5, 4), torch.randn(3, 5, 4)
    absolute, relative = step_change(base, base)
    assert torch.equal(absolute, torch.zeros(3, dtype=torch.float64)) and torch.equal(relative, absolute)
    steps = [step_change(base + (k + 1) * slope, base + k * slope)[0] for k in range(4)]
    for change in steps[1:]:
        torch.testing.assert_close(change, steps[0])
    torch.testing.assert_close(steps[0], slope.abs().double().mean((1, 2)))


def test_identical_samples_have_zero_cov_and_the_summary_is_the_sample_mean():
    rng = np.random.default_rng(0)
    same = np.repeat(rng.random((6, 4, 1)), 5, axis=-1)
    assert coefficient_of_variation(same) < 1e-15
    changes = rng.random((6, 4, 10))  # steps, blocks, rows = 5 cond then 5 uncond
    summary = summarise({"mlp": {"absolute": changes}}, ["cond", "uncond"])["mlp"]
    np.testing.assert_allclose(summary["cond"]["absolute"]["mean"], changes[..., :5].mean(-1).T)
    np.testing.assert_allclose(summary["uncond"]["absolute"]["mean"], changes[..., 5:].mean(-1).T)
    expected = np.mean(changes[..., 5:].std(-1) / changes[..., 5:].mean(-1))
    assert summary["uncond"]["absolute"]["cov"] == expected


def test_profile_of_a_toy_dit_covers_every_unit_block_and_step(dit, settings):
    objective, sampler = settings["ddim"]
    profile = redundancy_profile(dit, objective, sampler, steps=5, cfg_scale=2.0, num_samples=3)
    assert profile["branches"] == ["cond", "uncond"] and set(profile["units"]) == set(UNITS)
    for unit in UNITS:
        for branch in profile["branches"]:
            for measure in ("absolute", "relative"):
                entry = profile["units"][unit][branch][measure]
                table = np.asarray(entry["mean"])
                assert table.shape == (dit.depth, 4) and (table > 0).all() and entry["cov"] > 0
