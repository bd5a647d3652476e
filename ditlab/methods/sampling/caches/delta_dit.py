"""``delta-dit``: Delta-Cache over a block range (Chen et al., "Delta-DiT: A Training-Free Acceleration Method
Tailored for Diffusion Transformers", arXiv 2406.01125; no official code was found, so this follows the
paper's description [interp] for the knob defaults).

The cache holds the *increment* a contiguous block range adds, ``delta = h_out - h_in``, not the range's
output, so a cached call still feeds the range's current input forward: ``h_out ~ h_in(now) + delta``. Front
blocks shape outlines and rear blocks add detail (the paper's probe), so early calls (the first ``boundary``
share of the trajectory) cache the rear range ``[depth - blocks, depth)`` and later calls the front range
``[0, blocks)``. A call is full (every block computed, ``delta`` stored per row, hence per CFG branch) on the
first ``warmup`` calls, when no ``delta`` is stored, every ``interval`` calls, and on the first call of each
stage, because a stored ``delta`` belongs to one range. ``interval: 1`` or ``blocks: 0`` is the network.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ditlab.diffusion.cache import knob
from ditlab.methods.sampling.caches.policy import CachePolicy, register_policy


@dataclass
class DeltaDiTOptions:
    """Delta-DiT's knobs.

    Args:
        interval: compute every block every this many model calls (1: the network).
        blocks: width of the cached block range (0 .. depth; 0: the network); None: half the depth.
        boundary: share of the calls (0 .. 1) that cache the rear range before switching to the front.
        warmup: model calls at the start that always compute.
    """

    interval: int = knob(2, low=1)
    blocks: int | None = knob(None, low=0)
    boundary: float = knob(0.5, low=0.0, high=1.0)
    warmup: int = knob(0, low=0)


@register_policy
class DeltaDiT(CachePolicy):
    """Reuse the increment of the rear block range early in sampling and of the front range late."""

    name = "delta-dit"
    Options = DeltaDiTOptions

    def validate(self) -> None:
        super().validate()
        if self.blocks is None:
            self.blocks = self.depth // 2
        if self.blocks > self.depth:
            self.refuse("blocks", self.blocks, f"a block range of at most the network's depth {self.depth}")

    @property
    def boundary_call(self) -> int:
        """The first call of the front stage."""
        return round(self.boundary * self.num_calls)

    def stage(self, call: int) -> str:
        return "rear" if call < self.boundary_call else "front"

    def cached_range(self, stage: str) -> range:
        return range(self.depth - self.blocks, self.depth) if stage == "rear" else range(0, self.blocks)

    def start(self) -> None:
        self.delta: torch.Tensor | None = None
        self.delta_stage: str | None = None
        self.last_full = -1

    def full_call(self, call: int) -> bool:
        """Whether call ``call`` computes every block, given the state left by the calls before it."""
        return (self.blocks == 0 or self.interval == 1 or call < self.warmup or self.delta is None
                or self.delta_stage != self.stage(call) or call - self.last_full >= self.interval)  # fmt: skip

    def compute(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, call: int) -> torch.Tensor:
        tokens, cond = self.dit.embed(x, t, y)
        stage = self.stage(call)
        span = self.cached_range(stage)
        full = self.full_call(call)
        tokens = self.through_blocks(tokens, cond, range(0, span.start))
        if full:
            range_input = tokens
            tokens = self.through_blocks(tokens, cond, span)
            if self.blocks and self.interval > 1:
                self.delta, self.delta_stage, self.last_full = tokens - range_input, stage, call
        else:
            tokens = tokens + self.delta
        tokens = self.through_blocks(tokens, cond, range(span.stop, self.depth))
        return self.dit.head(tokens, cond)
