"""A bank of feed-forward experts stored as stacked weights, so that E experts are three (or two) tensors.

Stacking keeps a block's experts in one parameter per projection: FSDP2 shards them with their block, DDP
sees every expert's gradient even when it received no token (a zero-row matmul still enters the graph), and
an expert-parallel version would shard the leading ``E`` dimension. Two expert types:

- ``swiglu`` (DiT-MoE, Fei et al. 2024, feizc/DiT-MoE): ``down(silu(gate(h)) * up(h))``, no biases;
- ``gelu`` (DiT's own MLP): ``down(gelu_tanh(up(h) + b))``; the output bias lives once in the MoE layer, so a
  dense DiT MLP carved into experts keeps its exact sum (Dense2MoE, arXiv 2510.09094).

Weights use ``nn.Linear``'s layout: ``up``/``gate`` are ``(E, H, D)``, ``down`` is ``(E, D, H)``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

EXPERT_KINDS = ("swiglu", "gelu")


class ExpertBank(nn.Module):
    """``num_experts`` feed-forward experts of inner width ``hidden`` on tokens of width ``dim``."""

    def __init__(self, num_experts: int, dim: int, hidden: int, kind: str = "swiglu") -> None:
        super().__init__()
        if kind not in EXPERT_KINDS:
            raise ValueError(f"unknown expert type {kind!r}; choices: {list(EXPERT_KINDS)}")
        self.kind, self.num_experts, self.dim, self.hidden = kind, num_experts, dim, hidden
        self.up = nn.Parameter(torch.empty(num_experts, hidden, dim))
        self.down = nn.Parameter(torch.empty(num_experts, dim, hidden))
        if kind == "swiglu":
            self.gate = nn.Parameter(torch.empty(num_experts, hidden, dim))
        else:
            self.up_bias = nn.Parameter(torch.zeros(num_experts, hidden))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Xavier-uniform per expert, as DiT initialises its MLP linears; biases zero."""
        bound = math.sqrt(6.0 / (self.dim + self.hidden))
        for weight in self.projections():
            weight.uniform_(-bound, bound)
        if self.kind == "gelu":
            self.up_bias.zero_()

    def projections(self) -> list[nn.Parameter]:
        return [self.up, self.down, *([self.gate] if self.kind == "swiglu" else [])]

    def forward(self, expert: int, tokens: torch.Tensor) -> torch.Tensor:
        """Expert ``expert`` on ``tokens: (M, D)`` (any ``M``, zero included) -> ``(M, D)``."""
        if self.kind == "swiglu":
            inner = F.silu(F.linear(tokens, self.gate[expert])) * F.linear(tokens, self.up[expert])
        else:
            inner = F.gelu(F.linear(tokens, self.up[expert], self.up_bias[expert]), approximate="tanh")
        return F.linear(inner, self.down[expert])

    def parameters_per_expert(self) -> int:
        return sum(p.numel() // self.num_experts for p in self.parameters())  # global shapes, sharded or not

    def macs_per_token(self) -> int:
        """Multiply-accumulates of one expert on one token."""
        return sum(w.numel() // self.num_experts for w in self.projections())
