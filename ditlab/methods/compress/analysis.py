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

Calibration ([interp]): each image is noised once, at one of ``num_timesteps`` bin centres (integer DDPM
steps across ``0..T-1`` or flow times in (0, 1), ditlab's convention: larger t is noise), bins assigned
in a seeded stratified order, so a set of B images costs B network passes per ablation. Errors are
measured on the prediction channels only (a learned-sigma half is ignored). Pure PyTorch, no Lightning.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
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
    forward: Forward, calibration: Calibration, depth: int, batch_size: int = 256
) -> torch.Tensor:
    """LAPTOP's one-shot criterion ``C_i = E||out^(-i) - out||^2``, ``(depth,)``."""
    errors, _ = ablation_errors(forward, calibration, [(i,) for i in range(depth)], batch_size)
    return errors.mean(1)


def amber_importance(
    forward: Forward, calibration: Calibration, depth: int, batch_size: int = 256
) -> torch.Tensor:
    """Amber's ``I_{l,b} = sum_b ||v - v^(-l)||^2 / sum_b ||v||^2`` per block and bin, ``(depth, num_bins)``.

    A ratio of bin means rather than a mean of ratios, so near-zero outputs do not dominate.
    """
    errors, reference = ablation_errors(forward, calibration, [(i,) for i in range(depth)], batch_size)
    num_bins = len(calibration.times)
    onehot = torch.nn.functional.one_hot(calibration.bins, num_bins).float()  # (M, num_bins)
    return (errors @ onehot) / (reference @ onehot).clamp_min(1e-12)


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
               batch_size: int = 256) -> dict:  # fmt: skip
    """LAPTOP's additivity check: ``C(R)`` against ``sum_{i in R} C_i`` over random sets ``R``.

    Draws ``num_sets`` distinct sets, sizes cycling through ``sizes``; returns the sets, both series and
    their Pearson / Spearman correlations. A low correlation means the one-shot choice is unreliable
    (fall back to iterative removal).
    """
    if costs is None:
        costs = laptop_costs(forward, calibration, depth, batch_size)
    generator = torch.Generator().manual_seed(seed)
    available = sum(math.comb(depth, size) for size in sizes)
    chosen: list[tuple[int, ...]] = []
    for size in itertools.islice(itertools.cycle(sizes), 100 * num_sets):
        if len(chosen) >= min(num_sets, available):
            break
        candidate = tuple(sorted(torch.randperm(depth, generator=generator)[:size].tolist()))
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
                      batch_size: int = 256) -> tuple[list[int], list[float]]:  # fmt: skip
    """Greedy removal that needs no additivity: ``num_remove`` times, drop the block whose removal *together
    with those already dropped* changes the output least. Returns the dropped blocks in order and the
    measured ``C(R)`` after each drop (``depth * num_remove`` ablations)."""
    dropped: list[int] = []
    costs: list[float] = []
    for _ in range(num_remove):
        candidates = [b for b in range(depth) if b not in dropped]
        errors, _ = ablation_errors(forward, calibration, [(*dropped, b) for b in candidates], batch_size)
        best = int(errors.mean(1).argmin())
        dropped.append(candidates[best])
        costs.append(float(errors.mean(1)[best]))
    return dropped, costs


def _laptop(dit: DiT, calibration: Calibration, num_keep: int, seed: int, batch_size: int, solver: str,
            additivity_sets: int, min_spearman: float) -> Selection:  # fmt: skip
    forward = network_forward(dit)
    costs = laptop_costs(forward, calibration, dit.depth, batch_size)
    table: dict = {"costs": costs, "solver": solver}
    if additivity_sets:
        table["additivity"] = additivity(forward, calibration, dit.depth, costs, additivity_sets, seed=seed,
                                         batch_size=batch_size)  # fmt: skip
        spearman = table["additivity"]["spearman"]
        if solver != "iterative" and not spearman >= min_spearman:  # NaN (constant costs) also falls back
            table["fallback"] = f"additivity spearman {spearman:.3g} < min_spearman {min_spearman}: iterative removal"
            solver = "iterative"
    if solver == "iterative":
        dropped, path = iterative_removal(forward, calibration, dit.depth, dit.depth - num_keep, batch_size)
        table["removal_path"] = path
        keep = [b for b in range(dit.depth) if b not in dropped]
    else:  # dropping the cheapest set under the budget == keeping the costliest num_keep equal blocks
        keep = knapsack(costs.tolist(), [1] * dit.depth, num_keep, method=solver)
    dropped = [b for b in range(dit.depth) if b not in keep]
    table.update(dropped=dropped, dropped_cost=float(costs[dropped].sum()), used_solver=solver)
    return Selection("laptop", keep, costs, table)


def _amber(dit: DiT, calibration: Calibration, num_keep: int, seed: int, batch_size: int, aggregate: str,
           quantile: float, protect: int) -> Selection:  # fmt: skip
    per_bin = amber_importance(network_forward(dit), calibration, dit.depth, batch_size)
    scores = aggregate_bins(per_bin, aggregate, quantile)
    keep = rank_keep(scores, num_keep, protect)
    table = {"per_bin": per_bin, "bin_times": calibration.times, "aggregate": aggregate, "protect": protect}
    return Selection("amber", keep, scores, table)


def rank_keep(scores: torch.Tensor, num_keep: int, protect: int = 0) -> list[int]:
    """The ``num_keep`` highest-scoring blocks, always including the first and last ``protect`` blocks."""
    depth = len(scores)
    protected = set(range(min(protect, depth))) | set(range(max(depth - protect, 0), depth))
    if len(protected) > num_keep:
        raise ValueError(
            f"protect={protect} pins {len(protected)} blocks but num_keep={num_keep}; lower protect"
        )
    order = sorted(range(depth), key=lambda b: (b not in protected, -float(scores[b]), b))
    return sorted(order[:num_keep])


def _baseline(criterion: str, depth: int, num_keep: int, seed: int) -> Selection:
    if criterion == "random":
        keep = sorted(
            torch.randperm(depth, generator=torch.Generator().manual_seed(seed))[:num_keep].tolist()
        )
    else:
        keep = list(range(num_keep)) if criterion == "first" else list(range(depth - num_keep, depth))
    scores = torch.zeros(depth)
    scores[keep] = 1.0
    return Selection(criterion, keep, scores, {"seed": seed} if criterion == "random" else {})


def check_request(criterion: str, num_keep: int, depth: int, options: dict) -> dict:
    """Validate a request in one line each; return the criterion's options with defaults filled in."""
    if criterion not in CRITERIA:
        raise ValueError(f"unknown criterion {criterion!r}; choices: {list(CRITERIA)}")
    if not isinstance(num_keep, int) or not 1 <= num_keep <= depth:
        raise ValueError(f"num_keep={num_keep} is out of range for a DiT of depth {depth}; choose 1..{depth}")
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


def select_blocks(dit: DiT, objective: GaussianDiffusion | FlowMatching, images: torch.Tensor,
                  labels: torch.Tensor, criterion: str, num_keep: int, *, seed: int = 0,
                  num_timesteps: int = 8, **options) -> Selection:  # fmt: skip
    """Choose ``num_keep`` of ``dit``'s blocks by ``criterion`` (see the module docstring and ``OPTIONS``).

    ``images: (B, C, H, W)`` clean inputs in the network's space, ``labels: (B,)``; ``objective`` a
    ``GaussianDiffusion`` or ``FlowMatching``. Runs without gradients in eval mode and restores the mode.
    """
    options = check_request(criterion, num_keep, dit.depth, options)
    if criterion in ("random", "first", "last"):
        return _baseline(criterion, dit.depth, num_keep, seed)
    if criterion == "tinyfusion":
        from ditlab.methods.compress.tinyfusion import learn_layer_mask

        return learn_layer_mask(dit, objective, images, labels, num_keep, seed=seed, **options)
    with _calibrated(dit, objective, images, labels, num_timesteps, seed) as calibration:
        run = {"ppcl": _ppcl, "laptop": _laptop, "amber": _amber}[criterion]
        return run(dit, calibration, num_keep, seed, **options)


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
