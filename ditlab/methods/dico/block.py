"""The ``dico`` block kind: DiCo's conv block with compact channel attention, behind adaLN from the condition.

Ai et al., "DiCo: Revitalizing ConvNets for Scalable and Efficient Diffusion Modeling" (NeurIPS 2025,
arXiv 2505.11196), checked against the public ``DiCoBlock`` (github shallowdream204/DiCo, ``dico_models.py``).
With ``shift/scale/gate`` of the conv branch and of the FFN from ``adaLN_modulation(cond)`` (six chunks, as DiT)::

    h = GELU(dwconv3x3(pwconv1(LN1(x) * (1 + scale_c) + shift_c)))    # pointwise, then depthwise on the grid
    x = x + gate_c * pwconv3(h * sigmoid(W_ca avgpool(h) + b_ca))      # compact channel attention (CCA)
    x = x + gate_f * pwconv5(GELU(pwconv4(LN2(x) * (1 + scale_f) + shift_f)))   # the conv FFN (1x1 convs)

LayerNorms without affine parameters (eps 1e-6); the FFN is ``config.mlp_ratio`` wide (DiCo S-XL use 2). Parameter
names and shapes are the public code's (``conv1`` .. ``conv5``, ``ca.1``, ``adaLN_modulation``). Tokens ``(B, N, D)``
in raster order are laid on their square grid for the depthwise convolution only: the pointwise convolutions, the
CCA and the FFN are per token (the same arithmetic as a 1x1 convolution), so a branch hook may run the FFN on some
tokens only, as it does an MLP.

The block offers two branches to a hook (``ditlab.models.branch``): ``conv`` (the token mixer, kind ``attention``:
caches reuse it whole) and ``mlp`` (the FFN, kind ``mlp``). Its ``macs`` count every convolution and the adaLN
linear, so FLOP budgets, caches' work counters and reports see it like a DiT block.

Width and resolution: with the ``dico`` trunk (:mod:`ditlab.methods.dico.trunk`, the paper's U-shaped macro design)
a block at level ``l`` works on ``N / 4^l`` tokens of width ``D 2^l``; with the plain ``blocks`` trunk every block
is at level 0 (an isotropic DiCo, which depth pruning, taps and caches treat like any block stack). [interp] The
paper gives each level its own timestep/label embedders of width ``D 2^l``; here every block reads the network's one
``(B, D)`` condition and its adaLN linear maps it to ``6 D 2^l``.

Initialisation (:meth:`DiCoBlock.initialize`, after the DiT one): every convolution Xavier-uniform with zero bias and
the adaLN linear zeroed (adaLN-Zero), as the public ``initialize_weights``.

    block: dico
    block_options: {kernel_size: 3}   # optional; the attention and mlp slots must stay full / dense (unused)
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ditlab.models.branch import Branch, BranchHook, compute_branch
from ditlab.models.components import register_block
from ditlab.models.config import DiTConfig

BLOCK_OPTIONS = {"kernel_size"}


def modulate(tokens: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN: ``tokens (B, N, W) * (1 + scale (B, W)) + shift (B, W)``."""
    return tokens * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def tokens_to_grid(tokens: torch.Tensor) -> torch.Tensor:
    """``(B, N, W)`` in raster order -> ``(B, W, h, h)``."""
    batch, num_tokens, width = tokens.shape
    side = math.isqrt(num_tokens)
    if side * side != num_tokens:
        raise ValueError(f"{num_tokens} tokens are not a square grid; the dico block convolves a square token grid")
    return tokens.transpose(1, 2).reshape(batch, width, side, side)


def grid_to_tokens(grid: torch.Tensor) -> torch.Tensor:
    """``(B, W, h, w)`` -> ``(B, h w, W)`` in raster order."""
    return grid.flatten(2).transpose(1, 2)


def pointwise(conv: nn.Conv2d, tokens: torch.Tensor) -> torch.Tensor:
    """A 1x1 convolution applied per token ``(B, N, W_in) -> (B, N, W_out)``."""
    return F.linear(tokens, conv.weight.flatten(1), conv.bias)


def dico_levels(config: DiTConfig) -> list[int]:
    """The level (0 = full resolution) of every block: from ``trunk_options.stages`` with the ``dico`` trunk
    (encoder stages down to the middle one, then back up), else 0 for all. Without ``stages`` the hourglass has one
    level: ``[k, depth - 2k, k]`` with ``k = depth // 3``."""
    if config.trunk != "dico":
        return [0] * config.depth
    stages = config.trunk_options.get("stages", default_stages(config.depth))
    if not isinstance(stages, (list, tuple)) or len(stages) % 2 == 0 or not all(
            isinstance(s, int) and s >= 0 for s in stages):  # fmt: skip
        raise ValueError(f"trunk_options.stages={stages!r} for the 'dico' trunk must be an odd-length list of block "
                         "counts per stage (encoder levels, middle, decoder levels), e.g. [2, 2, 2, 2, 2]")  # fmt: skip
    if sum(stages) != config.depth:
        raise ValueError(f"trunk_options.stages={list(stages)} has {sum(stages)} blocks but depth is {config.depth}; "
                         "set depth to their sum (a dico hourglass cannot be depth-pruned block by block)")  # fmt: skip
    middle = len(stages) // 2
    return [middle - abs(middle - stage) for stage, count in enumerate(stages) for _ in range(count)]


def default_stages(depth: int) -> list[int]:
    """The ``dico`` trunk's stages when the config names none: one level down and back, ``[k, depth - 2k, k]``."""
    side = depth // 3
    return [side, depth - 2 * side, side]


@register_block("dico")
class DiCoBlock(nn.Module):
    """DiCo's conv block (see the module docstring): ``block(tokens (B, n, W), cond (B, D)) -> (B, n, W)``."""

    token_grid = True
    """Its token mixer convolves the whole square token grid: a trunk that runs blocks on a subset or a mixture of
    tokens (token routing, mixed granularity) cannot run it and should refuse it when it is built."""

    def __init__(self, config: DiTConfig, block: int | None = None) -> None:
        super().__init__()
        if config.attention != "full" or config.attention_options or config.mlp != "dense" or config.mlp_options:
            raise ValueError(f"the 'dico' block has no attention or MLP component (it convolves), so the config's "
                             f"attention {config.attention!r} / mlp {config.mlp!r} would be ignored: keep them full / "
                             "dense without options")  # fmt: skip
        if config.text_conditioned:
            raise ValueError("the 'dico' block reads a class condition vector; use condition: class")
        unknown = sorted(set(config.block_options) - BLOCK_OPTIONS)
        if unknown:
            raise ValueError(f"unknown dico block_options {unknown}; known: {sorted(BLOCK_OPTIONS)}")
        kernel = config.block_options.get("kernel_size", 3)
        if not isinstance(kernel, int) or kernel < 1 or kernel % 2 == 0:
            raise ValueError(f"block_options.kernel_size={kernel!r} for 'dico' must be an odd positive integer")
        self.level = dico_levels(config)[block] if block is not None else 0
        width = config.hidden_size * 2**self.level
        hidden = int(config.mlp_ratio * width)
        self.width, self.hidden, self.kernel_size = width, hidden, kernel
        self.conv1 = nn.Conv2d(width, width, 1)
        self.conv2 = nn.Conv2d(width, width, kernel, padding=kernel // 2, groups=width)
        self.conv3 = nn.Conv2d(width, width, 1)
        self.ca = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(width, width, 1), nn.Sigmoid())
        self.conv4 = nn.Conv2d(width, hidden, 1)
        self.conv5 = nn.Conv2d(hidden, width, 1)
        self.norm1 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.norm2 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(config.hidden_size, 6 * width))
        self.initialize()

    def initialize(self) -> None:
        """DiCo's initialisation: Xavier-uniform convolutions with zero bias, the adaLN linear zeroed."""
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        nn.init.zeros_(self.adaLN_modulation[-1].weight)
        nn.init.zeros_(self.adaLN_modulation[-1].bias)

    # ----------------------------------------------------------------------------------- the two branches
    def mix(self, tokens: torch.Tensor) -> torch.Tensor:
        """The conv branch on modulated tokens ``(B, n, W)`` of a square grid: pointwise, depthwise, GELU, CCA,
        pointwise."""
        mixed = F.gelu(grid_to_tokens(self.conv2(tokens_to_grid(pointwise(self.conv1, tokens)))))
        attention = torch.sigmoid(pointwise(self.ca[1], mixed.mean(dim=1, keepdim=True)))  # (B, 1, W)
        return pointwise(self.conv3, mixed * attention)

    def feed(self, tokens: torch.Tensor) -> torch.Tensor:
        """The conv FFN, per token: ``(B, n', W) -> (B, n', W)`` for any subset of tokens."""
        return pointwise(self.conv5, F.gelu(pointwise(self.conv4, tokens)))

    def forward(
        self,
        tokens: torch.Tensor,
        cond: torch.Tensor,
        *,
        return_attention: bool = False,
        branches: BranchHook | None = None,
        index: int = -1,
    ) -> torch.Tensor:
        """``tokens: (B, n, W)``, ``cond: (B, D)``; ``branches`` decides each branch's pre-gate output (``conv`` then
        ``mlp``), ``index`` names this block to it."""
        if return_attention:
            raise ValueError("the 'dico' block has no attention map (it convolves); tap maps of attention blocks")
        shift_c, scale_c, gate_c, shift_f, scale_f, gate_f = self.adaLN_modulation(cond).chunk(6, dim=1)
        branches = branches or compute_branch
        conv_in = tokens
        mixed = branches(Branch(index, "attention", lambda: modulate(self.norm1(conv_in), shift_c, scale_c), self.mix,
                                gate_c, unit=0))  # fmt: skip
        tokens = tokens + gate_c.unsqueeze(1) * mixed
        mlp_in = tokens
        fed = branches(Branch(index, "mlp", lambda: modulate(self.norm2(mlp_in), shift_f, scale_f), self.feed, gate_f,
                              unit=1))  # fmt: skip
        return tokens + gate_f.unsqueeze(1) * fed

    @staticmethod
    def units() -> list[tuple[str, str]]:
        """The branches this block offers a hook, in order (``ditlab.models.trunk``): the conv token mixer (kind
        ``attention``) and the FFN (kind ``mlp``)."""
        return [("conv", "attention"), ("mlp", "mlp")]

    def macs(self, num_tokens: int, config: DiTConfig) -> int:
        """Multiply-accumulates per image at ``num_tokens`` full-resolution tokens (this block sees ``N / 4^level``):
        the adaLN linear, the pointwise and depthwise convolutions, the CCA's 1x1 convolution (once, on the pooled
        vector) and the FFN. Biases, norms, GELU, sigmoid and the pooling are elementwise and not counted."""
        tokens = num_tokens // 4**self.level
        width, hidden = self.width, self.hidden
        mixer = 2 * tokens * width * width + tokens * width * self.kernel_size**2 + width * width
        return self.adaLN_modulation[-1].weight.numel() + mixer + 2 * tokens * width * hidden
