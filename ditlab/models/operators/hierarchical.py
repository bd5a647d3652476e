"""``hierarchical``: Scale-DiT's local windows along a Hilbert curve plus a low-resolution global pathway.

Scale-DiT (arXiv 2510.16325): tokens are reordered along a Hilbert curve, so ``window^2`` consecutive tokens
form a ``window x window`` patch; each query attends the tokens of its patch and, through a low-resolution
pathway, a coarse copy of the whole image. Here the pathway is the keys and values average-pooled by
``pool`` on the grid ([interp]: the paper feeds a separately encoded low-resolution latent and a LoRA bridge,
which a single-resolution DiT block does not have). ``pool: 0`` is pure window attention; a window covering the
grid is full attention. Cost per query: ``window^2 + N / pool^2`` keys.

    attention: hierarchical
    attention_options: {window: 4, pool: 4, order: hilbert}   # order: hilbert | raster
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ditlab.models.config import DiTConfig
from ditlab.models.operators.grid import token_grid
from ditlab.models.operators.hilbert import hilbert_permutation, inverse_permutation
from ditlab.models.operators.registry import check_options, register_operator

ORDERS = ("hilbert", "raster")


class HierarchicalAttention(nn.Module):
    """Attention inside consecutive windows of a token order, plus pooled global keys/values."""

    name = "hierarchical"

    def __init__(self, window: int, pool: int = 0, order: str = "hilbert") -> None:
        super().__init__()
        if not isinstance(window, int) or window < 1:
            raise ValueError(f"attention_options.window={window!r} for 'hierarchical' must be an integer >= 1 "
                             "(the window side in tokens)")  # fmt: skip
        if not isinstance(pool, int) or pool < 0:
            raise ValueError(f"attention_options.pool={pool!r} for 'hierarchical' must be 0 (no global pathway) or a "
                             "positive pooling factor")  # fmt: skip
        if order not in ORDERS:
            raise ValueError(f"attention_options.order={order!r} for 'hierarchical'; choices: {list(ORDERS)}")
        self.window, self.pool, self.order = window, pool, order
        self._orders: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    def check_grid(self, num_tokens: int) -> tuple[int, int]:
        height, width = token_grid(num_tokens)
        if num_tokens % (self.window**2) and self.window < height:
            raise ValueError(f"windows of {self.window}x{self.window} tokens do not tile a {height}x{width} grid; "
                             "pick a window side that divides the grid side")  # fmt: skip
        if self.pool and (height % self.pool or width % self.pool):
            raise ValueError(f"a {height}x{width} token grid is not divisible by attention_options.pool={self.pool}")
        return height, width

    def permutation(self, num_tokens: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """``(perm, inverse)`` of the token order, cached per grid and device."""
        key = (num_tokens, str(device))
        if key not in self._orders:
            height, _ = token_grid(num_tokens)
            perm = hilbert_permutation(height) if self.order == "hilbert" else torch.arange(num_tokens)
            self._orders[key] = (perm.to(device), inverse_permutation(perm).to(device))
        return self._orders[key]

    def window_tokens(self, num_tokens: int) -> int:
        return min(self.window**2, num_tokens)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        batch, heads, num_tokens, head_dim = q.shape
        height, width = self.check_grid(num_tokens)
        size = self.window_tokens(num_tokens)
        perm, inverse = self.permutation(num_tokens, q.device)

        def windows(t: torch.Tensor) -> torch.Tensor:
            return t[:, :, perm].reshape(batch, heads, num_tokens // size, size, head_dim)

        scale = head_dim**-0.5
        qw, kw, vw = windows(q) * scale, windows(k), windows(v)
        scores = qw @ kw.transpose(-2, -1)  # (B, H, nW, w, w)
        if self.pool:
            kp, vp = (self.pooled(t, height, width) for t in (k, v))  # (B, H, M, Dh)
            scores = torch.cat([scores, torch.einsum("bhnwd,bhmd->bhnwm", qw, kp)], dim=-1)
        weights = torch.softmax(scores, dim=-1)
        out = weights[..., :size] @ vw
        if self.pool:
            out = out + torch.einsum("bhnwm,bhmd->bhnwd", weights[..., size:], vp)
        return out.reshape(batch, heads, num_tokens, head_dim)[:, :, inverse]

    def pooled(self, tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
        batch, heads, _, head_dim = tokens.shape
        grid = tokens.permute(0, 1, 3, 2).reshape(batch * heads, head_dim, height, width)
        pooled = F.avg_pool2d(grid, self.pool)
        return pooled.reshape(batch, heads, head_dim, -1).permute(0, 1, 3, 2)

    def macs(self, num_tokens: int, num_heads: int, head_dim: int) -> int:
        self.check_grid(num_tokens)
        keys = self.window_tokens(num_tokens) + (num_tokens // self.pool**2 if self.pool else 0)
        return 2 * num_tokens * keys * num_heads * head_dim

    def extra_repr(self) -> str:
        return f"window={self.window}, pool={self.pool}, order={self.order}"


def build_hierarchical(config: DiTConfig, options: dict[str, Any]) -> HierarchicalAttention:
    check_options("hierarchical", options, ("window", "pool", "order"))
    if "window" not in options:
        raise ValueError("the 'hierarchical' attention needs attention_options.window (the window side, e.g. 4)")
    operator = HierarchicalAttention(**options)
    operator.check_grid(config.num_tokens)
    if operator.order == "hilbert":
        hilbert_permutation(config.grid_size)  # refuses a grid side that is not a power of two, at build time
    return operator


register_operator("hierarchical", build_hierarchical)
