"""The ``parallel-pair`` block: two DiT blocks applied side by side, ``h <- h + D_a(h) + D_b(h)``.

Grafting's depth case study (Chandrasegaran et al., NeurIPS 2025, arXiv 2506.05340) turns each pair of
sequential blocks ``(B_2i, B_2i+1)`` into one parallel block, halving depth; ``D(h) = B(h) - h`` is a block's
residual update. The mechanics (sum of the two updates, both computed from the same input) are [interp]: the
paper's abstract gives the restructuring, not the code. A network of these blocks is ``block: parallel-pair``
in its config, so it reloads like any other DiT.
"""

from __future__ import annotations

import torch
from torch import nn

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

    def forward(self, tokens: torch.Tensor, cond: torch.Tensor, return_attention: bool = False,
                **hooks) -> torch.Tensor:  # fmt: skip
        if return_attention:
            raise ValueError("a parallel-pair block has two attention maps; align maps of a sequential DiT instead")
        index = hooks.pop("index", -1)  # a branch hook sees the two halves as blocks 2i and 2i + 1
        first = self.first(tokens, cond, **hooks, **({"index": 2 * index} if index >= 0 else {}))
        second = self.second(tokens, cond, **hooks, **({"index": 2 * index + 1} if index >= 0 else {}))
        return first + second - tokens

    def macs(self, num_tokens: int, config: DiTConfig) -> int:
        return self.first.macs(num_tokens, config) + self.second.macs(num_tokens, config)

    def forward_halves(self, tokens: torch.Tensor, cond: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The two residual updates ``(D_a(h), D_b(h))`` (tests, analysis)."""
        return self.first(tokens, cond) - tokens, self.second(tokens, cond) - tokens


register_block("parallel-pair")(ParallelPair)
