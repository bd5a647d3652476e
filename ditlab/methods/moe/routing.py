"""Routers: which experts process which tokens, with what weight, and the losses that keep them balanced.

Both routings return one :class:`Routing`, a flat list of (token, expert, weight) assignments sorted by expert,
so a single dropless dispatch serves training and evaluation (DiT-MoE's public code keeps two paths that
must agree, feizc/DiT-MoE issue #3):

- ``token_choice`` (DiT-MoE; Switch/GShard): each token takes its top-K experts of ``softmax(W_g h)``;
  exactly K contributions per token, none dropped;
- ``expert_choice`` (Zhou et al. 2022; EC-DiT, arXiv 2410.02098): each expert takes its top-C tokens of each
  image, ``C = ceil(capacity_factor * N * K / E)``; balanced by construction, a token gets 0..E experts.
  [interp] the pool is one image's tokens, so a sample does not depend on what else is in the batch.

Gates (the weight of an assignment): ``softmax`` (DiT-MoE: the raw probability), ``normalized`` (top-K
probabilities renormalised to sum 1) and ``straight_through`` [interp] (value 1, gradient of the probability:
a carved or upcycled network starts as the sum of its selected experts, and the router still learns).

Balance loss (DiT-MoE, after Switch/DeepSeekMoE), per layer over N tokens:
``f_i = E / (N K) * #{assignments to i}``, ``P_i = mean_tokens s_i``, ``L = alpha * sum_i f_i P_i``: alpha
under uniform routing, ``alpha * E / K`` when every token goes to the same K experts; only ``P`` carries
gradient. Router z-loss (ST-MoE, Zoph et al. 2022): ``mean logsumexp(logits)^2``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist

ROUTINGS = ("token_choice", "expert_choice")
GATES = ("softmax", "normalized", "straight_through")
BALANCE_SCOPES = ("device", "global", "sequence")


@dataclass
class Routing:
    """Assignments of flattened tokens ``(T = B N)`` to experts, sorted by expert."""

    token: torch.Tensor
    """``(A,)`` row of each assignment in the flattened ``(T, D)`` tokens."""
    weight: torch.Tensor
    """``(A,)`` gate of each assignment."""
    counts: torch.Tensor
    """``(E,)`` assignments per expert (the rows of ``token`` belonging to expert 0, 1, ... in order)."""
    probs: torch.Tensor
    """``(B, N, E)`` router probabilities."""
    logits: torch.Tensor
    """``(B, N, E)`` router logits."""
    topk: torch.Tensor | None = None
    """``(B, N, K)`` experts each token chose (token choice only)."""


def gate_values(probs: torch.Tensor, gate: str) -> torch.Tensor:
    """Gates of chosen probabilities ``(..., K)``; ``normalized`` sums them to 1 along the last dimension."""
    if gate == "softmax":
        return probs
    if gate == "normalized":
        return probs / probs.sum(-1, keepdim=True).clamp_min(1e-20)
    if gate == "straight_through":
        return (probs - probs.detach()) + 1.0  # exactly 1: the difference is exactly 0
    raise ValueError(f"unknown gate {gate!r}; choices: {list(GATES)}")


def token_choice(logits: torch.Tensor, top_k: int, gate: str = "softmax") -> Routing:
    """Each token of ``logits: (B, N, E)`` goes to its ``top_k`` most probable experts."""
    num_experts = logits.shape[-1]
    probs = logits.float().softmax(-1)
    chosen, experts = probs.topk(top_k, dim=-1)  # (B, N, K)
    weights = gate_values(chosen, gate)
    flat = experts.reshape(-1)
    order = flat.argsort(stable=True)
    return Routing(token=order // top_k, weight=weights.reshape(-1)[order],
                   counts=torch.bincount(flat, minlength=num_experts), probs=probs, logits=logits,
                   topk=experts)  # fmt: skip


def expert_capacity(num_tokens: int, num_experts: int, top_k: int, capacity_factor: float) -> int:
    """Tokens per expert and image under expert choice: ``ceil(capacity_factor * N * K / E)``, at most N."""
    return max(1, min(num_tokens, math.ceil(capacity_factor * num_tokens * top_k / num_experts)))


def expert_choice(logits: torch.Tensor, capacity: int, gate: str = "softmax") -> Routing:
    """Each expert takes the ``capacity`` tokens of each image (``logits: (B, N, E)``) that score it highest."""
    batch, num_tokens, num_experts = logits.shape
    probs = logits.float().softmax(-1)
    chosen, positions = probs.transpose(1, 2).topk(capacity, dim=-1)  # (B, E, C)
    weights = gate_values(chosen, gate)
    rows = positions + torch.arange(batch, device=logits.device)[:, None, None] * num_tokens
    return Routing(token=rows.transpose(0, 1).reshape(-1), weight=weights.transpose(0, 1).reshape(-1),
                   counts=torch.full((num_experts,), batch * capacity, device=logits.device), probs=probs,
                   logits=logits)  # fmt: skip


def balance_loss(probs: torch.Tensor, topk: torch.Tensor, num_experts: int, alpha: float = 0.01,
                 scope: str = "device") -> torch.Tensor:  # fmt: skip
    """``alpha * sum_i f_i P_i`` for ``probs: (B, N, E)`` and the chosen experts ``topk: (B, N, K)``.

    ``scope``: ``device`` (all tokens here, DiT-MoE), ``global`` (assignment counts summed over processes,
    so ``f`` is the global batch's) or ``sequence`` (per image, then averaged).
    """
    if scope not in BALANCE_SCOPES:
        raise ValueError(f"unknown balance scope {scope!r}; choices: {list(BALANCE_SCOPES)}")
    top_k = topk.shape[-1]
    if scope == "sequence":
        counts = torch.zeros(*topk.shape[:-2], num_experts, device=probs.device)
        counts.scatter_add_(-1, topk.flatten(-2), torch.ones_like(topk.flatten(-2), dtype=counts.dtype))
        fraction = counts * num_experts / (topk.shape[-2] * top_k)
        return alpha * (fraction * probs.mean(-2)).sum(-1).mean()
    counts = torch.bincount(topk.reshape(-1), minlength=num_experts).float()
    local_tokens = topk[..., 0].numel()
    num_tokens = torch.tensor(float(local_tokens), device=probs.device)
    if scope == "global" and dist.is_available() and dist.is_initialized():  # every process calls, tokens or not
        dist.all_reduce(counts)
        dist.all_reduce(num_tokens)
    fraction = counts * num_experts / (num_tokens.clamp_min(1) * top_k)
    mean_probs = probs.reshape(-1, num_experts).sum(0) / max(local_tokens, 1)  # no token (a skipped block): zero
    return alpha * (fraction * mean_probs).sum()


def router_z_loss(logits: torch.Tensor) -> torch.Tensor:
    """ST-MoE's z-loss: the mean squared log-partition of the router logits ``(..., E)``."""
    squares = torch.logsumexp(logits.float(), dim=-1).square()
    return squares.sum() / max(squares.numel(), 1)
