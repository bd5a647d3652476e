"""What attention costs in a network: FLOPs of the token-mixing operators alone (projections excluded)."""

from __future__ import annotations

from torch import nn

from ditlab.models.attention import Attention


def attention_operator_flops(network: nn.Module, num_tokens: int) -> int:
    """Forward FLOPs per image (``2 x`` MACs) of every attention operator in ``network`` at ``num_tokens``."""
    return 2 * sum(int(module.operator.macs(num_tokens, module.num_heads, module.head_dim))
                   for module in network.modules() if isinstance(module, Attention))  # fmt: skip
