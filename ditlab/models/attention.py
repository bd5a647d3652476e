"""The attention component and the operators behind it.

:class:`Attention` owns the ``qkv`` and ``proj`` projections (named as in the public DiT code) and hands
the token mixing to an *operator*: a callable ``(q, k, v) -> out`` on ``(B, H, N, Dh)`` tensors. Full
softmax attention is the ``full`` kind. Another operator (local window, sparse, linear) is registered
as a new attention kind that builds ``Attention.from_config(config, operator)``, so grafting swaps the
operator and keeps the projections. An operator gives attention maps (HASTE aligns them) only if it has
``map(q, k) -> (B, H, N, N)`` with ``map @ v == operator(q, k, v)``; otherwise a map request is refused.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from ditlab.models.components import register_attention
from ditlab.models.config import DiTConfig
from ditlab.models.positions import rotary_positions


class AttentionOperator(Protocol):
    """Mixes tokens: ``q, k, v: (B, H, N, Dh) -> (B, H, N, Dh)``; ``macs`` counts the mixing per image."""

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor: ...

    def macs(self, num_tokens: int, num_heads: int, head_dim: int) -> int: ...


def attention_map(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """The explicit softmax map ``(B, H, N, N)``; only computed for blocks whose map is asked for."""
    scale = q.shape[-1] ** -0.5
    return torch.softmax((q * scale) @ k.transpose(-2, -1), dim=-1)


class FullAttention:
    """Softmax attention over all tokens through PyTorch's fused kernel."""

    name = "full"

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return F.scaled_dot_product_attention(q, k, v)

    def map(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        return attention_map(q, k)

    def macs(self, num_tokens: int, num_heads: int, head_dim: int) -> int:
        return 2 * num_tokens * num_tokens * num_heads * head_dim  # q k^T and attn v


full_attention = FullAttention()


class Attention(nn.Module):
    """Multi-head self-attention with a fused qkv projection (qkv bias on, as in DiT).

    The inner width is ``num_heads * head_dim`` (``qkv: (3 H Dh, D)``, ``proj: (D, H Dh)``); ``head_dim``
    defaults to ``dim // num_heads``. A different inner width is what width pruning (dropping heads) leaves.
    ``qk_norm`` puts a LayerNorm (``True``/``"layer"``, as timm's attention, which SiT/REPA use) or an RMSNorm
    (``"rms"``, SD3.5/FLUX) over each head's queries and keys; off, there are no norm parameters at all, so state
    dicts stay those of DiT. ``rope`` (``ditlab.models.positions``) rotates queries and keys after the norm (FLUX).
    """

    def __init__(self, dim: int, num_heads: int, operator: AttentionOperator = full_attention,
                 head_dim: int | None = None, qk_norm: bool | str = False, rope: nn.Module | None = None) -> None:  # fmt: skip
        super().__init__()
        if head_dim is None and dim % num_heads:
            raise ValueError(f"hidden size {dim} is not divisible by num_heads={num_heads}")
        if head_dim is not None and head_dim < 1:
            raise ValueError(f"head_dim={head_dim} must be a positive integer (or None for dim // num_heads)")
        self.num_heads = num_heads
        self.head_dim = head_dim or dim // num_heads
        inner = num_heads * self.head_dim
        self.qkv = nn.Linear(dim, 3 * inner)
        self.proj = nn.Linear(inner, dim)
        self.operator = operator
        self.q_norm, self.k_norm = head_norm(qk_norm, self.head_dim), head_norm(qk_norm, self.head_dim)
        self.rope = rope

    @classmethod
    def from_config(cls, config: DiTConfig, operator: AttentionOperator = full_attention) -> Attention:
        return cls(config.hidden_size, config.num_heads, operator, config.head_dim, config.qk_norm,
                   rotary_positions(config))  # fmt: skip

    def heads(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``tokens (B, N, D)`` -> normalised ``q, k, v (B, H, N, Dh)`` (not yet rotated)."""
        batch, length, _ = tokens.shape
        qkv = self.qkv(tokens).reshape(batch, length, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        return self.q_norm(q), self.k_norm(k), v

    def mix(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
            return_map: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:  # fmt: skip
        """Rotate (when the network uses rotary positions) and mix heads ``(B, H, S, Dh)`` with the operator;
        returns ``(B, S, H Dh)`` before the output projection and the map when asked for."""
        if self.rope is not None:
            q, k = self.rope(q), self.rope(k)
        if return_map:
            if not hasattr(self.operator, "map"):
                raise ValueError(f"the {self.operator_name!r} attention operator gives no attention maps; align maps "
                                 "of blocks with full attention, or give the operator a map(q, k) method")  # fmt: skip
            weights = self.operator.map(q, k)
            mixed = weights @ v
        else:
            weights = None
            mixed = self.operator(q, k, v)
        return mixed.transpose(1, 2).flatten(2), weights

    @property
    def operator_name(self) -> str:
        return getattr(self.operator, "name", type(self.operator).__name__)

    def forward(
        self, tokens: torch.Tensor, return_map: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``tokens: (B, N, D)`` -> ``(out: (B, N, D), map: (B, H, N, N) or None)``."""
        mixed, weights = self.mix(*self.heads(tokens), return_map)
        return self.proj(mixed), weights

    def macs(self, num_tokens: int) -> int:
        """Projections plus the operator's mixing, per image."""
        operator_macs = getattr(self.operator, "macs", None)
        if operator_macs is None:
            raise ValueError(f"the {self.operator_name!r} attention operator does not count its FLOPs; "
                             "give it a macs(num_tokens, num_heads, head_dim) method")  # fmt: skip
        projections = num_tokens * (self.qkv.weight.numel() + self.proj.weight.numel())
        return projections + int(operator_macs(num_tokens, self.num_heads, self.head_dim))


def head_norm(kind: bool | str, head_dim: int) -> nn.Module:
    """The per-head query/key norm ``qk_norm`` names (Identity when off)."""
    if kind in (True, "layer"):
        return nn.LayerNorm(head_dim, eps=1e-6)
    if kind == "rms":
        return nn.RMSNorm(head_dim, eps=1e-6)
    return nn.Identity()


@register_attention("full")
def full(config: DiTConfig) -> Attention:
    if config.attention_options:
        raise ValueError(f"full attention takes no attention_options (got {sorted(config.attention_options)})")
    return Attention.from_config(config)
