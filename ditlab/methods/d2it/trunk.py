"""The dynamic-grain trunk ``d2it``: coarse tokens in smooth regions, fine tokens in detailed ones.

D2iT (Jia et al., CVPR 2025, arXiv 2504.09454) predicts *multi-grained* noise: its DVAE codes detailed regions with
fine latents and smooth ones with coarse latents (one code per ``2 x 2`` fine cells), a Dynamic Grain Transformer
generates the grain map and a Dynamic Content Transformer denoises the multi-grained latent, one token per code.

Here the diffusion space stays the DiT's fixed grid (pixels or a VAE's latents) and the *network* runs on mixed-grain
tokens. The DiT's ``g x g`` token grid is cut into ``2 x 2`` regions; a region marked fine keeps its four tokens, a
coarse one is merged into one token (``merge``: a linear map of the four, initialised to their mean, plus a learned
coarse-grain embedding) and restored to four before the head (``restore``: a linear map, initialised to copies). The
blocks run on ``4 k + (R - k)`` tokens for ``k`` fine regions of ``R``, so the coarse regions' noise is predicted at the
coarse grain. With every region fine (``fine_ratio: 1``) the trunk is the plain block loop, bit for bit.

The grain map: during training, the clean input's own map (:mod:`ditlab.methods.d2it.grain`, set by
:class:`~ditlab.methods.d2it.module.D2iTModule` as ``trunk.given``: the paper trains its content transformer on the
DVAE's maps); at sampling (and whenever no map is given), a light *grain router* scores every region from its noisy
tokens and the condition and keeps the ``k`` highest, trained alongside to predict the clean map (binary
cross-entropy).

[interp] what stands in for the paper's stage 1 and its grain transformer: no dynamic VAE (the granularity lives in
the network's tokens, the noise is the ordinary per-element noise); the grain map is an entropy measure of the clean
input with a fixed fine share per image; the Dynamic Grain Transformer (a generative model of grain maps) is a router
that re-predicts the map at every sampling step from the noisy input; the content transformer is the DiT's own block
stack over the mixed-grain sequence (positions: each merged token carries the mean of its cells' sin-cos positions).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ditlab.methods.d2it.grain import fine_count, top_regions
from ditlab.models.components import block_kind_trait, register_trunk
from ditlab.models.condition import condition_vector
from ditlab.models.config import DiTConfig
from ditlab.models.trunk import Trunk, run_blocks_in_order


def to_regions(tokens: torch.Tensor, grid: int) -> torch.Tensor:
    """``(B, g*g, D) -> (B, (g/2)^2, 4, D)``: the four tokens of each ``2 x 2`` region, regions in raster order."""
    batch, _, width = tokens.shape
    side = grid // 2
    return tokens.reshape(batch, side, 2, side, 2, width).permute(0, 1, 3, 2, 4, 5).reshape(batch, side * side, 4, width)


def from_regions(regions: torch.Tensor, grid: int) -> torch.Tensor:
    batch, _, _, width = regions.shape
    side = grid // 2
    return regions.reshape(batch, side, side, 2, 2, width).permute(0, 1, 3, 2, 4, 5).reshape(batch, grid * grid, width)


class D2iTTrunk(Trunk):
    """Mixed-grain block loop; options are ``DiTConfig.trunk_options``.

    Args:
        fine_ratio: share of the ``2 x 2`` regions of each image that keep fine tokens (1: the plain DiT).
        router_width: hidden width of the grain router (default ``max(16, hidden_size // 4)``).
    """

    def __init__(self, config: DiTConfig, fine_ratio: float = 0.5, router_width: int | None = None) -> None:
        super().__init__()
        grid, width = config.grid_size, config.hidden_size
        if grid % 2:
            raise ValueError(f"trunk 'd2it' merges 2x2 token regions: the {grid}x{grid} token grid must be even "
                             "(choose patch_size so that input_size / patch_size is even)")  # fmt: skip
        self.grid, self.num_regions = grid, (grid // 2) ** 2
        self.fine_ratio = float(fine_ratio)
        self.fine = fine_count(self.num_regions, fine_ratio)
        hidden = router_width or max(16, width // 4)
        self.merge = nn.Linear(4 * width, width)
        self.restore = nn.Linear(width, 4 * width)
        self.coarse_embed = nn.Parameter(torch.zeros(width))
        self.router_tokens = nn.Linear(4 * width, hidden)
        self.router_cond = nn.Linear(width, hidden)
        self.router_out = nn.Linear(hidden, 1)
        eye = torch.eye(width)
        with torch.no_grad():
            self.merge.weight.copy_(torch.cat([eye / 4] * 4, dim=1))
            self.restore.weight.copy_(torch.cat([eye] * 4, dim=0))
            nn.init.zeros_(self.merge.bias)
            nn.init.zeros_(self.restore.bias)
        self.given: torch.Tensor | None = None
        """A ``(B, R)`` bool fine map for the next forward (training); None: the router decides."""
        self.last: dict | None = None
        """The last forward's ``fine`` map, router ``logits`` (None when every region is fine) and ``tokens``."""

    @property
    def coarse(self) -> bool:
        """Whether some regions are merged (``fine_ratio < 1``)."""
        return self.fine < self.num_regions

    @property
    def sequence_length(self) -> int:
        """Tokens the blocks run on: four per fine region, one per coarse region."""
        return 4 * self.fine + (self.num_regions - self.fine)

    def block_tokens(self, num_tokens: int) -> int:
        """The blocks run on the mixed-grain sequence, not on every patch token."""
        return self.sequence_length

    def route(self, regions: torch.Tensor, cond) -> torch.Tensor:
        """``(B, R)`` fine-grain logits of each region from its noisy tokens and the condition vector."""
        vector = condition_vector(cond)
        hidden = self.router_tokens(regions.flatten(2)) + self.router_cond(vector).unsqueeze(1)
        return self.router_out(F.silu(hidden)).squeeze(-1)

    def forward(self, dit: nn.Module, tokens: torch.Tensor, cond, t: torch.Tensor) -> torch.Tensor:
        given, self.given = self.given, None
        if tokens.shape[1] != self.grid**2:
            raise ValueError(f"trunk 'd2it' runs on the {self.grid}x{self.grid} image tokens alone, got {tokens.shape[1]} "
                             "tokens (text-stream blocks are not supported)")  # fmt: skip
        if not self.coarse:
            self.last = {"fine": None, "logits": None, "tokens": tokens.shape[1]}
            return run_blocks_in_order(dit, tokens, cond, range(len(dit.blocks)))
        batch, _, width = tokens.shape
        regions = to_regions(tokens, self.grid)
        logits = self.route(regions, cond)
        fine = given if given is not None else top_regions(logits.detach(), self.fine)
        if fine.shape != logits.shape or bool((fine.sum(1) != self.fine).any()):
            raise ValueError(f"a given grain map must mark exactly {self.fine} of {self.num_regions} regions fine per "
                             f"image (fine_ratio={self.fine_ratio}), shape {tuple(logits.shape)}")  # fmt: skip
        order = torch.sort(fine.to(torch.int8), dim=1, descending=True, stable=True).indices  # fine first, then coarse
        index = order[:, :, None, None].expand(-1, -1, 4, width)
        ordered = regions.gather(1, index)
        count = self.fine
        coarse = self.merge(ordered[:, count:].reshape(batch, -1, 4 * width)) + self.coarse_embed
        sequence = torch.cat([ordered[:, :count].reshape(batch, 4 * count, width), coarse], dim=1)
        for block in dit.blocks:
            sequence = block(sequence, cond)
        fine_out = sequence[:, : 4 * count].reshape(batch, count, 4, width)
        coarse_out = self.restore(sequence[:, 4 * count :]).reshape(batch, -1, 4, width)
        restored = torch.cat([fine_out, coarse_out], dim=1)
        out = torch.empty_like(restored).scatter(1, index, restored)
        self.last = {"fine": fine, "logits": logits, "tokens": sequence.shape[1]}
        return from_regions(out, self.grid)

    def macs(self, num_tokens: int) -> int:
        """The router, merge and restore per image (the blocks are counted at :meth:`block_tokens`)."""
        if not self.coarse:
            return 0
        regions, coarse = self.num_regions, self.num_regions - self.fine
        router = regions * (self.router_tokens.weight.numel() + self.router_out.weight.numel())
        return router + self.router_cond.weight.numel() + coarse * (self.merge.weight.numel()
                                                                     + self.restore.weight.numel())  # fmt: skip


def d2it_trunk_of(network: nn.Module) -> D2iTTrunk:
    trunk = getattr(network, "trunk", None)
    if not isinstance(trunk, D2iTTrunk):
        raise ValueError(f"this network has the {network.config.trunk!r} trunk, not 'd2it'; build it with "
                         "DiTConfig(trunk='d2it', trunk_options={'fine_ratio': ...})")  # fmt: skip
    return trunk


def plain_flops(network: nn.Module) -> int:
    """FLOPs per image of the same network with every region fine (the fixed-granularity DiT)."""
    from ditlab.models.budget import flops_per_image

    trunk = d2it_trunk_of(network)
    full, short, config = network.x_embedder.num_patches, trunk.sequence_length, network.config
    longer = sum(block.macs(full, config) - block.macs(short, config) for block in network.blocks)
    return flops_per_image(network) + 2 * longer - 2 * trunk.macs(full)


@register_trunk("d2it")
def d2it_trunk(config: DiTConfig) -> D2iTTrunk:
    for trait, reason in (("joint_text", "carry [text; image] tokens"), ("token_grid", "convolve the square token grid")):
        if block_kind_trait(config, trait):
            raise ValueError(f"trunk 'd2it' runs mixed-grain token sequences, which {config.block!r} blocks ({reason}) "
                             "cannot follow; use a block kind that mixes tokens by attention (dit, pixart)")  # fmt: skip
    if config.positions == "rope":
        raise ValueError("trunk 'd2it' merges tokens of the sin-cos position table; rotary positions (positions: rope) "
                         "would need each merged token's coordinates: use positions: sincos")  # fmt: skip
    if config.attention != "full":
        raise ValueError(f"trunk 'd2it' runs mixed-grain sequences, which the {config.attention!r} attention kind (laid "
                         "out on the token grid) cannot follow; use attention: full")  # fmt: skip
    return D2iTTrunk(config, **config.trunk_options)
