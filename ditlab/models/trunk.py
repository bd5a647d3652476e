"""How a network runs its blocks between ``embed`` and ``head``: the trunk, and the units it exposes.

Every :class:`~ditlab.models.dit.DiT` has a trunk (``DiTConfig.trunk``, a registered kind). The default,
``blocks``, is the plain loop: every block, in order, on every token. Other kinds (dynamic compute: DyDiT,
Elastic-DiT, DC-DiT; Mixture of Blocks) route tokens, images or blocks. A method that runs a network piecewise
asks the trunk what it supports instead of guessing from its name:

- ``block_loop``: the forward *is* the plain loop, so running blocks one by one (taps, skips, replacements,
  block ranges: ``ditlab.models.taps``) computes the same network;
- ``hidden_taps``: the trunk records the tokens after every block (``forward(..., hidden={})``), so distillation
  and alignment can read its hidden states;
- ``branch_hooks``: the trunk hands every block it runs a branch hook (``ditlab.models.branch``), so a feature
  cache can compute, reuse or forecast each attention / MLP branch. A trunk that runs a block on some images
  only marks the branch with those ``rows``.

The block protocol, which every block kind follows: ``block(tokens, cond, *, branches=None, index=-1)`` and
``block.units()``, the ``(name, kind)`` of its branches in the order the block offers them to a hook (``kind``:
``attention``, ``cross_attention`` or ``mlp``). The trunk numbers them globally (:func:`network_units`), and a
hook sees that number as ``branch.unit``: a cache's key and a work counter's denominator.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from ditlab.models.branch import BranchHook, offset_hook
from ditlab.models.components import register_trunk


@dataclass(frozen=True)
class Unit:
    """One branch of the network as a cache, a work counter or a pruner sees it."""

    index: int
    """Global position among the network's units (block by block, in each block's order)."""
    block: int
    """Position of its block in ``dit.blocks``."""
    name: str
    """Its path inside the block (``attention``, ``mlp``, ``second.mlp``, ...)."""
    kind: str
    """``attention``, ``cross_attention`` or ``mlp``."""


def network_units(blocks: nn.ModuleList) -> list[Unit]:
    """Every unit of ``blocks``, numbered globally."""
    units: list[Unit] = []
    for position, block in enumerate(blocks):
        for name, kind in block.units():
            units.append(Unit(len(units), position, name, kind))
    return units


def unit_offsets(blocks: nn.ModuleList) -> list[int]:
    """The global index of each block's first unit."""
    offsets, total = [], 0
    for block in blocks:
        offsets.append(total)
        total += len(block.units())
    return offsets


class Trunk(nn.Module):
    """Base of the trunk kinds: ``trunk(dit, tokens, cond, t, branches=None) -> tokens``.

    ``t: (B,)`` is the network's time input (for routers that read the timestep alone). A kind sets what it
    supports (see the module docstring), counts its own overhead (``macs(num_tokens)``, routers) and may leave
    ``aux_losses`` like a component.
    """

    block_loop: ClassVar[bool] = False
    branch_hooks: ClassVar[bool] = False
    hidden_taps: ClassVar[bool] = False
    """True where ``forward`` takes ``hidden=dict`` and fills it with the tokens after every block it runs."""

    def forward(self, dit: nn.Module, tokens: torch.Tensor, cond: torch.Tensor, t: torch.Tensor,
                branches: BranchHook | None = None) -> torch.Tensor:  # fmt: skip
        raise NotImplementedError

    def macs(self, num_tokens: int) -> int:
        """Multiply-accumulates per image the trunk adds to its blocks' (routers)."""
        return 0

    def per_image(self, per_block: list[int]) -> int:
        """Of a per-block quantity (MACs, parameters), what one image uses (default: every block's)."""
        return sum(per_block)

    def block_tokens(self, num_tokens: int) -> int:
        """The sequence length the blocks run at for ``num_tokens`` patch tokens (a trunk that merges tokens runs
        them shorter); what the FLOPs count charges the blocks for."""
        return num_tokens

    def units(self, dit: nn.Module) -> list[Unit]:
        return network_units(dit.blocks)

    def require(self, capability: str, who: str, kind: str) -> None:
        """Refuse, in one line, a method (``who``) that needs ``capability`` this trunk kind lacks."""
        if not getattr(self, capability):
            needs = {"block_loop": "runs the blocks one by one", "branch_hooks": "hooks every block's branches"}
            raise ValueError(f"{who} {needs[capability]}, which the {kind!r} trunk of this network cannot follow "
                             "(it routes its blocks itself); use it on a network with the plain 'blocks' trunk")  # fmt: skip


class BlockLoop(Trunk):
    """The plain trunk: every block, in order, on every token."""

    block_loop = True
    branch_hooks = True
    hidden_taps = True

    def forward(self, dit: nn.Module, tokens: torch.Tensor, cond: torch.Tensor, t: torch.Tensor,
                branches: BranchHook | None = None, hidden: dict[int, torch.Tensor] | None = None) -> torch.Tensor:  # fmt: skip
        return run_blocks_in_order(dit, tokens, cond, range(len(dit.blocks)), branches, hidden)


def run_blocks_in_order(dit: nn.Module, tokens: torch.Tensor, cond: torch.Tensor, blocks,
                        branches: BranchHook | None = None,
                        hidden: dict[int, torch.Tensor] | None = None) -> torch.Tensor:  # fmt: skip
    """Tokens through the blocks at ``blocks`` (positions, in order); ``branches`` sees global unit numbers and
    ``hidden``, when given, receives the tokens after each block."""
    offsets = unit_offsets(dit.blocks) if branches is not None else None
    for index in blocks:
        block = dit.blocks[index]
        if branches is None:
            tokens = block(tokens, cond)
        else:
            tokens = block(tokens, cond, branches=offset_hook(branches, offsets[index]), index=index)
        if hidden is not None:
            hidden[index] = tokens
    return tokens


register_trunk("blocks")(lambda config: BlockLoop())
