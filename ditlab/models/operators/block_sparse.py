"""``block-sparse``: AdaSpa's head-adaptive block-sparse attention, searched at a few calls and reused.

Xia et al., "Training-free and Adaptive Sparse Attention for Efficient Long Video Generation" (AdaSpa, ICCV
2025, arXiv 2502.21079). Tokens are cut into blocks of ``block_size`` (raster order). At a *search* call the
operator runs dense attention, keeps each query's log-sum-exp ``LSE_i`` and sums the exact attention mass of
every (query block, key block) pair, ``M[b, c] = sum_{i in b, j in c} exp(q_i k_j / sqrt(d) - LSE_i)`` (so
``sum_c M[b, c] = |b|``); each query block of each head keeps its heaviest key blocks until they hold
``coverage`` of its mass (at most ``max_blocks``). Calls between searches reuse the kept blocks, computing
attention only over them; a search happens every ``search_every`` calls (each denoising step calls every block
once) and whenever the batch or grid changes. ``reset()`` forgets the pattern (a new trajectory).

    attention: block-sparse
    attention_options: {coverage: 0.9, block_size: 16, search_every: 10}   # optional: max_blocks
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ditlab.models.config import DiTConfig
from ditlab.models.operators.registry import check_options, register_operator

MASS_CHUNK_ELEMENTS = 1 << 24
"""Scores computed at once by the search (query rows are chunked to stay under it)."""


def block_mass(q: torch.Tensor, k: torch.Tensor, block_size: int) -> torch.Tensor:
    """``M (B, H, N/bs, N/bs)``: attention mass of each query block on each key block (rows sum to ``bs``)."""
    batch, heads, num_tokens, head_dim = q.shape
    blocks = num_tokens // block_size
    rows_per_chunk = max(block_size, MASS_CHUNK_ELEMENTS // max(1, batch * heads * num_tokens) // block_size * block_size)
    masses = []
    for start in range(0, num_tokens, rows_per_chunk):  # query rows in chunks: never the whole (N, N) at once
        scores = (q[:, :, start:start + rows_per_chunk] * head_dim**-0.5) @ k.transpose(-2, -1)
        probs = torch.exp(scores - torch.logsumexp(scores, dim=-1, keepdim=True))
        masses.append(probs.reshape(batch, heads, -1, block_size, blocks, block_size).sum(dim=(3, 5)))
    return torch.cat(masses, dim=2)


def covering_blocks(mass: torch.Tensor, coverage: float, block_size: int, max_blocks: int | None) -> torch.Tensor:
    """``keep (B, H, nb, nb)`` booleans: per query block the fewest heaviest key blocks holding ``coverage``."""
    order = mass.sort(dim=-1, descending=True)
    before = order.values.cumsum(dim=-1) - order.values  # mass of the blocks ranked above each one
    chosen = before < coverage * block_size if coverage < 1.0 else torch.ones_like(before, dtype=torch.bool)
    if max_blocks is not None:
        chosen[..., max_blocks:] = False
    keep = torch.zeros_like(chosen)
    return keep.scatter(-1, order.indices, chosen)


class BlockSparseAttention(nn.Module):
    """Attention over the key blocks a coverage search kept, per head and query block."""

    name = "block-sparse"

    def __init__(self, coverage: float = 0.9, block_size: int = 16, search_every: int = 10,
                 max_blocks: int | None = None) -> None:  # fmt: skip
        super().__init__()
        if not 0.0 < coverage <= 1.0:
            raise ValueError(f"attention_options.coverage={coverage} for 'block-sparse' must be in (0, 1]")
        for name, value in (("block_size", block_size), ("search_every", search_every)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"attention_options.{name}={value!r} for 'block-sparse' must be an integer >= 1")
        if max_blocks is not None and (not isinstance(max_blocks, int) or max_blocks < 1):
            raise ValueError(f"attention_options.max_blocks={max_blocks!r} for 'block-sparse' must be >= 1 or null")
        self.coverage, self.block_size, self.search_every, self.max_blocks = coverage, block_size, search_every, max_blocks
        self.reset()

    def reset(self) -> None:
        """Forget the kept blocks: the next call searches."""
        self.calls = 0
        self.keep: torch.Tensor | None = None
        self._shape: tuple | None = None

    def check_tokens(self, num_tokens: int) -> None:
        if num_tokens % self.block_size:
            raise ValueError(f"{num_tokens} tokens are not divisible by attention_options.block_size="
                             f"{self.block_size}; pick a block size that divides the token count")  # fmt: skip

    def search(self, q: torch.Tensor, k: torch.Tensor) -> None:
        mass = block_mass(q.detach(), k.detach(), self.block_size)
        self.keep = covering_blocks(mass, self.coverage, self.block_size, self.max_blocks)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        self.check_tokens(q.shape[2])
        shape = (tuple(q.shape), str(q.device))
        searching = self.keep is None or shape != self._shape or self.calls % self.search_every == 0
        self.calls += 1
        if searching:
            self.search(q, k)
            self._shape = shape
            return F.scaled_dot_product_attention(q, k, v)  # a search call is a dense call (AdaSpa)
        return self.sparse(q, k, v, self.keep)

    def sparse(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """Attention over the kept key blocks only: ``O(N x kept keys)``."""
        batch, heads, num_tokens, head_dim = q.shape
        bs, blocks = self.block_size, num_tokens // self.block_size
        counts = keep.sum(dim=-1)
        width = int(counts.max())
        index = keep.float().sort(dim=-1, descending=True, stable=True).indices[..., :width]  # kept blocks first
        valid = torch.arange(width, device=q.device) < counts.unsqueeze(-1)  # (B, H, nb, width)
        kb = k.reshape(batch, heads, blocks, bs, head_dim)
        vb = v.reshape(batch, heads, blocks, bs, head_dim)
        gather = index.reshape(batch, heads, blocks * width, 1, 1).expand(-1, -1, -1, bs, head_dim)
        keys = kb.gather(2, gather).reshape(batch, heads, blocks, width * bs, head_dim)
        values = vb.gather(2, gather).reshape(batch, heads, blocks, width * bs, head_dim)
        qb = q.reshape(batch, heads, blocks, bs, head_dim) * head_dim**-0.5
        scores = qb @ keys.transpose(-2, -1)  # (B, H, nb, bs, width * bs)
        mask = valid.repeat_interleave(bs, dim=-1).unsqueeze(-2)
        weights = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1)
        return (weights @ values).reshape(batch, heads, num_tokens, head_dim)

    def macs(self, num_tokens: int, num_heads: int, head_dim: int) -> int:
        """A reuse call with the last kept pattern (or, before any search, ``max_blocks`` / all blocks per query)."""
        self.check_tokens(num_tokens)
        blocks = num_tokens // self.block_size
        if self.keep is not None and self.keep.shape[-1] == blocks:
            kept = float(self.keep.float().sum(dim=-1).mean())
        else:
            kept = float(min(self.max_blocks or blocks, blocks))
        return int(2 * num_tokens * kept * self.block_size * num_heads * head_dim)

    def extra_repr(self) -> str:
        return f"coverage={self.coverage}, block_size={self.block_size}, search_every={self.search_every}"


def build_block_sparse(config: DiTConfig, options: dict[str, Any]) -> BlockSparseAttention:
    check_options("block-sparse", options, ("coverage", "block_size", "search_every", "max_blocks"))
    operator = BlockSparseAttention(**options)
    operator.check_tokens(config.num_tokens)
    return operator


register_operator("block-sparse", build_block_sparse)
