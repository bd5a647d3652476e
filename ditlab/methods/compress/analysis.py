"""Which blocks of a trained DiT to keep when depth-pruning it to ``num_keep`` blocks.

One call, :func:`select_blocks`, several criteria (higher score = more important):

- ``random`` / ``first`` / ``last``: the baselines every pruning table needs.
- ``laptop``: LAPTOP-Diff ("LAPTOP-Diff: Layer Pruning and Normalized Distillation for Compressing
  Diffusion Models", arXiv 2404.11098). One-shot output loss ``C_i = E||out^(-i) - out||^2`` with block
  i skipped; the loss of a set is close to the sum, so a 0/1 knapsack picks the cheapest blocks to drop.
  :func:`additivity_diagnostic` checks that assumption on the network at hand.
  When the check is asked for (``additivity_sets``) and its Spearman correlation falls below
  ``min_spearman``, the choice falls back to iterative removal (drop the block whose removal, given those
  already removed, costs least; the spec's pitfall), and ``solver="iterative"`` asks for it directly.
- ``amber``: Amber-Image (arXiv 2602.17047) timestep-sensitive importance
  ``I_{l,b} = E||v - v^(-l)||^2 / E||v||^2`` per timestep bin, aggregated by max (a block that matters at
  a few noise levels survives), mean or a quantile; the top ``num_keep`` are kept.
- ``ppcl``: PPCL ("Pluggable Pruning with Contiguous Layer Distillation", arXiv 2511.16156) interval
  discovery ([interp] in the spec): ridge probes between block-boundary states, linear CKA, a knee in
  the first difference, greedy non-overlapping intervals (see :func:`choose_intervals`). Its
  :attr:`Selection.segments` are the plan's intervals, so training distils exactly what the plan says.
- ``tinyfusion``: TinyFusion (arXiv 2412.01199): a learned N:M layer mask trained jointly with a short
  weight update (:mod:`ditlab.methods.compress.tinyfusion`); the weight update is discarded afterwards.

Text-to-image networks (PixArt, SD3 MM-DiT, FLUX): ``labels`` are the captions' ``TextFeatures``; a skipped MM-DiT
block skips both streams; PPCL's probes read the whole ``[text; image]`` sequence the blocks carry [interp]. A FLUX
network's double- and single-stream blocks are pruned by their own criteria and budgets (:func:`stream_groups`,
:func:`select_blocks`); PPCL and TinyFusion choose over the whole stack (PPCL's intervals may cross stream types).

Calibration ([interp]): each image is noised once, at one of ``num_timesteps`` bin centres (integer DDPM
steps across ``0..T-1`` or flow times in (0, 1), ditlab's convention: larger t is noise), bins assigned
in a seeded stratified order, so a set of B images costs B network passes per ablation. Errors are
measured on the prediction channels only (a learned-sigma half is ignored). Pure PyTorch, no Lightning.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field

import torch

from ditlab.diffusion import FlowMatching, GaussianDiffusion
from ditlab.methods.compress.ppcl import plan_segments
from ditlab.methods.compress.probes import (
    ORDERS,
    REPRESENTATIVES,
    TAU_UNITS,
    choose_intervals,
    correlations,
    interval_scores,
    knapsack,
)
from ditlab.methods.compress.prune import segments as keep_segments
from ditlab.methods.compress.prune import stream_kind
from ditlab.models.dit import DiT
from ditlab.models.taps import block_io, run_blocks

CRITERIA = ("random", "first", "last", "ppcl", "laptop", "amber", "tinyfusion")
OPTIONS: dict[str, dict[str, object]] = {
    "random": {},
    "first": {},
    "last": {},
    "laptop": {"batch_size": 256, "solver": "dp", "additivity_sets": 0, "min_spearman": 0.8},
    "amber": {"batch_size": 256, "aggregate": "max", "quantile": 0.9, "protect": 0},
    "ppcl": {"batch_size": 256, "max_span": 8, "tau": 2.0, "tau_unit": "block", "ridge": 1e-3,
             "max_tokens": 4096, "holdout": 0.25, "representative": "middle", "order": "cost", "absorb": True},
    "tinyfusion": {"group_size": 2, "steps": 100, "batch_size": 32, "lr": 1e-4, "gate_lr_factor": 10.0,
                   "tau": (4.0, 0.1), "scaling": 100.0, "update_weights": True, "clip_norm": 1.0, "ema_decay": 0.999},
}  # fmt: skip
AGGREGATES = ("max", "mean", "quantile")
CHOICES = {
    "solver": ("dp", "greedy", "iterative"),
    "aggregate": AGGREGATES,
    "representative": REPRESENTATIVES,
    "order": ORDERS,
    "tau_unit": TAU_UNITS,
}

Forward = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, tuple[int, ...]], torch.Tensor]
"""``forward(x, t, y, skip) -> (B, C_out, H, W)``: the network with the blocks in ``skip`` bypassed."""


@dataclass
class Selection:
    """The outcome of one criterion: what to keep, per-block importance and the evidence behind it."""

    criterion: str
    keep: list[int]
    """Sorted 0-based block indices to keep, ``len == num_keep``."""
    scores: torch.Tensor
    """``(depth,)`` importance per block, higher = more important (baselines: 1 kept, 0 dropped)."""
    table: dict = field(default_factory=dict)
    """Criterion-specific details (cost vector, per-bin matrix, CKA matrix and intervals, ...)."""
    segments: list[tuple[int, int]] = field(default_factory=list)
    """``(first, last)`` teacher blocks each kept block stands for (what its features are distilled to);
    PPCL: the plan's intervals, elsewhere :func:`ditlab.methods.compress.prune.segments` of ``keep``."""

    def __post_init__(self) -> None:
        if not self.segments:
            self.segments = keep_segments(len(self.scores), self.keep)


@dataclass
class Calibration:
    """Noisy inputs shared by every ablation: ``x: (M, C, H, W)``, network times ``t: (M,)``,
    ``labels: (M,)``, the timestep bin of each sample ``bins: (M,)``, each bin's objective time
    ``times: (num_bins,)`` and the number of prediction ``channels``."""

    x: torch.Tensor
    t: torch.Tensor
    labels: torch.Tensor
    bins: torch.Tensor
    times: torch.Tensor
    channels: int


def calibration_set(objective: GaussianDiffusion | FlowMatching, images: torch.Tensor, labels: torch.Tensor,
                    num_timesteps: int = 8, seed: int = 0) -> Calibration:  # fmt: skip
    """Noise ``images (M, C, H, W)`` at bin-centre times, deterministically from ``seed`` (CPU generator)."""
    count = images.shape[0]
    if not 1 <= num_timesteps <= count:
        raise ValueError(f"num_timesteps={num_timesteps} needs between 1 and {count} (the number of images)")
    generator = torch.Generator().manual_seed(seed)
    bins = torch.empty(count, dtype=torch.long)
    bins[torch.randperm(count, generator=generator)] = torch.arange(count) % num_timesteps
    noise = torch.randn(images.shape, generator=generator).to(images)
    centres = (torch.arange(num_timesteps, dtype=torch.float64) + 0.5) / num_timesteps
    times = objective.time_at(centres)
    t = times[bins].to(images.device)
    x, model_t = objective.add_noise(images, t, noise), objective.model_time(t)
    return Calibration(x, model_t, labels.to(images.device), bins, times, images.shape[1])


def network_forward(dit: DiT) -> Forward:
    """The :data:`Forward` of a DiT, skipping blocks through ``run_blocks`` (no patching)."""
    return lambda x, t, y, skip: run_blocks(dit, x, t, y, skip=skip).output


def ablation_errors(forward: Forward, calibration: Calibration, removals: Sequence[Sequence[int]],
                    batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """Per-sample output distortion of each removal set against the full network.

    Returns ``errors: (len(removals), M)``, the mean squared change of the prediction channels, and
    ``reference: (M,)``, the mean square of the full prediction (the Amber normaliser).
    """
    count, channels = calibration.x.shape[0], calibration.channels
    errors, reference = torch.zeros(len(removals), count), torch.zeros(count)
    with torch.no_grad():
        for start in range(0, count, batch_size):
            part = slice(start, start + batch_size)
            inputs = (calibration.x[part], calibration.t[part], calibration.labels[part])
            full = forward(*inputs, ())[:, :channels].float()
            reference[part] = full.square().flatten(1).mean(1).cpu()
            for row, removed in enumerate(removals):
                ablated = forward(*inputs, tuple(removed))[:, :channels].float()
                errors[row, part] = (ablated - full).square().flatten(1).mean(1).cpu()
    return errors, reference


def laptop_costs(
    forward: Forward, calibration: Calibration, depth: int, batch_size: int = 256, blocks: Sequence[int] | None = None
) -> torch.Tensor:
    """LAPTOP's one-shot criterion ``C_i = E||out^(-i) - out||^2``, ``(depth,)``; with ``blocks``, only those are
    ablated (the rest NaN)."""
    blocks = list(range(depth)) if blocks is None else list(blocks)
    errors, _ = ablation_errors(forward, calibration, [(i,) for i in blocks], batch_size)
    costs = torch.full((depth,), float("nan"))
    costs[blocks] = errors.mean(1)
    return costs


def amber_importance(
    forward: Forward, calibration: Calibration, depth: int, batch_size: int = 256, blocks: Sequence[int] | None = None
) -> torch.Tensor:
    """Amber's ``I_{l,b} = sum_b ||v - v^(-l)||^2 / sum_b ||v||^2`` per block and bin, ``(depth, num_bins)``; with
    ``blocks``, only those rows are measured (the rest NaN).

    A ratio of bin means rather than a mean of ratios, so near-zero outputs do not dominate.
    """
    blocks = list(range(depth)) if blocks is None else list(blocks)
    errors, reference = ablation_errors(forward, calibration, [(i,) for i in blocks], batch_size)
    num_bins = len(calibration.times)
    onehot = torch.nn.functional.one_hot(calibration.bins, num_bins).float()  # (M, num_bins)
    importance = torch.full((depth, num_bins), float("nan"))
    importance[blocks] = (errors @ onehot) / (reference @ onehot).clamp_min(1e-12)
    return importance


def aggregate_bins(importance: torch.Tensor, how: str = "max", quantile: float = 0.9) -> torch.Tensor:
    """``(depth, num_bins) -> (depth,)`` by ``max``, ``mean`` or ``quantile`` over bins."""
    if how == "max":
        return importance.amax(1)
    if how == "mean":
        return importance.mean(1)
    if how == "quantile":
        return importance.quantile(quantile, dim=1)
    raise ValueError(f"unknown aggregate {how!r}; choices: {list(AGGREGATES)}")


def additivity(forward: Forward, calibration: Calibration, depth: int, costs: torch.Tensor | None = None,
               num_sets: int = 50, sizes: Sequence[int] = (2, 3), seed: int = 0,
               batch_size: int = 256, blocks: Sequence[int] | None = None) -> dict:  # fmt: skip
    """LAPTOP's additivity check: ``C(R)`` against ``sum_{i in R} C_i`` over random sets ``R``.

    Draws ``num_sets`` distinct sets of ``blocks`` (default all), sizes cycling through ``sizes``; returns the sets,
    both series and their Pearson / Spearman correlations. A low correlation means the one-shot choice is
    unreliable (fall back to iterative removal).
    """
    blocks = list(range(depth)) if blocks is None else list(blocks)
    if costs is None:
        costs = laptop_costs(forward, calibration, depth, batch_size, blocks)
    generator = torch.Generator().manual_seed(seed)
    available = sum(math.comb(len(blocks), size) for size in sizes)
    chosen: list[tuple[int, ...]] = []
    for size in itertools.islice(itertools.cycle(sizes), 100 * num_sets):
        if len(chosen) >= min(num_sets, available):
            break
        candidate = tuple(sorted(blocks[i] for i in torch.randperm(len(blocks), generator=generator)[:size].tolist()))
        if len(candidate) == size and candidate not in chosen:
            chosen.append(candidate)
    errors, _ = ablation_errors(forward, calibration, chosen, batch_size)
    measured = errors.mean(1).tolist()
    predicted = [float(costs[list(removal)].sum()) for removal in chosen]
    return {"sets": [list(s) for s in chosen], "measured": measured, "predicted": predicted,
            **correlations(measured, predicted)}  # fmt: skip


@torch.no_grad()
def collect_states(dit: DiT, calibration: Calibration, max_tokens: int = 4096, seed: int = 0,
                   batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """Block-boundary tokens ``h_0..h_L`` at a seeded subset of (sample, token) positions.

    Returns ``states: (depth + 1, n, D)`` (float32, CPU) and ``samples: (n,)``, the calibration sample
    of each row (for a held-out split by image rather than by correlated tokens of one image).
    """
    count, tokens = calibration.x.shape[0], dit.x_embedder.num_patches
    if dit.text_stream:  # [interp] the probe reads the whole [text; image] sequence the blocks carry
        tokens += calibration.labels.tokens.shape[1]
    generator = torch.Generator().manual_seed(seed)
    picked = torch.randperm(count * tokens, generator=generator)[:max_tokens].sort().values
    rows = []
    for start in range(0, count, batch_size):
        part = slice(start, start + batch_size)
        local = picked[(picked >= start * tokens) & (picked < (start + batch_size) * tokens)] - start * tokens
        if len(local):
            states = block_io(dit, calibration.x[part], calibration.t[part], calibration.labels[part])
            rows.append(torch.stack([h.flatten(0, 1)[local.to(h.device)].float().cpu() for h in states]))
    return torch.cat(rows, dim=1), picked // tokens


def _ppcl(dit: DiT, calibration: Calibration, num_keep: int, seed: int, batch_size: int, max_span: int,
          tau: float, tau_unit: str, ridge: float, max_tokens: int, holdout: float, representative: str,
          order: str, absorb: bool) -> Selection:  # fmt: skip
    states, samples = collect_states(dit, calibration, max_tokens, seed, batch_size)
    scores_matrix, identity = interval_scores(states, samples, max_span, ridge, holdout, seed)
    importance = (1.0 - identity).clamp_min(0.0).float()
    plan = choose_intervals(
        scores_matrix, dit.depth - num_keep, importance, tau, tau_unit, representative, order, absorb
    )
    segments, keep = plan_segments(plan, dit.depth)
    table = {"S": scores_matrix, "delta": scores_matrix[:, :-1] - scores_matrix[:, 1:],
             "intervals": plan.intervals, "dropped_singles": plan.singles, "knees": plan.knees,
             "threshold": plan.threshold,
             "identity_cka": identity, "tau": tau, "tau_unit": tau_unit, "max_span": max_span,
             "representative": representative, "order": order, "absorb": absorb}  # fmt: skip
    return Selection("ppcl", keep, importance, table, segments)


def iterative_removal(forward: Forward, calibration: Calibration, depth: int, num_remove: int,
                      batch_size: int = 256, blocks: Sequence[int] | None = None) -> tuple[list[int], list[float]]:  # fmt: skip
    """Greedy removal that needs no additivity: ``num_remove`` times, drop the block of ``blocks`` (default all)
    whose removal *together with those already dropped* changes the output least. Returns the dropped blocks in
    order and the measured ``C(R)`` after each drop (``len(blocks) * num_remove`` ablations)."""
    blocks = list(range(depth)) if blocks is None else list(blocks)
    dropped: list[int] = []
    costs: list[float] = []
    for _ in range(num_remove):
        candidates = [b for b in blocks if b not in dropped]
        errors, _ = ablation_errors(forward, calibration, [(*dropped, b) for b in candidates], batch_size)
        best = int(errors.mean(1).argmin())
        dropped.append(candidates[best])
        costs.append(float(errors.mean(1)[best]))
    return dropped, costs


def _laptop(dit: DiT, calibration: Calibration, num_keep: int, seed: int, batch_size: int, solver: str,
            additivity_sets: int, min_spearman: float, within: Sequence[int] | None = None) -> Selection:  # fmt: skip
    within = list(range(dit.depth)) if within is None else list(within)
    forward = network_forward(dit)
    costs = laptop_costs(forward, calibration, dit.depth, batch_size, within)
    table: dict = {"costs": costs, "solver": solver}
    if additivity_sets:
        table["additivity"] = additivity(forward, calibration, dit.depth, costs, additivity_sets, seed=seed,
                                         batch_size=batch_size, blocks=within)  # fmt: skip
        spearman = table["additivity"]["spearman"]
        if solver != "iterative" and not spearman >= min_spearman:  # NaN (constant costs) also falls back
            table["fallback"] = f"additivity spearman {spearman:.3g} < min_spearman {min_spearman}: iterative removal"
            solver = "iterative"
    if solver == "iterative":
        dropped, path = iterative_removal(forward, calibration, dit.depth, len(within) - num_keep, batch_size, within)
        table["removal_path"] = path
    else:  # dropping the cheapest set under the budget == keeping the costliest num_keep equal blocks
        chosen = knapsack(costs[within].tolist(), [1] * len(within), num_keep, method=solver)
        dropped = [b for i, b in enumerate(within) if i not in chosen]
    keep = [b for b in range(dit.depth) if b not in dropped]
    table.update(dropped=sorted(dropped), dropped_cost=float(costs[sorted(dropped)].sum()), used_solver=solver)
    return Selection("laptop", keep, costs, table)


def _amber(dit: DiT, calibration: Calibration, num_keep: int, seed: int, batch_size: int, aggregate: str,
           quantile: float, protect: int, within: Sequence[int] | None = None) -> Selection:  # fmt: skip
    within = list(range(dit.depth)) if within is None else list(within)
    per_bin = amber_importance(network_forward(dit), calibration, dit.depth, batch_size, within)
    scores = torch.full((dit.depth,), float("nan"))
    scores[within] = aggregate_bins(per_bin[within], aggregate, quantile)
    pinned = [*range(min(protect, dit.depth)), *range(max(dit.depth - protect, 0), dit.depth)]
    chosen = rank_keep(scores[within], num_keep, protect, pinned, within)
    keep = sorted([b for b in range(dit.depth) if b not in within] + chosen)
    table = {"per_bin": per_bin, "bin_times": calibration.times, "aggregate": aggregate, "protect": protect}
    return Selection("amber", keep, scores, table)


def rank_keep(scores: torch.Tensor, num_keep: int, protect: int = 0, pinned: Sequence[int] | None = None,
              blocks: Sequence[int] | None = None) -> list[int]:  # fmt: skip
    """The ``num_keep`` highest-scoring blocks, always including the first and last ``protect`` blocks.

    With ``blocks`` (the network blocks ``scores`` belong to, in order) the answer is among them and ``pinned``
    lists the network blocks ``protect`` pins (the network's first and last ``protect``)."""
    depth = len(scores)
    blocks = list(range(depth)) if blocks is None else list(blocks)
    if pinned is None:
        pinned = [*range(min(protect, depth)), *range(max(depth - protect, 0), depth)]
    protected = {i for i, b in enumerate(blocks) if b in set(pinned)}
    if len(protected) > num_keep:
        raise ValueError(
            f"protect={protect} pins {len(protected)} blocks but num_keep={num_keep}; lower protect"
        )
    order = sorted(range(depth), key=lambda b: (b not in protected, -float(scores[b]), b))
    return sorted(blocks[i] for i in order[:num_keep])


def _baseline(criterion: str, depth: int, num_keep: int, seed: int, within: Sequence[int] | None = None) -> Selection:
    within = list(range(depth)) if within is None else list(within)
    if criterion == "random":
        order = torch.randperm(len(within), generator=torch.Generator().manual_seed(seed))[:num_keep].tolist()
        chosen = [within[i] for i in order]
    else:
        chosen = within[:num_keep] if criterion == "first" else within[len(within) - num_keep :]
    keep = sorted([b for b in range(depth) if b not in within] + chosen)
    scores = torch.zeros(depth)
    scores[keep] = 1.0
    return Selection(criterion, keep, scores, {"seed": seed} if criterion == "random" else {})


def check_request(criterion: str, num_keep: int, depth: int, options: dict, minimum: int = 1) -> dict:
    """Validate a request in one line each; return the criterion's options with defaults filled in."""
    if criterion not in CRITERIA:
        raise ValueError(f"unknown criterion {criterion!r}; choices: {list(CRITERIA)}")
    if not isinstance(num_keep, int) or not minimum <= num_keep <= depth:
        raise ValueError(f"num_keep={num_keep} is out of range for a DiT of depth {depth}; choose {minimum}..{depth}")
    unknown = sorted(set(options) - set(OPTIONS[criterion]))
    if unknown:
        raise ValueError(
            f"unknown option(s) {unknown} for criterion {criterion!r}; choices: {sorted(OPTIONS[criterion])}"
        )
    for name, value in options.items():
        if name in CHOICES and value not in CHOICES[name]:
            raise ValueError(
                f"{name}={value!r} is not valid for {criterion!r}; choices: {list(CHOICES[name])}"
            )
    return {**OPTIONS[criterion], **options}


# --- stream types -----------------------------------------------------------------------------------------

WHOLE_STACK = ("ppcl", "tinyfusion")
"""Criteria that choose over the whole stack at once: PPCL's intervals may cross stream types (a plug may replace
double- and single-stream blocks by one), TinyFusion's N:M mask keeps the same share of every group."""


def stream_groups(dit: DiT) -> list[list[int]]:
    """Blocks pruned against each other: FLUX's double-stream blocks, then its single-stream blocks (two groups);
    every block of any other network (one group)."""
    kinds = [stream_kind(block) for block in dit.blocks]
    if {"double", "single"} <= set(kinds):
        double = [b for b, kind in enumerate(kinds) if kind == "double"]
        return [double, [b for b in range(dit.depth) if b not in double]]
    return [list(range(dit.depth))]


def split_budget(sizes: Sequence[int], num_keep: int) -> list[int]:
    """``num_keep`` blocks shared over groups of ``sizes`` in proportion (largest remainder), each non-empty group
    keeping at least one when there are enough."""
    total = sum(sizes)
    shares = [num_keep * size / total for size in sizes]
    budget = [int(share) for share in shares]
    for index in sorted(range(len(sizes)), key=lambda i: (budget[i] - shares[i], i))[: num_keep - sum(budget)]:
        budget[index] += 1
    if num_keep >= sum(1 for size in sizes if size):
        for index, size in enumerate(sizes):
            if size and not budget[index]:
                donor = max(range(len(budget)), key=lambda i: budget[i])
                budget[donor] -= 1
                budget[index] += 1
    return budget


def _merged(dit: DiT, groups: list[list[int]], selections: list[Selection], criteria: list[str],
            budgets: list[int]) -> Selection:  # fmt: skip
    """One selection from each group's selection (each kept every block outside its group)."""
    scores = torch.zeros(dit.depth)
    keep = []
    for group, selection in zip(groups, selections):
        scores[group] = selection.scores[group].float()
        keep += [b for b in selection.keep if b in group]
    if not keep:
        raise ValueError(f"the stream budgets {budgets} keep no block; keep at least one")
    table = {"stream_groups": [{"blocks": group, "kind": stream_kind(dit.blocks[group[0]]), "criterion": criterion,
                                "num_keep": budget, "keep": [b for b in selection.keep if b in group],
                                **selection.table}
                               for group, selection, criterion, budget in zip(groups, selections, criteria, budgets)]}  # fmt: skip
    name = criteria[0] if len(set(criteria)) == 1 else "+".join(criteria)
    return Selection(name, sorted(keep), scores, table)


def select_blocks(dit: DiT, objective: GaussianDiffusion | FlowMatching, images: torch.Tensor,
                  labels, criterion: str | Sequence[str], num_keep: int | Sequence[int], *, seed: int = 0,
                  num_timesteps: int = 8, **options) -> Selection:  # fmt: skip
    """Choose ``num_keep`` of ``dit``'s blocks by ``criterion`` (see the module docstring and ``OPTIONS``).

    ``images: (B, C, H, W)`` clean inputs in the network's space, ``labels``: ``(B,)`` class labels or the
    ``TextFeatures`` of a text-conditioned network; ``objective`` a ``GaussianDiffusion`` or ``FlowMatching``. Runs
    without gradients in eval mode and restores the mode.

    Stream types (:func:`stream_groups`): a FLUX network's double- and single-stream blocks are pruned by their own
    criteria and budgets [interp]: ``criterion`` may name one criterion per group and ``num_keep`` one count per
    group (an int is shared in proportion, :func:`split_budget`); each group's blocks are ranked only against each
    other (a double-stream block carries two streams' weights, so its ablation cost is not comparable with a
    single-stream block's). ``options`` go to the first group's criterion (and every group using it). PPCL and
    TinyFusion choose over the whole stack (:data:`WHOLE_STACK`).
    """
    groups = stream_groups(dit)
    criteria = [criterion] * len(groups) if isinstance(criterion, str) else list(criterion)
    if len(criteria) != len(groups):
        raise ValueError(f"criterion {criterion!r} names {len(criteria)} criteria for {len(groups)} stream groups "
                         f"(this network's blocks: {[len(g) for g in groups]}); give one name, or one per group")  # fmt: skip
    if any(name in WHOLE_STACK for name in criteria):
        if len(set(criteria)) > 1 or not isinstance(num_keep, int):
            raise ValueError(f"{'/'.join(sorted(set(criteria) & set(WHOLE_STACK)))} chooses over the whole stack (PPCL's "
                             "intervals may cross stream types, TinyFusion's N:M mask keeps the same share of each "
                             "group): give one criterion and one num_keep")  # fmt: skip
        return _select_stack(dit, objective, images, labels, criteria[0], num_keep, groups, seed, num_timesteps, options)
    if isinstance(num_keep, int):
        check_request(criteria[0], num_keep, dit.depth, options)
        budgets = split_budget([len(g) for g in groups], num_keep)
    else:
        budgets = [int(b) for b in num_keep]
        if len(budgets) != len(groups) or not 1 <= sum(budgets) <= dit.depth:
            raise ValueError(f"num_keep={list(num_keep)} must give one count per stream group {[len(g) for g in groups]} "
                             "keeping at least one block")  # fmt: skip
    requests = []
    for group, name, budget in zip(groups, criteria, budgets):
        own = options if name == criteria[0] else {}
        requests.append(check_request(name, budget, len(group), own, minimum=0 if len(groups) > 1 else 1))
    selections = []
    calibrate = any(name not in ("random", "first", "last") for name in criteria)
    with _calibrated(dit, objective, images, labels, num_timesteps, seed) if calibrate else nullcontext() as calibration:
        for group, name, budget, request in zip(groups, criteria, budgets, requests):
            if name in ("random", "first", "last"):
                selections.append(_baseline(name, dit.depth, budget, seed, group))
            else:
                run = {"laptop": _laptop, "amber": _amber}[name]
                selections.append(run(dit, calibration, budget, seed, within=group, **request))
    if len(groups) == 1:
        return selections[0]
    return _merged(dit, groups, selections, criteria, budgets)


def _select_stack(dit: DiT, objective, images: torch.Tensor, labels, criterion: str, num_keep: int,
                  groups: list[list[int]], seed: int, num_timesteps: int, options: dict) -> Selection:  # fmt: skip
    """PPCL or TinyFusion over the whole stack."""
    options = check_request(criterion, num_keep, dit.depth, options)
    if criterion == "tinyfusion":
        from ditlab.methods.compress.tinyfusion import learn_layer_mask

        if len(groups) > 1 and len(groups[0]) % options["group_size"]:
            raise ValueError(f"tinyfusion group_size={options['group_size']} would put double- and single-stream "
                             f"blocks in one N:M group ({len(groups[0])} double-stream blocks); choose a group_size "
                             f"that divides {len(groups[0])} and {len(groups[1])}")  # fmt: skip
        return learn_layer_mask(dit, objective, images, labels, num_keep, seed=seed, **options)
    with _calibrated(dit, objective, images, labels, num_timesteps, seed) as calibration:
        return _ppcl(dit, calibration, num_keep, seed, **options)


@contextmanager
def _calibrated(dit: DiT, objective: GaussianDiffusion | FlowMatching, images: torch.Tensor, labels: torch.Tensor,
                num_timesteps: int, seed: int) -> Iterator:  # fmt: skip
    """The calibration set on ``dit``'s device, with ``dit`` in eval mode and no gradients (mode restored after)."""
    parameter = next(dit.parameters())
    was_training = dit.training
    dit.eval()
    try:
        with torch.no_grad():
            yield calibration_set(objective, images.to(parameter), labels.to(parameter.device), num_timesteps, seed)
    finally:
        dit.train(was_training)


def additivity_diagnostic(dit: DiT, objective: GaussianDiffusion | FlowMatching, images: torch.Tensor,
                          labels: torch.Tensor, *, num_sets: int = 50, sizes: Sequence[int] = (2, 3),
                          seed: int = 0, num_timesteps: int = 8, batch_size: int = 256) -> dict:  # fmt: skip
    """:func:`additivity` on a DiT with the same calibration as :func:`select_blocks`."""
    with _calibrated(dit, objective, images, labels, num_timesteps, seed) as calibration:
        return additivity(network_forward(dit), calibration, dit.depth, None, num_sets, sizes, seed, batch_size)


def importance_table(selections: Sequence[Selection]) -> str:
    """Markdown: one row per block, one column per criterion, kept blocks in bold, keep lists at the end."""
    depth = max(len(selection.scores) for selection in selections)
    lines = ["| block | " + " | ".join(s.criterion for s in selections) + " |",
             "|---:|" + "---:|" * len(selections)]  # fmt: skip
    for block in range(depth):
        cells = []
        for selection in selections:
            value = f"{float(selection.scores[block]):.3g}" if block < len(selection.scores) else ""
            cells.append(f"**{value}**" if block in selection.keep else value)
        lines.append(f"| {block} | " + " | ".join(cells) + " |")
    lines.append("| kept | " + " | ".join(",".join(map(str, s.keep)) for s in selections) + " |")
    return "\n".join(lines) + "\n"


def plot_importance(selections: Sequence[Selection], path) -> None:
    """Bar chart per criterion (scores scaled to their maximum), kept blocks coloured, written to ``path``."""
    from matplotlib.figure import Figure  # no pyplot: leaves the caller's backend alone, renders with Agg

    depth = len(selections[0].scores)
    figure = Figure(figsize=(max(4.0, 0.35 * depth + 2), 1.6 * len(selections) + 0.6))
    axes = figure.subplots(len(selections), 1, sharex=True, squeeze=False)
    for axis, selection in zip(axes[:, 0], selections):
        scores = selection.scores.double()
        top = float(scores.abs().max())
        scaled = scores / top if top > 0 else scores
        colours = ["tab:blue" if b in selection.keep else "lightgray" for b in range(len(scores))]
        axis.bar(range(len(scores)), scaled.tolist(), color=colours)
        axis.set_ylabel(selection.criterion)
        axis.set_ylim(min(0.0, float(scaled.min())), 1.05)
        axis.set_yticks([])
    axes[-1, 0].set_xlabel("block (blue = kept)")
    axes[-1, 0].set_xticks(range(depth))
    figure.suptitle("block importance (scaled per criterion)")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
