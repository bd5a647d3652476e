"""Small solvers behind block selection: linear CKA, ridge probes, a 0/1 knapsack, rank correlations.

They carry no DiT knowledge, so ``analysis.py`` reads as the criteria themselves and each solver is
tested on its own (exact recovery, brute force). Solves run in float64: a probe between residual
states of a few thousand tokens is ill-conditioned in float32 (the PPCL repo's bf16 fit is a pitfall).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from scipy import stats


def linear_cka(features_x: torch.Tensor, features_y: torch.Tensor) -> float:
    """Linear CKA of ``(n, D1)``, ``(n, D2)``: ``||Y^T X||_F^2 / (||X^T X||_F ||Y^T Y||_F)``, columns centred.

    1 for identical representations, invariant to isotropic scaling and orthogonal maps; 0 if one is constant.
    """
    x = features_x.double() - features_x.double().mean(0)
    y = features_y.double() - features_y.double().mean(0)
    cross = (y.T @ x).square().sum()
    norm = torch.linalg.matrix_norm(x.T @ x) * torch.linalg.matrix_norm(y.T @ y)
    return float(cross / norm) if norm > 0 else 0.0


@dataclass
class LinearProbe:
    """``y = x @ weight + bias`` with ``weight: (D_in, D_out)``, ``bias: (D_out,)`` (float64)."""

    weight: torch.Tensor
    bias: torch.Tensor

    def __call__(self, inputs: torch.Tensor) -> torch.Tensor:
        """``(n, D_in)`` -> ``(n, D_out)`` in float64."""
        return inputs.double() @ self.weight + self.bias


def fit_linear(
    inputs: torch.Tensor, targets: torch.Tensor, ridge: float = 0.0, residual: bool = False
) -> LinearProbe:
    """Least-squares map ``inputs (n, D_in) -> targets (n, D_out)`` with an intercept, solved in float64.

    ``ridge`` is relative (``lambda = ridge * trace(X^T X) / D_in`` on centred inputs) so one value suits
    any width and activation scale; 0 is plain least squares (minimum-norm if rank-deficient).
    ``residual=True`` fits ``targets - inputs`` and adds the identity back, so the penalty pulls the map
    towards "skip" rather than towards zero (the residual-linear init of PPCL; needs D_in == D_out).
    """
    x, y = inputs.double(), targets.double()
    if residual:
        if x.shape[1] != y.shape[1]:
            raise ValueError(f"a residual probe needs equal widths, got {x.shape[1]} -> {y.shape[1]}")
        y = y - x
    x_mean, y_mean = x.mean(0), y.mean(0)
    x_centred, y_centred = x - x_mean, y - y_mean
    if ridge > 0:
        gram = x_centred.T @ x_centred
        penalty = ridge * gram.diagonal().mean().clamp_min(1e-30)
        gram.diagonal().add_(penalty)
        weight = torch.linalg.solve(gram, x_centred.T @ y_centred)
    else:
        weight = torch.linalg.lstsq(x_centred, y_centred, driver="gelsd").solution
    if residual:
        weight = weight + torch.eye(x.shape[1], dtype=torch.float64)
        y_mean = y_mean + x_mean
    return LinearProbe(weight=weight, bias=y_mean - x_mean @ weight)


def knapsack(values: Sequence[float], weights: Sequence[int], capacity: int, method: str = "dp") -> list[int]:
    """Indices maximising ``sum(values)`` with ``sum(weights) <= capacity`` (integer weights >= 0).

    ``dp``: exact dynamic programme over total weight, O(n * capacity); among optimal sets it returns one
    of largest total weight, so zero-value items still fill the budget (LAPTOP keeps exactly num_keep
    equal blocks even when some blocks cost nothing). ``greedy``: value/weight ratio order, the classic
    approximation, for capacities too large to tabulate. Quantise parameter counts before calling.
    """
    values = np.asarray(values, dtype=np.float64)
    weights = np.asarray(weights, dtype=np.int64)
    if values.shape != weights.shape or values.ndim != 1:
        raise ValueError(
            f"knapsack needs equal-length 1-D values and weights, got {values.shape} and {weights.shape}"
        )
    if (weights < 0).any() or capacity < 0:
        raise ValueError("knapsack weights and capacity must be non-negative integers")
    if method == "greedy":
        ratio = np.divide(values, weights, out=np.full_like(values, np.inf), where=weights > 0)
        chosen, used = [], 0
        for index in sorted(range(len(values)), key=lambda i: (-ratio[i], i)):
            if values[index] >= 0 and used + weights[index] <= capacity:
                chosen.append(index)
                used += int(weights[index])
        return sorted(chosen)
    if method != "dp":
        raise ValueError(f"unknown knapsack method {method!r}; choices: ['dp', 'greedy']")
    best = np.full(capacity + 1, -np.inf)  # best[w]: top value with total weight exactly w
    best[0] = 0.0
    take = np.zeros((len(values), capacity + 1), dtype=bool)
    for index, (value, weight) in enumerate(zip(values, weights)):
        if weight > capacity:
            continue
        candidate = np.full(capacity + 1, -np.inf)
        candidate[weight:] = best[: capacity + 1 - weight] + value
        take[index] = candidate > best
        best = np.maximum(best, candidate)
    top = best.max()
    tolerance = 1e-12 * max(1.0, abs(top))
    used = int(np.flatnonzero(best >= top - tolerance).max())
    chosen = []
    for index in range(len(values) - 1, -1, -1):
        if take[index, used]:
            chosen.append(index)
            used -= int(weights[index])
    return sorted(chosen)


def correlations(measured: Sequence[float], predicted: Sequence[float]) -> dict[str, float]:
    """Pearson and Spearman correlation of two equal-length series (NaN if either is constant)."""
    measured, predicted = np.asarray(measured, dtype=np.float64), np.asarray(predicted, dtype=np.float64)
    if len(measured) < 2 or np.ptp(measured) == 0 or np.ptp(predicted) == 0:
        return {"pearson": float("nan"), "spearman": float("nan")}
    return {
        "pearson": float(stats.pearsonr(measured, predicted).statistic),
        "spearman": float(stats.spearmanr(measured, predicted).statistic),
    }


def interval_scores(states: torch.Tensor, samples: torch.Tensor, max_span: int = 8, ridge: float = 1e-3,
                    holdout: float = 0.25, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """PPCL's probe scan over block-boundary states ``states: (L + 1, n, D)`` (row ``s`` enters block ``s``).

    For every start ``s`` and span ``k`` a residual ridge probe ``h_s -> h_{s+k}`` is fitted on the
    training rows and scored on held-out rows (whole calibration samples, from ``samples: (n,)``) by
    ``S[s, k-1] = CKA(P(h_s), h_{s+k})``. One Gram matrix per start serves all spans. Returns ``S: (L, K)``
    (NaN where ``s + k > L``) and ``identity: (L,)``, ``CKA(h_s, h_{s+1})`` (how little block s changes).
    """
    depth, width = states.shape[0] - 1, states.shape[-1]
    max_span = min(max_span, depth)
    generator = torch.Generator().manual_seed(seed)
    groups = samples.unique()
    if len(groups) >= 2:  # hold out whole calibration samples: tokens of one image are correlated
        count = min(len(groups) - 1, max(1, round(holdout * len(groups))))
        test = torch.isin(samples, groups[torch.randperm(len(groups), generator=generator)[:count]])
    else:
        count = max(1, round(holdout * len(samples)))
        test = torch.zeros(len(samples), dtype=torch.bool)
        test[torch.randperm(len(samples), generator=generator)[:count]] = True
    scores = torch.full((depth, max_span), float("nan"), dtype=torch.float64)
    identity = torch.zeros(depth, dtype=torch.float64)
    for start in range(depth):
        spans = range(1, min(max_span, depth - start) + 1)
        source = states[start].double()
        targets = torch.cat([states[start + k][~test].double() - source[~test] for k in spans], dim=1)
        predicted = fit_linear(source[~test], targets, ridge)(source[test])  # (n_test, |spans| * D) residuals
        for k in spans:
            estimate = source[test] + predicted[:, (k - 1) * width : k * width]
            scores[start, k - 1] = linear_cka(estimate, states[start + k][test])
        identity[start] = linear_cka(states[start], states[start + 1])
    return scores, identity


REPRESENTATIVES = ("middle", "start", "end")
ORDERS = ("score", "cost")
TAU_UNITS = ("block", "absolute")


@dataclass
class IntervalPlan:
    """Chosen intervals (dicts with ``start``, ``end``, ``keep``, ``span``, ``cka``, ``score``, ``knee``),
    whole blocks dropped by the fallback, the knee span of every start and the threshold used."""

    intervals: list[dict]
    singles: list[int]
    knees: list[int]
    threshold: float


def choose_intervals(scores: torch.Tensor, num_remove: int, importance: torch.Tensor, tau: float = 2.0,
                     tau_unit: str = "block", representative: str = "middle", order: str = "score",
                     absorb: bool = False) -> IntervalPlan:  # fmt: skip
    """PPCL's interval choice on ``scores: (L, K)`` (:func:`interval_scores`) removing ``num_remove`` blocks.

    An interval ``[s, e]`` of span ``k = e - s + 1`` teacher blocks collapses to one kept block (``middle``
    ``floor((s + e) / 2)`` as PPCL copies, or ``start`` / ``end``), removing ``k - 1``. Its longest span is
    the knee: the first ``k`` with ``S[s,k] - S[s,k+1] > threshold`` (else the longest measured). The
    threshold is ``tau`` itself (``tau_unit="absolute"``, the spec's rule) or, by default, ``tau`` times the
    median one-block distance ``1 - S[:, 0]`` (``"block"``): CKA between residual states saturates near 1
    (0.999+ on trained toy DiTs), so an absolute threshold never fires. Candidates ``[s, s+k-1]`` for
    ``2 <= k <= knee(s)`` are taken greedily, if disjoint from those chosen and within the remaining
    budget, by ``order``: ``score`` = highest ``k * S`` first (the spec's rule) or ``cost`` = lowest
    ``(1 - S) / (k - 1)``, the probe's loss per removed block. If they cannot meet the budget, the fallback
    drops whole blocks outside every interval, least ``importance: (L,)`` first, and then (rarely) the
    kept block of the weakest interval, whose ``keep`` becomes None (the interval is bypassed).
    With ``absorb`` [interp], a run of fallback blocks next to a chosen interval joins it (left neighbour
    first; ``absorbed`` lists them, ``keep`` moves to the new representative), so a trained replacement
    stands for it instead of nothing; runs next to no interval stay dropped.
    """
    checks = (("representative", representative, REPRESENTATIVES), ("order", order, ORDERS),
              ("tau_unit", tau_unit, TAU_UNITS))  # fmt: skip
    for name, value, choices in checks:
        if value not in choices:
            raise ValueError(f"unknown {name} {value!r}; choices: {list(choices)}")
    depth, max_span = scores.shape
    if not 0 <= num_remove < depth:
        raise ValueError(f"cannot remove {num_remove} of {depth} blocks; at least one must stay")
    threshold = tau * float((1 - scores[:, 0]).median()) if tau_unit == "block" else tau
    knees = []
    for start in range(depth):
        valid = [k for k in range(1, max_span + 1) if not math.isnan(float(scores[start, k - 1]))]
        drops = [k for k in valid[:-1] if float(scores[start, k - 1] - scores[start, k]) > threshold]
        knees.append(drops[0] if drops else valid[-1])
    candidates = [(k * float(scores[s, k - 1]), s, k) for s in range(depth) for k in range(2, knees[s] + 1)]
    if order == "score":
        candidates.sort(key=lambda c: (-c[0], c[1], c[2]))
    else:
        candidates.sort(key=lambda c: ((1 - c[0] / c[2]) / (c[2] - 1), c[1], -c[2]))
    intervals, covered, remaining = [], set(), num_remove
    for score, start, span in candidates:
        blocks = set(range(start, start + span))
        if remaining == 0:
            break
        if span - 1 <= remaining and covered.isdisjoint(blocks):
            end = start + span - 1
            keep = {"middle": (start + end) // 2, "start": start, "end": end}[representative]
            intervals.append({"start": start, "end": end, "keep": keep, "span": span,
                              "cka": float(scores[start, span - 1]), "score": score,
                              "knee": knees[start]})  # fmt: skip
            covered |= blocks
            remaining -= span - 1
    outside = sorted((b for b in range(depth) if b not in covered), key=lambda b: (float(importance[b]), b))
    singles = sorted(outside[:remaining])
    remaining -= len(singles)
    for interval in sorted(intervals, key=lambda i: (i["score"], i["start"]))[:remaining]:
        interval["keep"] = None
    if absorb:
        singles = _absorb(intervals, singles, representative)
    return IntervalPlan(sorted(intervals, key=lambda i: i["start"]), singles, knees, threshold)


def _absorb(intervals: list[dict], singles: list[int], representative: str) -> list[int]:
    """Merge each run of consecutive dropped ``singles`` into an adjacent interval with a kept block; returns
    the singles left over. Edits ``intervals`` in place."""
    runs: list[list[int]] = []
    for block in sorted(singles):
        if runs and runs[-1][-1] == block - 1:
            runs[-1].append(block)
        else:
            runs.append([block])
    left_over = []
    for run in runs:
        live = [i for i in intervals if i["keep"] is not None]
        target = next((i for i in live if i["end"] + 1 == run[0]), None)
        target = target or next((i for i in live if i["start"] == run[-1] + 1), None)
        if target is None:
            left_over.extend(run)
            continue
        target["start"], target["end"] = min(target["start"], run[0]), max(target["end"], run[-1])
        target["span"] = target["end"] - target["start"] + 1
        target["absorbed"] = sorted([*target.get("absorbed", []), *run])
        target["keep"] = {"middle": (target["start"] + target["end"]) // 2, "start": target["start"],
                          "end": target["end"]}[representative]  # fmt: skip
    return left_over
