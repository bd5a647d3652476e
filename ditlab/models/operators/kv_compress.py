"""``kv-compress``: PixArt-Sigma's key/value token compression, attention over spatially down-sampled keys and values.

Chen et al., "PixArt-Sigma: Weak-to-Strong Training of Diffusion Transformer for 4K Text-to-Image Generation"
(ECCV 2024), Sec. 2.3, and the public ``AttentionKVCompress`` (github PixArt-alpha/PixArt-sigma,
``diffusion/model/nets/PixArt_blocks.py``). Every query attends all ``N`` tokens' information, but through
``N / r^2`` keys and values: ``K~ = conv_r(K)``, ``V~ = conv_r(V)`` with one depthwise (grouped, ``groups = C``)
``r x r`` convolution of stride ``r`` on the token grid, shared by keys and values, over the ``C = H Dh`` channels
after the ``qkv`` projection (and after the query/key norm, as PixArt-Sigma). The convolution is initialised as the
average operator (every weight ``1 / r^2``, zero bias), so a freshly compressed attention is attention over
average-pooled keys and values; ``ratio: 1`` has no convolution at all and is full attention.

``norm: true`` adds the public code's ``LayerNorm(C)`` (affine, shared by keys and values) after the convolution.
The paper does not mention it and it moves a grafted teacher's key/value scale at initialisation, so it is off by
default ([interp]). Cost per image: ``2 N (N / r^2) H Dh`` for ``q K~^T`` and ``attn V~`` plus ``2 N C`` for the
two convolutions (``N / r^2`` outputs x ``r^2`` taps x ``C`` channels each); the norm is elementwise, not counted.

    attention: kv-compress
    attention_options: {ratio: 2}        # optional: norm (false), blocks (PixArt-Sigma compresses deep blocks only)

As every operator kind it takes ``attention_options.blocks`` (the other blocks keep full attention), so grafting
names it like any operator: ``graft: {operator: kv-compress, options: {ratio: 2}, blocks: odd}``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ditlab.models.attention import attention_map
from ditlab.models.config import DiTConfig
from ditlab.models.operators.grid import token_grid
from ditlab.models.operators.registry import check_options, register_operator


class KVCompressAttention(nn.Module):
    """Softmax attention of all queries over keys and values down-sampled ``ratio x`` per grid side."""

    name = "kv-compress"

    def __init__(self, channels: int, ratio: int = 2, norm: bool = False) -> None:
        super().__init__()
        if not isinstance(ratio, int) or isinstance(ratio, bool) or ratio < 1:
            raise ValueError(f"attention_options.ratio={ratio!r} for 'kv-compress' must be a positive integer "
                             "(1 = no compression)")  # fmt: skip
        if not isinstance(norm, bool):
            raise ValueError(f"attention_options.norm={norm!r} for 'kv-compress' must be true or false")
        self.channels, self.ratio, self.use_norm = channels, ratio, norm
        self.sr = nn.Conv2d(channels, channels, ratio, stride=ratio, groups=channels) if ratio > 1 else None
        self.norm = nn.LayerNorm(channels) if ratio > 1 and norm else None
        self.initialize()

    def initialize(self) -> None:
        """PixArt-Sigma's average initialisation (``1 / r^2`` weights, zero bias); the norm starts as identity-affine."""
        if self.sr is not None:
            with torch.no_grad():
                self.sr.weight.fill_(1.0 / self.ratio**2)
                self.sr.bias.zero_()
        if self.norm is not None:
            self.norm.reset_parameters()

    def check_grid(self, num_tokens: int) -> tuple[int, int]:
        height, width = token_grid(num_tokens)
        if height % self.ratio or width % self.ratio:
            raise ValueError(f"a {height}x{width} token grid is not divisible by attention_options.ratio={self.ratio} "
                             "of 'kv-compress'; pick a ratio that divides the grid side")  # fmt: skip
        return height, width

    def compress(self, tokens: torch.Tensor) -> torch.Tensor:
        """``(B, H, N, Dh)`` keys or values -> ``(B, H, N / r^2, Dh)`` through the grouped convolution."""
        if self.sr is None:
            return tokens
        batch, heads, num_tokens, head_dim = tokens.shape
        height, width = self.check_grid(num_tokens)
        if heads * head_dim != self.channels:
            raise ValueError(f"'kv-compress' was built for {self.channels} channels, got {heads} heads x {head_dim}")
        # channels in PixArt's order (head-major: channel = head * Dh + d), laid out on the grid
        grid = tokens.permute(0, 1, 3, 2).reshape(batch, heads * head_dim, height, width)
        # (B, N / r^2, C), made contiguous so that the keys' head dimension is too: SDPA's fused CPU kernel needs a
        # unit last stride and otherwise falls back to the math path, which materialises the (N, N / r^2) map
        pooled = self.sr(grid).flatten(2).transpose(1, 2).contiguous()
        if self.norm is not None:
            pooled = self.norm(pooled)
        return pooled.reshape(batch, -1, heads, head_dim).transpose(1, 2)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return F.scaled_dot_product_attention(q, self.compress(k), self.compress(v))

    def map(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """The ``(B, H, N, N)`` map, only without compression (a compressed map's columns are not the tokens of ``v``)."""
        if self.sr is not None:
            raise ValueError(f"the 'kv-compress' operator with ratio {self.ratio} gives no (N, N) attention map; "
                             "align maps of blocks with full attention")  # fmt: skip
        return attention_map(q, k)

    def macs(self, num_tokens: int, num_heads: int, head_dim: int) -> int:
        """``q K~^T`` and ``attn V~`` over ``N / r^2`` keys, plus the two grouped convolutions (``N C`` each)."""
        self.check_grid(num_tokens)
        keys = num_tokens // self.ratio**2
        convolutions = 2 * num_tokens * num_heads * head_dim if self.sr is not None else 0
        return 2 * num_tokens * keys * num_heads * head_dim + convolutions

    def extra_repr(self) -> str:
        return f"channels={self.channels}, ratio={self.ratio}, norm={self.use_norm}"


def build_kv_compress(config: DiTConfig, options: dict[str, Any]) -> KVCompressAttention:
    check_options("kv-compress", options, ("ratio", "norm"))
    operator = KVCompressAttention(config.num_heads * config.attention_head_dim, **options)
    operator.check_grid(config.num_tokens)
    return operator


register_operator("kv-compress", build_kv_compress)
