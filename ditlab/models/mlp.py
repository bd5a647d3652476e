"""The ``dense`` feed-forward component: DiT's two-layer GELU(tanh) MLP.

Parameter names (``mlp.fc1``, ``mlp.fc2``) are the public DiT checkpoints', so they load with no renaming.
"""

from __future__ import annotations

import torch
from torch import nn

from ditlab.models.components import register_mlp
from ditlab.models.config import DiTConfig


class DenseMLP(nn.Module):
    """``tokens (B, N, D) -> fc2(gelu(fc1(tokens)))`` with inner width ``hidden``."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(tokens)))

    def macs(self, num_tokens: int) -> int:
        return num_tokens * (self.fc1.weight.numel() + self.fc2.weight.numel())


@register_mlp("dense")
def dense_mlp(config: DiTConfig) -> DenseMLP:
    if config.mlp_options:
        raise ValueError(f"the dense MLP takes no mlp_options (got {sorted(config.mlp_options)}); "
                         "its width is mlp_ratio or mlp_hidden")  # fmt: skip
    return DenseMLP(config.hidden_size, config.mlp_width)
