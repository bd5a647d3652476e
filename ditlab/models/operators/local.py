"""``local``: CLEAR's conv-like attention, each query seeing a disc of radius ``r`` on the token grid.

Liu et al., "CLEAR: Conv-Like Linearization Revs Pre-Trained Diffusion Transformers Up" (NeurIPS 2025),
https://github.com/Huage001/CLEAR. A query at grid point ``(i, j)`` attends key ``(i', j')`` iff
``(i - i')^2 + (j - j')^2 < r^2`` (strict, as in the public mask). With ``pool = d > 1`` every query also sees a
``d x``-downsampled copy of all keys and values, ``K~[p, q] = sum_{a,b<d} w[a, b] K[p d + a, q d + b]`` with
``w (d, d)`` learnable per layer and initialised to ``1 / d^2`` (average pooling). DiT has no text tokens, so
CLEAR's text rows and columns do not arise.

    attention: local
    attention_options: {radius: 4, pool: 2}   # optional: blocks, kernel (auto | gather | dense | flex)
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from ditlab.models.config import DiTConfig
from ditlab.models.operators.grid import neighbour_index, token_grid
from ditlab.models.operators.neighbourhood import NeighbourhoodOperator
from ditlab.models.operators.registry import check_options, register_operator


def disc_offsets(radius: float) -> list[tuple[int, int]]:
    """Lattice offsets strictly inside a disc of ``radius``."""
    reach = math.ceil(radius)
    return [(di, dj) for di in range(-reach, reach + 1) for dj in range(-reach, reach + 1) if di * di + dj * dj < radius**2]


def pool_grid(tokens: torch.Tensor, weights: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """``tokens (B, H, N, Dh)`` on an ``height x width`` grid -> ``(B, H, N / d^2, Dh)`` pooled with ``weights (d, d)``."""
    batch, heads, _, head_dim = tokens.shape
    factor = weights.shape[0]
    grid = tokens.reshape(batch, heads, height // factor, factor, width // factor, factor, head_dim)
    pooled = torch.einsum("nhpaqcd,ac->nhpqd", grid, weights.to(tokens.dtype))
    return pooled.reshape(batch, heads, -1, head_dim)


class LocalAttention(NeighbourhoodOperator):
    """CLEAR's disc neighbourhood, optionally with learnable pooled keys/values (``pool > 1``)."""

    name = "local"

    def __init__(self, radius: float, pool: int = 1, kernel: str = "auto") -> None:
        super().__init__(kernel)
        if not isinstance(radius, (int, float)) or radius < 1:
            raise ValueError(f"attention_options.radius={radius!r} for 'local' must be at least 1 (1 = the token itself)")
        if not isinstance(pool, int) or pool < 1:
            raise ValueError(f"attention_options.pool={pool!r} for 'local' must be a positive integer (1 = no pooling)")
        self.radius, self.pool = float(radius), pool
        self.offsets = disc_offsets(self.radius)
        self.pool_weight = nn.Parameter(torch.full((pool, pool), 1.0 / pool**2)) if pool > 1 else None

    def neighbours(self, num_tokens: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        return neighbour_index(self.offsets, *token_grid(num_tokens), device)

    def check_grid(self, num_tokens: int) -> tuple[int, int]:
        height, width = token_grid(num_tokens)
        if height % self.pool or width % self.pool:
            raise ValueError(f"a {height}x{width} token grid is not divisible by attention_options.pool={self.pool}; "
                             "pick a pooling factor that divides the grid side")  # fmt: skip
        return height, width

    def global_tokens(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        if self.pool_weight is None:
            return None
        height, width = self.check_grid(k.shape[2])
        return pool_grid(k, self.pool_weight, height, width), pool_grid(v, self.pool_weight, height, width)

    def global_count(self, num_tokens: int) -> int:
        if self.pool_weight is None:
            return 0
        self.check_grid(num_tokens)
        return num_tokens // self.pool**2

    def macs(self, num_tokens: int, num_heads: int, head_dim: int) -> int:
        pooling = 2 * num_tokens * num_heads * head_dim if self.pool_weight is not None else 0  # K~ and V~
        return super().macs(num_tokens, num_heads, head_dim) + pooling

    def extra_repr(self) -> str:
        return f"radius={self.radius:g}, pool={self.pool}, kernel={self.kernel}"


def build_local(config: DiTConfig, options: dict[str, Any]) -> LocalAttention:
    check_options("local", options, ("radius", "pool", "kernel"))
    if "radius" not in options:
        raise ValueError("the 'local' attention needs attention_options.radius (e.g. 4 tokens)")
    operator = LocalAttention(**options)
    if operator.pool > 1:
        operator.check_grid(config.num_tokens)
    return operator


register_operator("local", build_local)
