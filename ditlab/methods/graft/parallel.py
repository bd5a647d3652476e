"""The ``parallel-pair`` block: two DiT blocks applied side by side, ``h <- h + D_a(h) + D_b(h)``.

Grafting's depth case study (Chandrasegaran et al., NeurIPS 2025, arXiv 2506.05340) turns each pair of
sequential blocks ``(B_2i, B_2i+1)`` into one parallel block, halving depth; ``D(h) = B(h) - h`` is a block's
residual update. The mechanics (sum of the two updates, both computed from the same input) are [interp]: the
paper's abstract gives the restructuring, not the code. A network of these blocks is ``block: parallel-pair``
in its config, so it reloads like any other DiT. A branch hook (a feature cache) sees its four branches as four
units of one block, so work counted over a parallel network compares with the sequential one.
"""

from __future__ import annotations

import torch
from torch import nn

from ditlab.models.branch import BranchHook, offset_hook
from ditlab.models.components import register_block
from ditlab.models.config import DiTConfig
from ditlab.models.dit import DiTBlock


class ParallelPair(nn.Module):
    """Two DiT blocks reading the same tokens; their residual updates are added."""

    def __init__(self, config: DiTConfig, block: int | None = None) -> None:
        super().__init__()
        if config.block_options:
            raise ValueError(f"the parallel-pair block takes no block_options (got {sorted(config.block_options)})")
        sequential = config.replace(depth=2 * config.depth)  # component options name the sequential block indices
        first = None if block is None else 2 * block
        self.first = DiTBlock(sequential, first)
        self.second = DiTBlock(sequential, None if first is None else first + 1)

    def forward(self, tokens: torch.Tensor, cond: torch.Tensor, *, return_attention: bool = False,
                branches: BranchHook | None = None, index: int = -1) -> torch.Tensor:  # fmt: skip
        if return_attention:
            raise ValueError("a parallel-pair block has two attention maps; align maps of a sequential DiT instead")
        # a hook sees the four branches of the pair as units 0-1 (first half) and 2-3 (second half) of this block
        second_hook = None if branches is None else offset_hook(branches, len(self.first.units()))
        first = self.first(tokens, cond, branches=branches, index=index)
        second = self.second(tokens, cond, branches=second_hook, index=index)
        return first + second - tokens

    def units(self) -> list[tuple[str, str]]:
        """The first half's branches, then the second's (``ditlab.models.trunk``)."""
        return [(f"{half}.{name}", kind) for half in ("first", "second")
                for name, kind in getattr(self, half).units()]  # fmt: skip

    def macs(self, num_tokens: int, config: DiTConfig) -> int:
        return self.first.macs(num_tokens, config) + self.second.macs(num_tokens, config)

    def forward_halves(self, tokens: torch.Tensor, cond: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The two residual updates ``(D_a(h), D_b(h))`` (tests, analysis)."""
        return self.first(tokens, cond) - tokens, self.second(tokens, cond) - tokens


register_block("parallel-pair")(ParallelPair)
