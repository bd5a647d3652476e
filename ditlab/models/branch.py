"""A block's attention or MLP branch as a value a hook can compute, reuse or replace.

Feature caches (FORA, Delta-DiT, TaylorSeer, ToCa) and dynamic-compute methods decide per model call whether a
branch's pre-gate output is computed, reused or forecast. :class:`~ditlab.models.dit.DiTBlock` hands each branch
to such a hook instead of computing it, so there is one block forward and no method restates it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

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
    unit: int = 0
    """The branch's global unit number (``ditlab.models.trunk``): a block numbers its own branches from 0 and the
    trunk shifts them, so the key is unique however blocks nest (parallel pairs, routed groups)."""
    rows: torch.Tensor | None = None
    """Indices of the batch rows this branch is computed for, when a trunk runs its block on some images only
    (Mixture of Blocks); None: every row."""

    def compute(self) -> torch.Tensor:
        return self.fn(self.inputs())


BranchHook = Callable[[Branch], torch.Tensor]
"""``hook(branch) -> (B, N, D)``: the branch's pre-gate output, computed (``branch.compute()``) or not."""


def offset_hook(hook: BranchHook, offset: int) -> BranchHook:
    """``hook`` seeing unit numbers shifted by ``offset`` (a block inside a trunk or inside another block)."""
    if offset == 0:
        return hook
    return lambda branch: hook(replace(branch, unit=branch.unit + offset))


def rows_hook(hook: BranchHook, rows: torch.Tensor) -> BranchHook:
    """``hook`` told that the branches it sees are computed for batch ``rows`` only."""
    return lambda branch: hook(replace(branch, rows=rows if branch.rows is None else rows[branch.rows]))


def compute_branch(branch: Branch) -> torch.Tensor:
    """The hook of a plain forward: compute every branch."""
    return branch.compute()
