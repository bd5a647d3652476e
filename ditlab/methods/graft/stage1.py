"""Grafting stage 1: regress each new operator (or parallel pair) onto the teacher's activations, block by block.

Chandrasegaran et al. (NeurIPS 2025), https://github.com/keshik6/grafting: on a calibration set, cache every
grafted block's operator input (after adaLN modulation), its output (before the gate) and the gate; then train
each new operator alone to reproduce the old output from the same input (teacher-forced, so errors do not
build up over depth). Loss L1 (the paper's default), L2 or Huber, optionally gate-scaled (both sides times the
block's attention gate ``g_a``). A parallel pair is regressed the same way onto the output of the two sequential
teacher blocks it replaces ([interp]: "initialise from both blocks, distil the pair's output").
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from ditlab.models.branch import Branch
from ditlab.models.dit import DiT
from ditlab.models.taps import run_block_range
from ditlab.models.text.features import TextFeatures

LOSSES = ("l1", "l2", "huber")


@dataclass
class Stage1Config:
    """Per-block activation regression.

    Args:
        steps: optimiser steps per block (0 skips stage 1).
        lr: AdamW learning rate (Grafting: 5e-4).
        batch_size: cached samples per step.
        loss: l1 (Grafting's default) | l2 | huber.
        huber_delta: the Huber loss's delta.
        gate_scaled: multiply both sides by the block's attention gate.
        calibration_images: training images whose activations are cached.
        timesteps_per_image: noise levels drawn per calibration image.
        clip: gradient-norm clip (Grafting: 10).
        seed: calibration noise and order.
    """

    steps: int = 200
    lr: float = 5e-4
    batch_size: int = 64
    loss: Literal["l1", "l2", "huber"] = "l1"
    huber_delta: float = 1.0
    gate_scaled: bool = False
    calibration_images: int = 256
    timesteps_per_image: int = 2
    clip: float = 10.0
    seed: int = 0


@dataclass
class ActivationCache:
    """Per-block cached activations: ``inputs / outputs / gates[block]`` of shapes ``(M, N, D)`` / ``(M, N, D)`` /
    ``(M, D)``; for pairs ``inputs`` is the tokens entering the pair, ``outputs`` those leaving it, ``cond (M, D)``."""

    inputs: dict[int, torch.Tensor] = field(default_factory=dict)
    outputs: dict[int, torch.Tensor] = field(default_factory=dict)
    gates: dict[int, torch.Tensor] = field(default_factory=dict)
    cond: torch.Tensor | None = None


def regression_loss(prediction: torch.Tensor, target: torch.Tensor, kind: str, delta: float = 1.0,
                    gate: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
    """``kind`` distance between ``prediction`` and ``target (B, N, D)``, both times ``gate (B, D)`` when given."""
    if kind not in LOSSES:
        raise ValueError(f"model.stage1.loss={kind!r}; choices: {list(LOSSES)}")
    if gate is not None:
        prediction, target = prediction * gate.unsqueeze(1), target * gate.unsqueeze(1)
    if kind == "l1":
        return F.l1_loss(prediction, target)
    if kind == "l2":
        return F.mse_loss(prediction, target)
    return F.huber_loss(prediction, target, delta=delta)


def noised_inputs(objective, images: torch.Tensor, labels, repeats: int,
                  seed: int) -> tuple[torch.Tensor, torch.Tensor, object]:  # fmt: skip
    """``(x_t, model_t, labels)``: each calibration image at ``repeats`` random noise levels; ``labels`` are class
    labels or a text-conditioned network's ``TextFeatures`` (repeated the same way)."""
    generator = torch.Generator(device=images.device).manual_seed(seed)
    images = images.repeat(repeats, 1, 1, 1)
    labels = type(labels).cat([labels] * repeats) if isinstance(labels, TextFeatures) else labels.repeat(repeats)
    noised = objective.prepare(images, generator=generator)
    return noised.xt, noised.model_t, labels


@torch.no_grad()
def cache_operator_io(teacher: DiT, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, blocks: list[int],
                      batch_size: int = 64) -> ActivationCache:  # fmt: skip
    """The teacher's attention input (modulated), output (pre-gate) and gate at each of ``blocks``, read from the
    block's own forward through its branch hook (each attention computed once). For an MM-DiT the attention is the
    joint one: input and output ``[text; image]``, gate None (each stream has its own); PixArt's cross-attention
    branch is not an operator graft's and is not cached."""
    cache = ActivationCache()
    parts: dict[str, dict[int, list]] = {"inputs": {}, "outputs": {}, "gates": {}}

    def record(branch: Branch) -> torch.Tensor:
        if branch.kind != "attention" or branch.block not in blocks:
            return branch.compute()
        inputs = branch.inputs()
        output = branch.fn(inputs)
        for name, value in (("inputs", inputs), ("outputs", output), ("gates", branch.gate)):
            if value is not None:  # an MM-DiT's joint attention has a gate per stream, none for the branch
                parts[name].setdefault(branch.block, []).append(value)
        return output

    for start in range(0, len(x), batch_size):
        rows = slice(start, start + batch_size)
        tokens, cond = teacher.embed(x[rows], t[rows], y[rows])
        last = max(blocks, default=-1)  # the blocks after the last cached one are not needed
        run_block_range(teacher, tokens, cond, range(last + 1), branches=record)
    for name, per_block in parts.items():
        setattr(cache, name, {index: torch.cat(values) for index, values in per_block.items()})
    return cache


@torch.no_grad()
def cache_pair_io(teacher: DiT, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor,
                  batch_size: int = 64) -> ActivationCache:  # fmt: skip
    """Tokens entering each teacher pair ``(2i, 2i + 1)`` and leaving it, keyed by the pair index ``i``."""
    inputs: dict[int, list] = {}
    outputs: dict[int, list] = {}
    conds = []
    for start in range(0, len(x), batch_size):
        rows = slice(start, start + batch_size)
        tokens, cond = teacher.embed(x[rows], t[rows], y[rows])
        conds.append(cond)
        for index, block in enumerate(teacher.blocks):
            if index % 2 == 0:
                inputs.setdefault(index // 2, []).append(tokens)
            tokens = block(tokens, cond)
            if index % 2 == 1:
                outputs.setdefault(index // 2, []).append(tokens)
    return ActivationCache(inputs={i: torch.cat(v) for i, v in inputs.items()},
                           outputs={i: torch.cat(v) for i, v in outputs.items()}, cond=torch.cat(conds))  # fmt: skip


def fit_module(module: nn.Module, predict, inputs: torch.Tensor, targets: torch.Tensor, config: Stage1Config,
               gates: torch.Tensor | None = None) -> dict[str, float]:  # fmt: skip
    """Train ``module``'s parameters so ``predict(rows) ~ targets[rows]``; returns MSE before and after."""
    generator = torch.Generator().manual_seed(config.seed)
    parameters = [p for p in module.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=config.lr, weight_decay=0.0)
    count = len(inputs)

    @torch.no_grad()
    def mse() -> float:
        return float(sum(F.mse_loss(predict(torch.arange(s, min(s + 256, count))), targets[s:s + 256], reduction="sum")
                         for s in range(0, count, 256)) / targets.numel())  # fmt: skip

    before = mse()
    was_training = module.training
    module.train()
    for _ in range(config.steps):
        rows = torch.randint(0, count, (min(config.batch_size, count),), generator=generator)
        gate = gates[rows] if config.gate_scaled and gates is not None else None
        loss = regression_loss(predict(rows), targets[rows], config.loss, config.huber_delta, gate)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, config.clip)
        optimizer.step()
    module.train(was_training)
    return {"mse_before": before, "mse_after": mse()}


def regress_operators(student: DiT, cache: ActivationCache, config: Stage1Config) -> dict[int, dict[str, float]]:
    """Stage 1 for operator grafts: each cached block's attention module fitted alone (teacher-forced)."""
    report = {}
    for index, inputs in cache.inputs.items():
        attention = student.blocks[index].attn
        report[index] = fit_module(attention, lambda rows, a=attention, x=inputs: a(x[rows])[0], inputs,
                                   cache.outputs[index], config, cache.gates.get(index))  # fmt: skip
    return report


def regress_pairs(student: DiT, cache: ActivationCache, config: Stage1Config) -> dict[int, dict[str, float]]:
    """Stage 1 for parallel pairs: each pair fitted to the two sequential teacher blocks' output."""
    report = {}
    for index, inputs in cache.inputs.items():
        pair = student.blocks[index]
        report[index] = fit_module(pair, lambda rows, p=pair, x=inputs: p(x[rows], cache.cond[rows]), inputs,
                                   cache.outputs[index], config)  # fmt: skip
    return report
