"""Helpers shared by the dynamic-compute tests: a tiny DiT made dynamic, router states drawn at random, and an
attention operator whose FLOPs ``FlopCounterMode`` can see (the fused CPU kernel hides them)."""

from __future__ import annotations

import pytest
import torch

from ditlab.models.attention import FullAttention, attention_map
from ditlab.models.dit import DiT


def make_dynamic(plain: DiT, trunk: str, **options) -> DiT:
    """``plain``'s architecture and weights behind the ``trunk`` kind (fresh routers), in eval mode."""
    network = DiT(plain.config.replace(trunk=trunk, trunk_options=options))
    missing, unexpected = network.load_state_dict(plain.state_dict(), strict=False)
    assert not unexpected and all(key.startswith("trunk.") for key in missing)
    return network.eval()


def scramble(module: torch.nn.Module, seed: int, std: float = 1.0, bias: float = 0.0) -> None:
    """Random weights (``std``) and biases (around ``bias``) for every parameter of ``module`` (router states)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in module.named_parameters():
            noise = torch.randn(parameter.shape, generator=generator) * std
            parameter.copy_(noise + bias if name.endswith("bias") else noise)


class CountedAttention(FullAttention):
    """Full attention as explicit matrix products, so ``FlopCounterMode`` counts ``q k^T`` and ``attn v``."""

    def __call__(self, q, k, v):
        return attention_map(q, k) @ v


@pytest.fixture
def counted_attention():
    def install(network: DiT) -> DiT:
        for block in network.blocks:
            block.attn.operator = CountedAttention()
        return network

    return install


@pytest.fixture(scope="session", name="make_dynamic")
def make_dynamic_fixture():
    """``make_dynamic(plain, trunk, **options)``: see :func:`make_dynamic`."""
    return make_dynamic


@pytest.fixture(scope="session", name="scramble")
def scramble_fixture():
    """``scramble(module, seed, std=1, bias=0)``: see :func:`scramble`."""
    return scramble
