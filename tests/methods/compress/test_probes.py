"""Selection solvers: linear CKA, ridge probes, the knapsack against brute force, PPCL interval choice."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from ditlab.methods.compress.probes import (
    choose_intervals,
    correlations,
    fit_linear,
    interval_scores,
    knapsack,
    linear_cka,
)


def features(rows: int = 300, width: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, width, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_cka_is_one_on_itself_and_invariant_to_scale_and_rotation():
    x = features()
    rotation, _ = torch.linalg.qr(features(16, 16, seed=1))
    assert linear_cka(x, x) == pytest.approx(1.0, abs=1e-12)
    assert linear_cka(x, 7.5 * x) == pytest.approx(1.0, abs=1e-12)
    assert linear_cka(x, x @ rotation + 3.0) == pytest.approx(1.0, abs=1e-12)
    assert linear_cka(x, features(seed=2)) < 0.2  # independent features
    anisotropic = x * torch.linspace(0.1, 3.0, 16, dtype=torch.float64)
    assert linear_cka(x, anisotropic) < 0.95  # not invariant to general linear maps
    assert linear_cka(x, torch.zeros_like(x)) == 0.0


@pytest.mark.parametrize("residual", [False, True])
def test_least_squares_probe_recovers_an_exact_linear_map(residual):
    inputs = features(200, 12)
    matrix, offset = features(12, 12, seed=3), features(1, 12, seed=4)[0]
    targets = inputs @ matrix + offset
    probe = fit_linear(inputs, targets, ridge=0.0, residual=residual)
    assert (probe(inputs) - targets).abs().max() < 1e-5
    assert (probe.weight - matrix).abs().max() < 1e-5 and (probe.bias - offset).abs().max() < 1e-5
    held_out = features(50, 12, seed=5)
    assert (probe(held_out) - (held_out @ matrix + offset)).abs().max() < 1e-5
    shrunk = fit_linear(inputs.float(), targets.float(), ridge=1e-6, residual=residual)
    assert shrunk.weight.dtype == torch.float64 and (shrunk(inputs) - targets).abs().max() < 1e-2


def test_residual_ridge_shrinks_towards_identity():
    inputs = features(40, 8)
    targets = inputs @ features(8, 8, seed=6)
    heavy = fit_linear(inputs, targets, ridge=1e6, residual=True)
    assert (heavy.weight - torch.eye(8, dtype=torch.float64)).abs().max() < 1e-3
    assert fit_linear(inputs, targets, ridge=1e6).weight.abs().max() < 1e-3


def brute_force(values, weights, capacity) -> float:
    best = 0.0
    for subset in itertools.product([0, 1], repeat=len(values)):
        if sum(w for w, s in zip(weights, subset) if s) <= capacity:
            best = max(best, sum(v for v, s in zip(values, subset) if s))
    return best


@pytest.mark.parametrize("seed", range(4))
def test_knapsack_dp_matches_brute_force_on_12_items(seed):
    generator = torch.Generator().manual_seed(seed)
    values = torch.rand(12, generator=generator).tolist()
    weights = torch.randint(1, 9, (12,), generator=generator).tolist()
    capacity = sum(weights) // 2
    chosen = knapsack(values, weights, capacity)
    assert sum(weights[i] for i in chosen) <= capacity
    assert sum(values[i] for i in chosen) == pytest.approx(brute_force(values, weights, capacity), abs=1e-12)
    greedy = knapsack(values, weights, capacity, method="greedy")
    assert sum(weights[i] for i in greedy) <= capacity
    assert sum(values[i] for i in greedy) <= sum(values[i] for i in chosen) + 1e-12


def test_knapsack_fills_equal_weights_even_with_zero_values():
    values = [0.0, 0.5, 0.0, 0.2, 0.0, 0.0]
    for method in ("dp", "greedy"):
        assert knapsack(values, [1] * 6, 4, method=method) == [0, 1, 2, 3]  # ties go to lower indices
        assert len(knapsack([0.0] * 6, [1] * 6, 3, method=method)) == 3
    with pytest.raises(ValueError, match="choices"):
        knapsack(values, [1] * 6, 3, method="anneal")
    with pytest.raises(ValueError, match="equal-length"):
        knapsack(values, [1] * 5, 3)


def test_correlations():
    assert correlations([1, 2, 3, 4], [2, 4, 6, 8]) == pytest.approx({"pearson": 1.0, "spearman": 1.0})
    assert correlations([1, 2, 3, 4], [1, 8, 27, 64.5])["spearman"] == pytest.approx(1.0)
    assert math.isnan(correlations([1, 1, 1], [1, 2, 3])["pearson"])


def test_interval_scores_see_identity_runs():
    generator = torch.Generator().manual_seed(0)
    h0 = torch.randn(400, 8, generator=generator)
    h1 = torch.tanh(3 * h0 @ torch.randn(8, 8, generator=generator))  # a non-linear block
    states = torch.stack([h0, h1, h1, h1, torch.tanh(2 * h1 + 1) ** 2])  # blocks 1, 2 are the identity
    samples = torch.arange(400) // 10
    scores, identity = interval_scores(states, samples, max_span=3, ridge=1e-6)
    assert scores.shape == (4, 3) and torch.isnan(scores[3, 1:]).all() and torch.isnan(scores[2, 2])
    assert scores[1, 0] == pytest.approx(1.0, abs=1e-9) and scores[1, 1] == pytest.approx(1.0, abs=1e-9)
    assert scores[0, 0] < 0.99 and scores[3, 0] < 0.99
    assert identity[1] == pytest.approx(1.0) and identity[2] == pytest.approx(1.0) and identity[0] < 0.9


def test_choose_intervals_knee_budget_and_representative():
    nan = float("nan")
    scores = torch.tensor(
        [
            [0.90, 0.50, 0.40, 0.30],
            [0.99, 0.98, 0.97, 0.60],  # knee after span 3: [1, 3]
            [0.99, 0.98, 0.70, nan],
            [0.95, 0.90, nan, nan],
            [0.90, nan, nan, nan],
        ],
        dtype=torch.float64,
    )
    importance = torch.tensor([0.5, 0.1, 0.1, 0.2, 0.3])
    plan = choose_intervals(scores, 2, importance, tau=0.1, tau_unit="absolute")
    assert [(i["start"], i["end"], i["keep"]) for i in plan.intervals] == [(1, 3, 2)] and plan.singles == []
    assert plan.knees == [1, 3, 2, 2, 1] and plan.threshold == 0.1
    start = choose_intervals(scores, 2, importance, 0.1, "absolute", representative="start")
    assert start.intervals[0]["keep"] == 1
    one = choose_intervals(scores, 1, importance, 0.1, "absolute")  # span 3 would overshoot
    assert [(i["start"], i["end"]) for i in one.intervals] == [(1, 2)]
    for num_remove in range(5):  # always exactly the budget, falling back to single blocks
        plan = choose_intervals(scores, num_remove, importance, 0.1, "absolute")
        removed = len(plan.singles) + sum(i["span"] - (i["keep"] is not None) for i in plan.intervals)
        assert removed == num_remove
    assert choose_intervals(scores, 3, importance, 0.1, "absolute").singles == [4]  # least important outside
    with pytest.raises(ValueError, match="choices"):
        choose_intervals(scores, 1, importance, representative="average")


def test_knee_in_block_units_is_scale_free():
    nan = float("nan")
    rows = [[0.10, 0.5], [0.01, 0.02], [0.01, 0.30], [0.03, 0.04], [0.05, nan]]
    distances = torch.tensor(rows, dtype=torch.float64)
    importance = torch.zeros(5)
    for shrink in (1.0, 1e-3):  # CKA saturating towards 1 leaves the choice unchanged
        plan = choose_intervals(1 - shrink * distances, 1, importance, tau=2.0)  # threshold 2 x median 0.03
        assert plan.threshold == pytest.approx(0.06 * shrink)
        assert plan.knees == [1, 2, 1, 2, 1] and [(i["start"], i["end"]) for i in plan.intervals] == [(1, 2)]
    saturated = choose_intervals(1 - 1e-3 * distances, 1, importance, tau=0.06, tau_unit="absolute")
    assert saturated.knees == [2, 2, 2, 2, 1]  # an absolute threshold no longer sees the knees
