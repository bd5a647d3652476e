"""The Hilbert-curve order of a square token grid, so that consecutive tokens are 2-D neighbours.

Scale-DiT (arXiv 2510.16325) reorders tokens along a Hilbert curve so a fixed-size window of the sequence is a
compact 2-D patch. The index -> (x, y) map is the classic iterative one (Hilbert 1891; the "d2xy" algorithm).
"""

from __future__ import annotations

import torch


def hilbert_point(order: int, distance: int) -> tuple[int, int]:
    """``(row, col)`` of the ``distance``-th point of the Hilbert curve filling a ``2^order`` square."""
    x = y = 0
    step, remaining = 1, distance
    while step < (1 << order):
        rx = 1 & (remaining // 2)
        ry = 1 & (remaining ^ rx)
        if ry == 0:
            if rx == 1:
                x, y = step - 1 - x, step - 1 - y
            x, y = y, x
        x, y = x + step * rx, y + step * ry
        remaining //= 4
        step *= 2
    return y, x


def hilbert_permutation(side: int) -> torch.Tensor:
    """``perm (side^2,)``: ``tokens[:, perm]`` lists raster tokens in Hilbert order (``side`` a power of two)."""
    if side < 1 or side & (side - 1):
        raise ValueError(f"the Hilbert order needs a grid side that is a power of two, got {side}; use order: raster")
    order = side.bit_length() - 1
    return torch.tensor([row * side + col for row, col in (hilbert_point(order, d) for d in range(side * side))])


def inverse_permutation(perm: torch.Tensor) -> torch.Tensor:
    """``inv`` with ``x[..., perm][..., inv] == x``."""
    inverse = torch.empty_like(perm)
    inverse[perm] = torch.arange(len(perm), device=perm.device)
    return inverse
