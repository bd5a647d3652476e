"""``fora``: Fast-Forward Caching (Selvaraju et al., "FORA: Fast-Forward Caching in Diffusion Transformer
Acceleration", arXiv 2407.01425; public code prathebaselva/FORA).

Every block's attention and MLP outputs, taken before their gates, are computed on the first call and then
every ``interval`` calls, and reused in between; the adaLN gates and the norms are recomputed from the current
condition and tokens at every call, so a reused branch is re-weighted for the current step. The plan is static.
With ``align: end`` (the reference) call ``k`` of ``K`` computes when it is the first, one of the ``warmup`` calls,
or its step index counted down, ``K - 1 - k``, is divisible by ``interval`` (so the last call always computes);
``align: start`` is ditlab's earlier plan, ``k < warmup`` or ``(k - warmup) % interval == 0``, kept because its
gaps are even from the first call, and it is what checkpoints written before ``align`` existed sample with.
``interval: 1`` is the network.

Checked against prathebaselva/FORA at acde628eb1c9605015542c91040c401919369487 (``src/models.py``,
``boost_infer_static``): the full calls of ``tests/methods/sampling/caches/test_reference_schedules.py``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from ditlab.diffusion.cache import knob
from ditlab.methods.sampling.caches.policy import CachePolicy, register_policy
from ditlab.models.taps import Branch


class BranchCache(CachePolicy):
    """Shared by the branch-level policies: a static plan of full calls and one stored output per branch."""

    def start(self) -> None:
        self.cache: dict[int, torch.Tensor] = {}  # by unit (subclasses that keep more than one value per unit)

    def full_call(self, call: int) -> bool:
        """Full calls from the start of the schedule: the warm-up, then every ``interval`` calls."""
        return call < self.warmup or (call - self.warmup) % self.interval == 0

    def compute(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, call: int) -> torch.Tensor:
        tokens, cond = self.dit.embed(x, t, y)
        self.time = self.times[call]
        hook = self.store if self.full_call(call) or not (self.cache or self.kept) else self.cached
        return self.dit.head(self.through_blocks(tokens, cond, hook=hook), cond)

    def store(self, branch: Branch) -> torch.Tensor:
        output = branch.compute()
        self.keep(branch, output)
        self.counted(len(output), 1)
        return output

    def cached(self, branch: Branch) -> torch.Tensor:
        """A branch's output on a call that does not compute it (subclasses: reuse, forecast, partial)."""
        raise NotImplementedError


@dataclass
class ForaOptions:
    """FORA's knobs.

    Args:
        interval: compute every branch every this many model calls (1: the network).
        warmup: model calls at the start that always compute.
        align: ``end`` (FORA: full calls where the steps left are a multiple of ``interval``, the last call
            included) or ``start`` (ditlab's earlier plan: every ``interval`` calls from the first after warm-up).
    """

    interval: int = knob(3, low=1)
    warmup: int = knob(0, low=0)
    align: str = "end"

    legacy: ClassVar[dict[str, Any]] = {"align": "start"}
    """What a config written before ``align`` existed meant (read by ``ditlab.diffusion.cache``)."""


@register_policy
class Fora(BranchCache):
    """Static-interval reuse of every branch's pre-gate output."""

    name = "fora"
    Options = ForaOptions
    routed_trunks = True

    def validate(self) -> None:
        super().validate()
        if self.align not in ("end", "start"):
            raise ValueError(f"cache.options.align={self.align!r} is not an alignment of the fora policy; choices: "
                             "end (FORA), start")  # fmt: skip

    def full_call(self, call: int) -> bool:
        if self.align == "start":
            return super().full_call(call)
        return call < max(1, self.warmup) or (self.num_calls - 1 - call) % self.interval == 0

    def cached(self, branch: Branch) -> torch.Tensor:
        reused = self.recall(branch)  # None for images a routed trunk had not run this block on
        return self.store(branch) if reused is None else reused
