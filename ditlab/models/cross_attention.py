"""Cross-attention from image tokens to text tokens, as PixArt's blocks read their caption.

PixArt-alpha (Chen et al., "PixArt-alpha: Fast Training of Diffusion Transformer for Photorealistic Text-to-Image
Synthesis", 2023) and PixArt-Sigma (Chen et al., 2024) put one multi-head cross-attention in every block: queries
from the image tokens, keys and values from the (projected) text tokens, an output projection, no gate. Parameter
names follow PixArt's public ``MultiHeadCrossAttention`` (``q_linear``, a fused ``kv_linear`` whose output is
``[k; v]``, ``proj``), so its block weights need no renaming. Padding tokens of the caption are masked out of the
keys (SDPA with a boolean key mask). A row whose mask has no real token attends to all of its tokens as if unmasked
(SDPA would give NaN): diffusers' additive ``-10000`` bias computes the same softmax, shifted, up to its float32
rounding of ``score - 10000`` (about 1e-3 in the exponent). Checked against diffusers 0.42.1 (``AttnProcessor2_0``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class CrossAttention(nn.Module):
    """``cross_attn(tokens (B, N, D), context (B, L, C), mask (B, L) bool or None) -> (B, N, D)``.

    The inner width is ``num_heads * head_dim`` (``head_dim`` defaults to ``dim // num_heads``); ``context_dim``
    (default ``dim``) is the width of the text tokens it reads.
    """

    def __init__(
        self, dim: int, num_heads: int, context_dim: int | None = None, head_dim: int | None = None
    ) -> None:
        super().__init__()
        if head_dim is None and dim % num_heads:
            raise ValueError(f"hidden size {dim} is not divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.head_dim = head_dim or dim // num_heads
        inner = num_heads * self.head_dim
        self.q_linear = nn.Linear(dim, inner)
        self.kv_linear = nn.Linear(context_dim or dim, 2 * inner)
        self.proj = nn.Linear(inner, dim)

    def forward(
        self, tokens: torch.Tensor, context: torch.Tensor, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        batch, length = tokens.shape[:2]
        heads, head_dim = self.num_heads, self.head_dim
        q = self.q_linear(tokens).reshape(batch, length, heads, head_dim).transpose(1, 2)
        kv = self.kv_linear(context).reshape(batch, context.shape[1], 2, heads, head_dim)
        k, v = kv.permute(2, 0, 3, 1, 4).unbind(0)
        key_mask = None
        if mask is not None:
            mask = mask.to(device=tokens.device, dtype=torch.bool)
            # a caption with no real token attends to all its tokens (not NaN), as diffusers' bias does
            mask = mask | ~mask.any(dim=-1, keepdim=True)
            key_mask = mask[:, None, None, :]
        mixed = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask)
        return self.proj(mixed.transpose(1, 2).flatten(2))

    def macs(self, num_tokens: int, text_length: int) -> int:
        """Per image: the query and output projections on ``num_tokens`` image tokens, the key/value projection on
        ``text_length`` text tokens and the mixing (``q k^T`` and ``attn v``: ``2 N L H Dh``)."""
        inner = self.num_heads * self.head_dim
        projections = num_tokens * (self.q_linear.weight.numel() + self.proj.weight.numel())
        return (
            projections + text_length * self.kv_linear.weight.numel() + 2 * num_tokens * text_length * inner
        )
