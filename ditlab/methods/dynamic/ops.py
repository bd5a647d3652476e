"""Masked and sliced forms of a block's attention and MLP, over the weights of the plain components.

Dynamic-compute methods train with *masks* (every head, channel and token computed, the switched-off ones
multiplied by 0, so gradients reach the routers) and run with *slices* (only the kept heads, channel groups
and tokens are computed). The public DyDiT and Elastic-DiT code keeps the masks at inference, so its FLOPs
savings never reach wall time; here both forms share the block's own ``Attention`` / ``DenseMLP`` weights and
the tests check that they agree. The masked forms restate ``Attention.forward`` / ``DenseMLP.forward`` op for op,
so an all-ones mask is bitwise the plain component (per-head q/k norms and rotary positions included, as
``Attention.heads`` and ``Attention.mix`` apply them).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ditlab.models.attention import Attention
from ditlab.models.mlp import DenseMLP


def check_plain_components(block: nn.Module, index: int, method: str) -> None:
    """Dynamic width slices the ``full`` attention and ``dense`` MLP weights; other kinds are refused by name."""
    if not isinstance(block.attn, Attention) or not isinstance(block.mlp, DenseMLP):
        raise ValueError(f"{method} needs the full attention and dense MLP in every block; block {index} has "
                         f"{type(block.attn).__name__} / {type(block.mlp).__name__}")  # fmt: skip


def attention(attn: Attention, tokens: torch.Tensor, head_mask: torch.Tensor | None = None,
              key_mask: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
    """``Attention.forward`` with per-head outputs multiplied by ``head_mask: (B, H)`` before the projection
    and keys restricted to ``key_mask: (B, N)`` (True = a real token; the padded-sequence fallback)."""
    batch, length, _ = tokens.shape
    qkv = attn.qkv(tokens).reshape(batch, length, 3, attn.num_heads, attn.head_dim)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    if attn.rope is not None:
        q, k = attn.rope(q), attn.rope(k)
    if key_mask is None:
        mixed = attn.operator(q, k, v)
    else:
        mixed = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask[:, None, None, :])
    if head_mask is not None:
        mixed = mixed * head_mask[:, :, None, None].to(mixed.dtype)
    out = mixed.transpose(1, 2).reshape(batch, length, attn.num_heads * attn.head_dim)
    return attn.proj(out)


def mlp(module: DenseMLP, tokens: torch.Tensor, channel_mask: torch.Tensor | None = None,
        before_act: bool = False) -> torch.Tensor:  # fmt: skip
    """``DenseMLP.forward`` with the hidden units multiplied by ``channel_mask: (B, hidden)``: after the activation,
    or on ``fc1``'s output before it (``before_act``, DyDiT's reference). The forward values agree (the activation
    is 0 at 0), the straight-through gradient into the mask does not: ``act'(0) h`` or ``act'(h) h`` against
    ``act(h)``."""
    hidden = module.fc1(tokens)
    if channel_mask is not None and before_act:
        hidden = hidden * channel_mask[:, None, :].to(hidden.dtype)
    hidden = module.act(hidden)
    if channel_mask is not None and not before_act:
        hidden = hidden * channel_mask[:, None, :].to(hidden.dtype)
    return module.fc2(hidden)


def expand_groups(group_mask: torch.Tensor, width: int) -> torch.Tensor:
    """``(B, G)`` group mask -> ``(B, width)`` channel mask (group ``g`` owns channels ``g*width/G ..``)."""
    return group_mask.repeat_interleave(width // group_mask.shape[1], dim=1)


def head_rows(attn: Attention, heads: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of ``qkv.weight`` and columns of ``proj.weight`` that belong to ``heads`` (sorted indices)."""
    dh, total = attn.head_dim, attn.num_heads * attn.head_dim
    within = torch.arange(dh, device=heads.device)
    columns = (heads[:, None] * dh + within[None]).reshape(-1)
    rows = (torch.arange(3, device=heads.device)[:, None] * total + columns[None]).reshape(-1)
    return rows, columns


class SlicedAttention:
    """The attention of a fixed head subset: ``qkv`` rows and ``proj`` columns cut once, then reused."""

    def __init__(self, attn: Attention, heads: torch.Tensor) -> None:
        rows, columns = head_rows(attn, heads)
        self.num_heads, self.head_dim, self.operator = len(heads), attn.head_dim, attn.operator
        self.q_norm, self.k_norm, self.rope = attn.q_norm, attn.k_norm, attn.rope  # per head: they slice with it
        self.qkv_weight, self.qkv_bias = attn.qkv.weight[rows].detach(), attn.qkv.bias[rows].detach()
        self.proj_weight, self.proj_bias = attn.proj.weight[:, columns].detach(), attn.proj.bias.detach()

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        batch, length, _ = tokens.shape
        qkv = F.linear(tokens, self.qkv_weight, self.qkv_bias).reshape(batch, length, 3, self.num_heads,
                                                                        self.head_dim)  # fmt: skip
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        if self.rope is not None:
            q, k = self.rope(q), self.rope(k)
        mixed = self.operator(q, k, v).transpose(1, 2).reshape(batch, length, self.num_heads * self.head_dim)
        return F.linear(mixed, self.proj_weight, self.proj_bias)


class SlicedMLP:
    """The MLP of a fixed channel subset: ``fc1`` rows and ``fc2`` columns cut once, then reused."""

    def __init__(self, module: DenseMLP, channels: torch.Tensor) -> None:
        self.act = module.act
        self.fc1_weight, self.fc1_bias = module.fc1.weight[channels].detach(), module.fc1.bias[channels].detach()
        self.fc2_weight, self.fc2_bias = module.fc2.weight[:, channels].detach(), module.fc2.bias.detach()

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        return F.linear(self.act(F.linear(tokens, self.fc1_weight, self.fc1_bias)), self.fc2_weight, self.fc2_bias)


def gather_tokens(tokens: torch.Tensor, keep: torch.Tensor, fn) -> torch.Tensor:
    """``fn`` on the kept tokens only (``keep: (B, N)`` bool), zeros elsewhere: a per-token branch with token
    skipping, batch rows flattened so samples keeping different counts cost what they keep."""
    batch, length, width = tokens.shape
    flat_keep = keep.reshape(-1)
    if bool(flat_keep.all()):
        return fn(tokens)
    index = flat_keep.nonzero().squeeze(1)
    kept = fn(tokens.reshape(batch * length, width).index_select(0, index).unsqueeze(0)).squeeze(0)
    out = kept.new_zeros(batch * length, kept.shape[-1])
    return out.index_copy(0, index, kept).reshape(batch, length, -1)


def weights_version(*modules: nn.Module) -> tuple[int, ...]:
    """Changes whenever a weight of ``modules`` is written in place (an optimiser or EMA step, a load), so
    cached slices are cut again."""
    return tuple((p.data_ptr(), p._version) for m in modules for p in m.parameters())
