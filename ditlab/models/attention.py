"""Attention operators behind one interface.

A DiT block owns an :class:`Attention` module (the ``qkv`` and ``proj`` projections, named as in the
public DiT code) and delegates the token mixing to an *operator*: a callable ``(q, k, v) -> out`` on
``(B, heads, N, head_dim)`` tensors. Full attention is the default; later operators (local window,
linear) implement the same call so that attention grafting swaps the operator, never the block.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn


class AttentionOperator(Protocol):
    """Mixes tokens: ``q, k, v: (B, H, N, Dh) -> (B, H, N, Dh)``."""

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor: ...


def full_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Softmax attention over all tokens through PyTorch's fused kernel."""
    return F.scaled_dot_product_attention(q, k, v)


def attention_map(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """The explicit softmax map ``(B, H, N, N)``; only computed for blocks whose map is asked for."""
    scale = q.shape[-1] ** -0.5
    return torch.softmax((q * scale) @ k.transpose(-2, -1), dim=-1)


OPERATORS: dict[str, AttentionOperator] = {"full": full_attention}


class Attention(nn.Module):
    """Multi-head self-attention with a fused qkv projection (qkv bias on, as in DiT).

    The inner width is ``num_heads * head_dim`` (``qkv: (3 H Dh, D)``, ``proj: (D, H Dh)``); ``head_dim``
    defaults to ``dim // num_heads``. A different inner width is what width pruning (dropping heads) leaves.
    """

    def __init__(self, dim: int, num_heads: int, operator: str = "full", head_dim: int | None = None) -> None:
        super().__init__()
        if head_dim is None and dim % num_heads:
            raise ValueError(f"hidden size {dim} is not divisible by num_heads={num_heads}")
        if head_dim is not None and head_dim < 1:
            raise ValueError(f"head_dim={head_dim} must be a positive integer (or None for dim // num_heads)")
        if operator not in OPERATORS:
            raise ValueError(f"unknown attention operator {operator!r}; choices: {sorted(OPERATORS)}")
        self.num_heads = num_heads
        self.head_dim = head_dim or dim // num_heads
        inner = num_heads * self.head_dim
        self.qkv = nn.Linear(dim, 3 * inner)
        self.proj = nn.Linear(inner, dim)
        self.operator_name = operator

    def forward(
        self, tokens: torch.Tensor, return_map: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``tokens: (B, N, D)`` -> ``(out: (B, N, D), map: (B, H, N, N) or None)``."""
        batch, length, _ = tokens.shape
        qkv = self.qkv(tokens).reshape(batch, length, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        if return_map:
            weights = attention_map(q, k)
            mixed = weights @ v
        else:
            weights = None
            mixed = OPERATORS[self.operator_name](q, k, v)
        out = mixed.transpose(1, 2).reshape(batch, length, self.num_heads * self.head_dim)
        return self.proj(out), weights
