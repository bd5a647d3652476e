"""The ``dico`` trunk: DiCo's U-shaped macro design, the blocks run as an hourglass with skip connections.

Ai et al. (NeurIPS 2025), the public ``DiCo`` model (github shallowdream204/DiCo): encoder stages at falling
resolution and rising width, a middle stage, decoder stages back up, each decoder level fed the up-sampled tokens
concatenated with the encoder's tokens of its level (reduced by a 1x1 convolution). Between levels:

- down: ``conv3x3(W -> W/2)`` (no bias), then ``PixelUnshuffle(2)``: ``(W, h) -> (2W, h/2)``;
- up: ``conv3x3(2W -> 4W)`` (no bias), then ``PixelShuffle(2)``: ``(2W, h/2) -> (W, h)``; concatenated with the skip
  ``(2W, h)`` and reduced by ``conv1x1(2W -> W)``.

``trunk_options.stages`` lists the blocks per stage, ``[e_0, .., e_{L-1}, m, d_{L-1}, .., d_0]`` (the public
DiCo-S/B: ``[5, 4, 4, 4, 4]``, three levels; without it, one level: ``[k, depth - 2k, k]``, ``k = depth // 3``); level ``l`` has width ``D 2^l`` on ``N / 4^l`` tokens, so the token grid
side must be divisible by ``2^L``. The blocks are the network's ``block`` kind (``dico``), built for their level
(:func:`ditlab.methods.dico.block.dico_levels`). [interp] The paper's last decoder level stays ``2D`` wide and ends in
a 3x3 convolution head on un-patchified latents; here every level ``l`` is ``D 2^l`` (the last is ``D``), so the
network's ``embed`` (patch embedding) and ``head`` (DiT's adaLN linear head) are the core's, unchanged.

What the trunk offers (``ditlab.models.trunk``): branch hooks (every block's ``conv`` and ``mlp`` branches, numbered
globally, so feature caches run on it) and hidden taps (the tokens after each block, at that block's level: shapes
differ by level). It is not a plain block loop: taps that skip, replace or stop blocks, block ranges and depth
pruning are refused in one line. Its ``macs`` counts the down/up/reduce convolutions; each block counts its own at
its level.

    block: dico
    trunk: dico
    trunk_options: {stages: [2, 2, 2, 2, 2]}
"""

from __future__ import annotations

import torch
from torch import nn

from ditlab.methods.dico.block import default_stages, dico_levels, grid_to_tokens, tokens_to_grid
from ditlab.models.branch import BranchHook, offset_hook
from ditlab.models.components import register_trunk
from ditlab.models.config import DiTConfig
from ditlab.models.trunk import Trunk, unit_offsets

TRUNK_OPTIONS = {"stages"}


class Down(nn.Module):
    """``(B, W, h, h) -> (B, 2W, h/2, h/2)``: a 3x3 convolution to ``W/2`` channels, then pixel-unshuffle."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(width, width // 2, 3, padding=1, bias=False), nn.PixelUnshuffle(2))

    def forward(self, grid: torch.Tensor) -> torch.Tensor:
        return self.body(grid)


class Up(nn.Module):
    """``(B, 2W, h/2, h/2) -> (B, W, h, h)``: a 3x3 convolution to ``4W`` channels, then pixel-shuffle."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(2 * width, 4 * width, 3, padding=1, bias=False), nn.PixelShuffle(2))

    def forward(self, grid: torch.Tensor) -> torch.Tensor:
        return self.body(grid)


class DiCoTrunk(Trunk):
    """The hourglass (see the module docstring): ``trunk(dit, tokens (B, N, D), cond, t) -> (B, N, D)``."""

    branch_hooks = True
    hidden_taps = True

    def __init__(self, config: DiTConfig) -> None:
        super().__init__()
        unknown = sorted(set(config.trunk_options) - TRUNK_OPTIONS)
        if unknown:
            raise ValueError(f"unknown trunk_options {unknown} for the 'dico' trunk; known: {sorted(TRUNK_OPTIONS)}")
        if config.block != "dico":
            raise ValueError(f"the 'dico' trunk runs only dico blocks, at widths D 2^level (got {config.block!r}): set "
                             "block: dico, or use block: dit under the plain 'blocks' trunk")  # fmt: skip
        self.levels = dico_levels(config)
        self.stages = [int(s) for s in config.trunk_options.get("stages", default_stages(config.depth))]
        self.depth_levels = len(self.stages) // 2
        side = config.grid_size
        if side % 2**self.depth_levels:
            raise ValueError(f"a {side}x{side} token grid cannot be halved {self.depth_levels} times for "
                             f"trunk_options.stages={self.stages}; use fewer stages or a smaller patch size")  # fmt: skip
        widths = [config.hidden_size * 2**level for level in range(self.depth_levels + 1)]
        if any(width % 2 for width in widths[:-1]):
            raise ValueError(f"hidden_size={config.hidden_size} must be even for the 'dico' trunk's down-sampling")
        self.widths = widths
        self.down = nn.ModuleList(Down(widths[level]) for level in range(self.depth_levels))
        self.up = nn.ModuleList(Up(widths[level]) for level in range(self.depth_levels))
        self.reduce = nn.ModuleList(nn.Conv2d(2 * widths[level], widths[level], 1) for level in range(self.depth_levels))
        for module in self.modules():  # DiCo's Xavier-uniform convolutions, zero bias
            if isinstance(module, nn.Conv2d):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    def stage_blocks(self) -> list[list[int]]:
        """Block indices of each stage, in order."""
        blocks, start = [], 0
        for count in self.stages:
            blocks.append(list(range(start, start + count)))
            start += count
        return blocks

    def stage_ends(self) -> list[int]:
        """The last block of every non-empty stage (where exit heads read the tokens: OFA-KD's stages)."""
        return [blocks[-1] for blocks in self.stage_blocks() if blocks]

    def forward(self, dit: nn.Module, tokens: torch.Tensor, cond: torch.Tensor, t: torch.Tensor,
                branches: BranchHook | None = None, hidden: dict[int, torch.Tensor] | None = None) -> torch.Tensor:  # fmt: skip
        offsets = unit_offsets(dit.blocks) if branches is not None else None
        skips: list[torch.Tensor] = []
        levels = self.depth_levels
        for stage, blocks in enumerate(self.stage_blocks()):
            for index in blocks:
                block = dit.blocks[index]
                if branches is None:
                    tokens = block(tokens, cond)
                else:
                    tokens = block(tokens, cond, branches=offset_hook(branches, offsets[index]), index=index)
                if hidden is not None:
                    hidden[index] = tokens
            if stage < levels:  # an encoder level: keep its tokens, go down
                skips.append(tokens)
                tokens = grid_to_tokens(self.down[stage](tokens_to_grid(tokens)))
            elif stage < 2 * levels:  # the middle or a decoder level: go up to the next decoder level
                level = 2 * levels - stage - 1
                upsampled = self.up[level](tokens_to_grid(tokens))
                joined = torch.cat([upsampled, tokens_to_grid(skips.pop())], dim=1)
                tokens = grid_to_tokens(self.reduce[level](joined))
        return tokens

    def macs(self, num_tokens: int) -> int:
        """The down-, up-sampling and reduce convolutions per image (the blocks count their own)."""
        total = 0
        for level, width in enumerate(self.widths[:-1]):
            tokens, coarse = num_tokens // 4**level, num_tokens // 4 ** (level + 1)
            total += tokens * 9 * width * (width // 2)  # down: 3x3, W -> W/2 at level l
            total += coarse * 9 * (2 * width) * (4 * width)  # up: 3x3, 2W -> 4W at level l + 1
            total += tokens * (2 * width) * width  # reduce: 1x1, 2W -> W at level l
        return total


register_trunk("dico")(DiCoTrunk)
