"""Run a DiT while reading or editing its blocks: the one hook every method uses.

Alignment (REPA, HASTE) reads hidden states and attention maps of chosen blocks; distillation reads
matched student/teacher features; pruning analysis runs the network with blocks skipped; caching
replaces blocks. All of that is :func:`run_blocks`, built on the core's ``embed`` / ``blocks`` /
``head`` split, so no method ever patches the core. Block indices here are 0-based positions in
``dit.blocks`` (the specs' "block k" is index ``k - 1``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
from torch import nn

from ditlab.models.branch import Branch, BranchHook  # noqa: F401 - re-exported: hooks are written against taps
from ditlab.models.dit import DiT
from ditlab.models.trunk import run_blocks_in_order

BlockFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class Tapped:
    """What a tapped forward pass returns."""

    output: torch.Tensor
    """``(B, C_out, H, W)`` network output, or the tokens ``(B, N, D)`` after block ``stop_after``."""
    hidden: dict[int, torch.Tensor] = field(default_factory=dict)
    """Block index -> tokens ``(B, N, D)`` after that block (index -1: the embedded input)."""
    attention: dict[int, torch.Tensor] = field(default_factory=dict)
    """Block index -> attention map ``(B, H, N, N)``."""


def check_block_loop(dit: DiT, who: str = "this block-level tool (block taps, block ranges, pruning analysis)") -> None:
    """Refuse, in one line, a network whose trunk is not the plain block loop (it routes tokens, skips blocks or
    narrows them per sample), since running its blocks one by one would silently compute another network."""
    dit.trunk.require("block_loop", who, dit.config.trunk)


def run_blocks(
    dit: DiT,
    x: torch.Tensor,
    t: torch.Tensor,
    y: torch.Tensor,
    hidden: Iterable[int] = (),
    attention: Iterable[int] = (),
    skip: Iterable[int] = (),
    replace: dict[int, BlockFn] | None = None,
    stop_after: int | None = None,
    force_drop_ids: torch.Tensor | None = None,
) -> Tapped:
    """Forward ``dit`` capturing hidden states after ``hidden`` blocks and maps of ``attention`` blocks.

    On a routing trunk (one that is not the plain block loop) only ``hidden`` taps are possible, and only where the
    trunk records them (``trunk.hidden_taps``); anything else is refused in one line.

    ``skip`` drops blocks (identity), ``replace`` maps a block index to ``fn(tokens, cond) -> tokens``.
    ``stop_after`` ends the pass after that block and returns its tokens as ``output`` (no head),
    which saves compute when only early features are needed. ``force_drop_ids`` as in :meth:`DiT.embed`.
    """
    hidden, attention, skip = set(hidden), set(attention), set(skip)
    replace = replace or {}
    bad = {i for i in hidden | attention | skip | set(replace) if not -1 <= i < dit.depth}
    if bad:
        raise IndexError(f"block indices {sorted(bad)} out of range for a DiT of depth {dit.depth}")
    routed = not dit.trunk.block_loop
    if routed and (attention or skip or replace or stop_after is not None or not dit.trunk.hidden_taps):
        check_block_loop(dit, "this tap (attention maps, skipped, replaced or stopped blocks)")
    tokens, cond = dit.embed(x, t, y, force_drop_ids)
    result = Tapped(output=tokens)
    if -1 in hidden:
        result.hidden[-1] = tokens
    if routed:  # a routing trunk that records the tokens after each block it routes
        after: dict[int, torch.Tensor] = {}
        tokens = dit.trunk(dit, tokens, cond, t.expand(len(tokens)) if t.ndim == 0 else t, hidden=after)
        result.hidden.update({index: after[index] for index in hidden if index >= 0})
        result.output = dit.head(tokens, cond)
        return result
    for index, block in enumerate(dit.blocks):
        if index in skip:
            pass
        elif index in replace:
            tokens = replace[index](tokens, cond)
        elif index in attention:
            tokens, result.attention[index] = block(tokens, cond, return_attention=True)
        else:
            tokens = block(tokens, cond)
        if index in hidden:
            result.hidden[index] = tokens
        if stop_after is not None and index == stop_after:
            result.output = tokens
            return result
    result.output = dit.head(tokens, cond)
    return result


def block_io(dit: DiT, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
    """Tokens before every block and after the last: a list of ``depth + 1`` tensors ``(B, N, D)``."""
    tapped = run_blocks(dit, x, t, y, hidden=range(-1, dit.depth))
    return [tapped.hidden[i] for i in range(-1, dit.depth)]


def kept_blocks(dit: DiT, keep: Iterable[int]) -> nn.ModuleList:
    """The blocks at ``keep`` (in order), for building a shallower DiT that shares their weights."""
    return nn.ModuleList(dit.blocks[i] for i in sorted(set(keep)))


def run_block_range(dit: DiT, tokens: torch.Tensor, cond: torch.Tensor, blocks: Iterable[int] | None = None,
                    branches: BranchHook | None = None) -> torch.Tensor:  # fmt: skip
    """Tokens ``(B, N, D)`` through ``blocks`` (indices in order; default all) of ``dit``, from any starting tokens.

    With ``embed`` and ``head`` around it this is the network's forward, so a sampling-time method can run a
    block range on some rows only, add a cached increment in place of a range, or (``branches``) decide each
    block's attention / MLP output itself (:class:`~ditlab.models.branch.Branch`, numbered by global unit; the
    gates always come from ``cond``). Only a plain-loop trunk has block ranges; for the whole network under any
    trunk that takes branch hooks use ``dit.run_trunk``.
    """
    check_block_loop(dit, "running a block range")
    return run_blocks_in_order(dit, tokens, cond, range(dit.depth) if blocks is None else blocks, branches)
