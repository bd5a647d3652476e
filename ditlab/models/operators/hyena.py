"""``hyena``: Grafting's Hyena-style mixers, short depthwise convolutions and elementwise gates, no softmax.

Chandrasegaran et al., "Exploring Diffusion Transformer Designs via Grafting" (NeurIPS 2025),
https://github.com/keshik6/grafting; the mixers follow Hyena (Poli et al., 2023) / StripedHyena. The block's
``qkv`` projection is the mixer's ``in_proj`` to ``3 D`` and its ``proj`` the ``out_proj``, so a graft keeps
both and only adds the filters:

- ``x``: ``q, k, v = split(conv(qkv))``, ``y = q * k * v`` (one conv over all ``3 D`` channels);
- ``y``: ``y = q * conv(k * v)``;
- ``se``: both convolutions.

Grafting's filters are causal, length 4, over the raster sequence (``layout: raster``); ``layout: 2d`` uses a
``kernel x kernel`` depthwise convolution on the token grid instead ([interp], the spec's 2-D variant). Every
filter starts as the identity (the public code does so for Hyena-Y; [interp] for X and SE), so at
initialisation each variant is ``q * k * v``. Pure PyTorch (``conv1d`` / ``conv2d``), no CUDA kernels.

    attention: hyena
    attention_options: {variant: y, layout: 2d, kernel: 3}
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ditlab.models.config import DiTConfig
from ditlab.models.operators.grid import token_grid
from ditlab.models.operators.registry import check_options, register_operator

VARIANTS = ("x", "y", "se")
LAYOUTS = ("raster", "2d")


class ShortConv(nn.Module):
    """Depthwise convolution over tokens of ``channels`` channels, identity at initialisation.

    ``raster``: causal 1-D filter of length ``kernel`` (a token sees itself and the ``kernel - 1`` before it);
    ``2d``: ``kernel x kernel`` filter on the token grid, zero-padded ('same').
    """

    def __init__(self, channels: int, kernel: int, layout: str) -> None:
        super().__init__()
        self.layout, self.kernel = layout, kernel
        shape = (channels, 1, kernel) if layout == "raster" else (channels, 1, kernel, kernel)
        weight = torch.zeros(shape)
        if layout == "raster":
            weight[..., -1] = 1.0
        else:
            weight[..., kernel // 2, kernel // 2] = 1.0
        self.weight = nn.Parameter(weight)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """``tokens (B, C, N) -> (B, C, N)``."""
        channels = tokens.shape[1]
        if self.layout == "raster":
            return F.conv1d(F.pad(tokens, (self.kernel - 1, 0)), self.weight, groups=channels)
        height, width = token_grid(tokens.shape[2])
        grid = tokens.reshape(tokens.shape[0], channels, height, width)
        return F.conv2d(grid, self.weight, padding=self.kernel // 2, groups=channels).flatten(2)

    def macs(self, num_tokens: int) -> int:
        return num_tokens * self.weight.numel()


class HyenaMixer(nn.Module):
    """Hyena-X / Y / SE over ``q, k, v (B, H, N, Dh)`` as channels ``C = H Dh``."""

    name = "hyena"

    def __init__(self, channels: int, variant: str = "y", layout: str = "raster", kernel: int | None = None) -> None:
        super().__init__()
        if variant not in VARIANTS:
            raise ValueError(f"attention_options.variant={variant!r} for 'hyena'; choices: {list(VARIANTS)}")
        if layout not in LAYOUTS:
            raise ValueError(f"attention_options.layout={layout!r} for 'hyena'; choices: {list(LAYOUTS)}")
        kernel = kernel if kernel is not None else (4 if layout == "raster" else 3)
        if not isinstance(kernel, int) or kernel < 1 or (layout == "2d" and kernel % 2 == 0):
            raise ValueError(f"attention_options.kernel={kernel!r} for 'hyena' must be a positive integer "
                             "(odd for the 2d layout)")  # fmt: skip
        self.variant, self.layout = variant, layout
        self.input_conv = ShortConv(3 * channels, kernel, layout) if variant in ("x", "se") else None
        self.inner_conv = ShortConv(channels, kernel, layout) if variant in ("y", "se") else None

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        batch, heads, num_tokens, head_dim = q.shape
        channels = [t.permute(0, 1, 3, 2).reshape(batch, heads * head_dim, num_tokens) for t in (q, k, v)]
        if self.input_conv is not None:
            channels = list(self.input_conv(torch.cat(channels, dim=1)).chunk(3, dim=1))
        query, key, value = channels
        gated = key * value
        if self.inner_conv is not None:
            gated = self.inner_conv(gated)
        out = query * gated
        return out.reshape(batch, heads, head_dim, num_tokens).permute(0, 1, 3, 2)

    def macs(self, num_tokens: int, num_heads: int, head_dim: int) -> int:
        """The filters plus the two elementwise products (linear in tokens)."""
        convs = sum(conv.macs(num_tokens) for conv in (self.input_conv, self.inner_conv) if conv is not None)
        return convs + 2 * num_tokens * num_heads * head_dim

    def extra_repr(self) -> str:
        return f"variant={self.variant}, layout={self.layout}"


def build_hyena(config: DiTConfig, options: dict[str, Any]) -> HyenaMixer:
    check_options("hyena", options, ("variant", "layout", "kernel"))
    return HyenaMixer(config.num_heads * config.attention_head_dim, **options)


register_operator("hyena", build_hyena)
