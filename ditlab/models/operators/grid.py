"""The token grid and the three ways a masked operator attends: gathered neighbours, a dense mask, flex.

DiT tokens are a square grid in raster order (token ``n`` is row ``n // W``, column ``n % W``). A local
operator is a set of key offsets per query: gathering those keys costs ``O(N K)`` and is exact, so it is the
CPU path; the dense boolean mask (``O(N^2)``) is the reference the tests compare against and the path when
the neighbourhood is most of the grid; on CUDA, ``torch.nn.attention.flex_attention`` runs the same mask as a
block mask that skips empty tiles. Masks and indices are cached per (grid, device), never reused across grids.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

QUERY_CHUNK_ELEMENTS = 1 << 22
"""Gathered keys per chunk of queries (``chunk x K x Dh`` per head): bounds the gather path's memory."""


def token_grid(num_tokens: int) -> tuple[int, int]:
    """``(H, W)`` of a square token grid with ``num_tokens`` tokens."""
    side = math.isqrt(num_tokens)
    if side * side != num_tokens:
        raise ValueError(f"{num_tokens} tokens are not a square grid; 2-D attention operators need a square one")
    return side, side


def grid_coordinates(height: int, width: int, device: torch.device | str | None = None) -> torch.Tensor:
    """``(N, 2)`` integer (row, column) of each token in raster order."""
    rows = torch.arange(height, device=device).repeat_interleave(width)
    cols = torch.arange(width, device=device).repeat(height)
    return torch.stack([rows, cols], dim=1)


def neighbour_index(offsets: list[tuple[int, int]], height: int, width: int,
                    device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """For 2-D ``offsets`` (drow, dcol): ``index (N, K)`` of each query's keys and ``valid (N, K)`` (inside the grid)."""
    coords = grid_coordinates(height, width, device)
    delta = torch.tensor(offsets, device=device, dtype=coords.dtype).view(1, -1, 2)
    keys = coords.unsqueeze(1) + delta
    valid = (keys[..., 0] >= 0) & (keys[..., 0] < height) & (keys[..., 1] >= 0) & (keys[..., 1] < width)
    index = (keys[..., 0].clamp(0, height - 1) * width + keys[..., 1].clamp(0, width - 1)).long()
    return index, valid


def raster_index(window: int, num_tokens: int,
                 device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """1-D raster neighbours ``|n_q - n_k| <= window``: ``index (N, K)`` and ``valid (N, K)``."""
    positions = torch.arange(num_tokens, device=device).view(-1, 1)
    keys = positions + torch.arange(-window, window + 1, device=device).view(1, -1)
    valid = (keys >= 0) & (keys < num_tokens)
    return keys.clamp(0, num_tokens - 1), valid


def dense_mask(index: torch.Tensor, valid: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """The ``(N, N)`` boolean mask (True = attend) that a neighbour index describes."""
    mask = torch.zeros(index.shape[0], num_tokens, dtype=torch.bool, device=index.device)
    rows = torch.arange(index.shape[0], device=index.device).view(-1, 1).expand_as(index)
    mask[rows[valid], index[valid]] = True
    return mask


def masked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
                     extra_k: torch.Tensor | None = None, extra_v: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
    """Softmax attention of ``q, k, v (B, H, N, Dh)`` under ``mask (N, N)``; every query also sees ``extra_k/v
    (B, H, M, Dh)`` when given (pooled global tokens). Exact, ``O(N^2)``."""
    if extra_k is not None:
        k, v = torch.cat([k, extra_k], dim=2), torch.cat([v, extra_v], dim=2)
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], extra_k.shape[2])], dim=1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def gathered_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, index: torch.Tensor, valid: torch.Tensor,
                       extra_k: torch.Tensor | None = None, extra_v: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
    """The same attention as :func:`masked_attention` for a neighbour ``index / valid (N, K)``, in ``O(N K)``:
    each query's keys are gathered, so nothing outside its neighbourhood is computed."""
    batch, heads, num_tokens, head_dim = q.shape
    scale = head_dim**-0.5
    chunk = max(1, QUERY_CHUNK_ELEMENTS // max(1, index.shape[1] * head_dim * batch * heads))
    outputs = []
    for start in range(0, num_tokens, chunk):
        rows = slice(start, start + chunk)
        keys, values = k[:, :, index[rows]], v[:, :, index[rows]]  # (B, H, c, K, Dh)
        scores = torch.einsum("bhnd,bhnkd->bhnk", q[:, :, rows] * scale, keys)
        scores = scores.masked_fill(~valid[rows], float("-inf"))
        if extra_k is not None:
            scores = torch.cat([scores, (q[:, :, rows] * scale) @ extra_k.transpose(-2, -1)], dim=-1)
        weights = torch.softmax(scores, dim=-1)
        local = weights[..., : index.shape[1]]
        out = torch.einsum("bhnk,bhnkd->bhnd", local, values)
        if extra_k is not None:
            out = out + weights[..., index.shape[1]:] @ extra_v
        outputs.append(out)
    return torch.cat(outputs, dim=2)


def flex_available(device: torch.device) -> bool:
    """flex_attention block masks are used on CUDA when this PyTorch has them."""
    if device.type != "cuda":
        return False
    try:
        from torch.nn.attention.flex_attention import flex_attention  # noqa: F401
    except ImportError:
        return False
    return True


_FLEX = None


def flex_attention_call(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_mask) -> torch.Tensor:
    """flex_attention: compiled once per process on CUDA (its fused kernel skips empty tiles); eager elsewhere,
    where it materialises the scores and has no backward on CPU (``kernel: flex`` there is for checking only)."""
    global _FLEX
    from torch.nn.attention.flex_attention import flex_attention

    if q.device.type != "cuda":
        return flex_attention(q, k, v, block_mask=block_mask)
    if _FLEX is None:
        _FLEX = torch.compile(flex_attention, dynamic=False)
    return _FLEX(q, k, v, block_mask=block_mask)


def flex_block_mask(mask: torch.Tensor, extra: int = 0):
    """A flex_attention ``BlockMask`` of a dense ``mask (N, N)``; keys past ``N`` (``extra`` pooled tokens) are
    always visible."""
    from torch.nn.attention.flex_attention import create_block_mask

    num_tokens = mask.shape[0]
    full = torch.cat([mask, mask.new_ones(num_tokens, extra)], dim=1) if extra else mask

    def allowed(batch, head, query, key):
        return full[query, key]

    return create_block_mask(allowed, None, None, num_tokens, num_tokens + extra, device=mask.device)
