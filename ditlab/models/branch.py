"""A block's attention or MLP branch as a value a hook can compute, reuse or replace.

Feature caches (FORA, Delta-DiT, TaylorSeer, ToCa) and dynamic-compute methods decide per model call whether a
branch's pre-gate output is computed, reused or forecast. :class:`~ditlab.models.dit.DiTBlock` hands each branch
to such a hook instead of computing it, so there is one block forward and no method restates it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Branch:
    """One attention or MLP branch of a block, before its gate: what a branch hook decides to compute or reuse.

    ``inputs()`` is the branch's modulated input ``(B, N, D)`` (computed on demand, so a hook that reuses a
    cached output pays nothing for it) and ``fn`` the branch itself, so ``branch.compute()`` is
    ``fn(inputs())``. A hook may also apply ``fn`` to a subset of tokens of ``inputs()`` (the MLP is per token).
    """

    block: int
    kind: str
    """``"attention"`` or ``"mlp"``."""
    inputs: Callable[[], torch.Tensor]
    fn: Callable[[torch.Tensor], torch.Tensor]
    gate: torch.Tensor | None = None
    """``(B, D)``: the gate the block applies to what the hook returns (from the current condition)."""

    def compute(self) -> torch.Tensor:
        return self.fn(self.inputs())


BranchHook = Callable[[Branch], torch.Tensor]
"""``hook(branch) -> (B, N, D)``: the branch's pre-gate output, computed (``branch.compute()``) or not."""


def compute_branch(branch: Branch) -> torch.Tensor:
    """The hook of a plain forward: compute every branch."""
    return branch.compute()
