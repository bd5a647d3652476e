"""The alignment family's heads and losses, as plain functions on tensors (no Lightning, no state).

Shapes: DiT tokens ``(B, N, D)``, encoder features ``(B, N, F)``, attention maps ``(B, H, N, N)`` whose rows
sum to 1, times ``t: (B,)`` in ditlab's convention (0 = data, 1 = noise).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ditlab.diffusion.gaussian import mean_flat


def mlp(in_dim: int, hidden: int, out_dim: int, layers: int = 3) -> nn.Sequential:
    """``layers`` linear maps ``in -> hidden -> ... -> out`` with SiLU between (REPA's projector at 3), Xavier init."""
    if layers < 1:
        raise ValueError(f"a projector needs at least 1 linear layer, got {layers}")
    widths = [in_dim, *([hidden] * (layers - 1)), out_dim]
    modules: list[nn.Module] = []
    for index, (fan_in, fan_out) in enumerate(zip(widths[:-1], widths[1:])):
        if index:
            modules.append(nn.SiLU())
        linear = nn.Linear(fan_in, fan_out)
        nn.init.xavier_uniform_(linear.weight)
        nn.init.zeros_(linear.bias)
        modules.append(linear)
    return nn.Sequential(*modules)


class ConvProjector(nn.Module):
    """iREPA's projector: one 3x3 convolution over the square token grid, ``(B, N, D) -> (B, N, F)``.

    Unlike the per-token MLP it mixes each token with its neighbours, so the projection keeps spatial structure.
    """

    def __init__(self, in_dim: int, out_dim: int, kernel_size: int = 3) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_dim, out_dim, kernel_size, padding=kernel_size // 2)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        batch, count, dim = tokens.shape
        grid = math.isqrt(count)
        if grid * grid != count:
            raise ValueError(f"the conv projector needs a square token grid, got {count} tokens")
        planes = tokens.transpose(1, 2).reshape(batch, dim, grid, grid)
        return self.conv(planes).flatten(2).transpose(1, 2)


def projector(kind: str, in_dim: int, hidden: int, out_dim: int, layers: int = 3) -> nn.Module:
    """REPA's MLP (``mlp``) or iREPA's convolution (``conv``) from DiT tokens to encoder features."""
    if kind == "mlp":
        return mlp(in_dim, hidden, out_dim, layers)
    if kind == "conv":
        return ConvProjector(in_dim, out_dim)
    raise ValueError(f"unknown projector {kind!r}; choices: ['mlp', 'conv']")


def spatial_normalize(features: torch.Tensor, gamma: float = 1.0, eps: float = 1e-6) -> torch.Tensor:
    """iREPA's target normalisation over the token axis of ``(B, N, F)``: ``(z - gamma mean_N z) / std_N z``.

    Removing the (shared) global component leaves the contrast between patches, the spatial structure.
    """
    centred = features.float() - gamma * features.float().mean(dim=1, keepdim=True)
    return centred / (features.float().std(dim=1, keepdim=True) + eps)


def negative_cosine(predicted: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """REPA's ``-mean_{b,n} cos(pred_bn, target_bn)`` for ``(B, N, F)`` tensors; normalised in fp32 (REPA #46)."""
    if predicted.shape != target.shape:
        raise ValueError(f"projected DiT tokens {tuple(predicted.shape)} and encoder features {tuple(target.shape)} "
                         "differ; the token grids and feature widths must match")  # fmt: skip
    predicted = F.normalize(predicted.float(), dim=-1)
    target = F.normalize(target.float(), dim=-1)
    return -(predicted * target).sum(-1).mean()


def map_heads(student: torch.Tensor, teacher: torch.Tensor, heads: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Pair heads: ``first`` keeps the student's first ``H_teacher`` heads, ``mean`` averages both sides."""
    if heads == "mean":
        return student.mean(1, keepdim=True), teacher.mean(1, keepdim=True)
    if heads != "first":
        raise ValueError(f"unknown head mapping {heads!r}; choices: ['first', 'mean']")
    if student.shape[1] < teacher.shape[1]:
        raise ValueError(f"the DiT has {student.shape[1]} heads but the encoder {teacher.shape[1]}; "
                         "use attention.heads=mean, or a DiT with at least as many heads")  # fmt: skip
    return student[:, : teacher.shape[1]], teacher


def attention_loss(
    student: torch.Tensor, teacher: torch.Tensor, kind: str = "ce", heads: str = "first"
) -> torch.Tensor:
    """HASTE's row-wise ``-sum_key p_T log p_S`` (``ce``) or KL, averaged over batch, heads and queries.

    ``student: (B, H_S, N, N)`` and ``teacher: (B, H_T, N, N)`` are softmax maps (rows sum to 1).
    """
    student, teacher = map_heads(student, teacher, heads)
    if student.shape[-2:] != teacher.shape[-2:]:
        raise ValueError(f"DiT attention maps {tuple(student.shape)} and encoder maps {tuple(teacher.shape)} "
                         "cover different token grids")  # fmt: skip
    teacher = teacher.float()
    log_student = torch.log(student.float().clamp_min(1e-30))
    cross = -(teacher * log_student).sum(-1)
    if kind == "kl":
        cross = cross + torch.xlogy(teacher, teacher).sum(-1)
    elif kind != "ce":
        raise ValueError(f"unknown attention loss {kind!r}; choices: ['ce', 'kl']")
    return cross.mean()


def time_mask(t: torch.Tensor, t_range: tuple[float, float]) -> torch.Tensor:
    """``(B,)`` float: 1 where ``low <= t <= high``."""
    low, high = t_range
    return ((t >= low) & (t <= high)).float()


def masked_error(predicted: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``mean_b mask_b * mean(|pred_b - target_b|^2)``: masked samples still count in the batch mean."""
    return (mask * mean_flat((predicted.float() - target.float()) ** 2)).mean()


def masked_negative_cosine(predicted: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Negative token-wise cosine ``(B, N, F)``, per sample times ``mask: (B,)``, batch mean."""
    cosine = (F.normalize(predicted.float(), dim=-1) * F.normalize(target.float(), dim=-1)).sum(-1).mean(-1)
    return -(mask * cosine).mean()


def guided(conditional: torch.Tensor, unconditional: torch.Tensor, scale: float) -> torch.Tensor:
    """Feature-space classifier-free guidance ``f_u + w (f_c - f_u)`` (Self-Transcendence)."""
    return unconditional + scale * (conditional - unconditional)


def velocity_to_x0(objective, xt: torch.Tensor, velocity: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``x0_hat`` from a velocity and ``x_t = a x0 + s eps``: ``(s' x_t - s v) / (a s' - s a')``.

    For the linear path that is ``x_t - t v``, so ``|x0_hat - x0|^2 = t^2 |v - v_true|^2``.
    """
    a, s, da, ds = (c.view(-1, *([1] * (xt.ndim - 1))).to(xt.dtype) for c in objective.coefficients(t))
    return (ds * xt - s * velocity) / (a * ds - s * da)


class CleanHead(nn.Module):
    """Self-Transcendence phase 1: tokens ``(B, N, D)`` -> MLP(D, hidden, ..., D) -> LayerNorm -> patches.

    The MLP has ``layers`` linear maps (the released code uses REPA's three-layer MLP); the caller unpatchifies.
    """

    def __init__(self, hidden_size: int, hidden: int, patch_size: int, channels: int, layers: int = 3) -> None:
        super().__init__()
        self.mlp = mlp(hidden_size, hidden, hidden_size, layers=layers)
        self.norm = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * channels)
        nn.init.xavier_uniform_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """``(B, N, D) -> (B, N, p*p*C)``; the caller unpatchifies."""
        return self.linear(self.norm(self.mlp(tokens)))
