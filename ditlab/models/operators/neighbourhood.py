"""Shared machinery of operators where each query sees a fixed neighbourhood of keys (``local``, ``window``)."""

from __future__ import annotations

import torch
from torch import nn

from ditlab.models.attention import attention_map
from ditlab.models.operators.grid import (
    dense_mask,
    flex_attention_call,
    flex_available,
    flex_block_mask,
    gathered_attention,
    masked_attention,
)

KERNELS = ("auto", "gather", "dense", "flex")
DENSE_UP_TO = 1024
"""Token counts up to which ``auto`` uses the dense mask on CPU (measured faster there than gathering)."""


def check_kernel(kind: str, kernel: str) -> str:
    if kernel not in KERNELS:
        raise ValueError(f"attention_options.kernel={kernel!r} for {kind!r}; choices: {list(KERNELS)}")
    return kernel


class NeighbourhoodOperator(nn.Module):
    """Softmax attention of each query over its neighbourhood, plus optional global tokens for every query.

    Subclasses give :meth:`neighbours` (per grid) and may give :meth:`global_tokens`. ``kernel`` picks the
    path: ``gather`` (``O(N K)``, exact, the CPU default), ``dense`` (an ``(N, N)`` mask), ``flex`` (CUDA block
    masks), ``auto`` (flex on CUDA; else dense up to ``DENSE_UP_TO`` tokens or when the neighbourhood covers most
    of the grid, gather beyond).
    """

    name = "neighbourhood"

    def __init__(self, kernel: str = "auto") -> None:
        super().__init__()
        self.kernel = check_kernel(self.name, kernel)
        self._index: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
        self._masks: dict[tuple, torch.Tensor] = {}
        self._block_masks: dict[tuple, object] = {}

    # ---------------------------------------------------------------------------------- what a subclass says
    def neighbours(self, num_tokens: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """``index (N, K)`` and ``valid (N, K)`` of each query's keys."""
        raise NotImplementedError

    def global_tokens(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Keys and values every query also sees ``(B, H, M, Dh)``, or None."""
        return None

    def global_count(self, num_tokens: int) -> int:
        return 0

    # ---------------------------------------------------------------------------------- cached per grid
    def index(self, num_tokens: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        key = (num_tokens, str(device))
        if key not in self._index:
            self._index[key] = self.neighbours(num_tokens, device)
        return self._index[key]

    def mask(self, num_tokens: int, device: torch.device) -> torch.Tensor:
        """The ``(N, N)`` boolean mask (True = attend) over image tokens."""
        key = (num_tokens, str(device))
        if key not in self._masks:
            self._masks[key] = dense_mask(*self.index(num_tokens, device), num_tokens)
        return self._masks[key]

    def key_counts(self, num_tokens: int) -> torch.Tensor:
        """Image keys each query attends ``(N,)`` (global tokens not included)."""
        return self.index(num_tokens, torch.device("cpu"))[1].sum(dim=1)

    # ---------------------------------------------------------------------------------- the operator
    def path(self, num_tokens: int, device: torch.device) -> str:
        if self.kernel != "auto":
            return self.kernel
        if flex_available(device):
            return "flex"
        if num_tokens <= DENSE_UP_TO or self.index(num_tokens, device)[0].shape[1] >= num_tokens // 2:
            return "dense"  # a fused masked kernel beats gathering on small grids or wide neighbourhoods
        return "gather"

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        num_tokens = q.shape[2]
        extra = self.global_tokens(k, v)
        extra_k, extra_v = extra if extra is not None else (None, None)
        path = self.path(num_tokens, q.device)
        if path == "gather":
            return gathered_attention(q, k, v, *self.index(num_tokens, q.device), extra_k, extra_v)
        if path == "dense":
            return masked_attention(q, k, v, self.mask(num_tokens, q.device), extra_k, extra_v)
        key = (num_tokens, str(q.device))
        if key not in self._block_masks:
            self._block_masks[key] = flex_block_mask(self.mask(num_tokens, q.device), self.global_count(num_tokens))
        if extra is not None:
            k, v = torch.cat([k, extra_k], dim=2), torch.cat([v, extra_v], dim=2)
        return flex_attention_call(q, k, v, self._block_masks[key])

    def map(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """The ``(B, H, N, N)`` map over image keys; only without global tokens (their values are not ``v``)."""
        if self.global_count(q.shape[2]):
            raise ValueError(f"the {self.name!r} operator with pooled tokens gives no (N, N) attention map")
        mask = self.mask(q.shape[2], q.device)
        scores = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)
        return torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1)

    def macs(self, num_tokens: int, num_heads: int, head_dim: int) -> int:
        """``q k^T`` and ``attn v`` over the attended pairs (borders clipped), plus the global tokens."""
        pairs = int(self.key_counts(num_tokens).sum()) + num_tokens * self.global_count(num_tokens)
        return 2 * pairs * num_heads * head_dim


__all__ = ["NeighbourhoodOperator", "attention_map", "check_kernel"]
