"""What alignment reads of a text-conditioned network: the image part of its hidden states and attention maps.

Alignment compares a DiT's patch tokens with an image encoder's patch features (REPA, REG) and its attention maps
with the encoder's (HASTE). PixArt blocks (Chen et al., 2023) carry the image tokens alone (the caption enters
through cross-attention), so they are read as DiT's. MM-DiT blocks (SD3, Esser et al., 2024; FLUX.1) carry
``[text; image]`` through the trunk (``DiT.text_stream``): the encoder sees the image only, so its targets are
matched against the last ``N`` tokens, and the joint attention map ``(B, H, L + N, L + N)`` is cut to its
image-to-image block with each row renormalised over the image keys ([interp]: the share an image query gives the
text keys is left out of HASTE's target comparison, as the encoder's map has no text keys; HASTE drops the CLS
row and column of DINOv2's map the same way).
"""

from __future__ import annotations

import torch
from torch import nn


def image_tokens(dit: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """The image tokens ``(B, N, D)`` of hidden states ``tokens`` (``[text; image]`` on a text-stream network)."""
    count = dit.x_embedder.num_patches
    return tokens[:, -count:] if dit.text_stream and tokens.shape[1] > count else tokens


def image_attention(dit: nn.Module, maps: torch.Tensor) -> torch.Tensor:
    """The image-to-image attention ``(B, H, N, N)`` of a map, rows summing to 1 (see the module docstring)."""
    count = dit.x_embedder.num_patches
    if not dit.text_stream or maps.shape[-1] == count:
        return maps
    block = maps[..., -count:, -count:]
    return block / block.sum(-1, keepdim=True).clamp_min(1e-12)
