"""A toy DiT whose blocks all matter, and the sampling settings the cache conformance tests share."""

from __future__ import annotations

import pytest
import torch

from ditlab.diffusion import FlowMatching, GaussianDiffusion
from ditlab.methods.sampling.caches import build_policy
from ditlab.models.dit import DiT

TOY = {"input_size": 8, "patch_size": 2, "in_channels": 1, "hidden_size": 32, "depth": 4, "num_heads": 2,
       "num_classes": 10}  # fmt: skip


def toy_dit(learn_sigma: bool = True, seed: int = 0) -> DiT:
    """Random adaLN and output layers (adaLN-Zero would make every block the identity)."""
    torch.manual_seed(seed)
    dit = DiT(**TOY, learn_sigma=learn_sigma)
    with torch.no_grad():
        for layer in [*(block.adaLN_modulation[-1] for block in dit.blocks), dit.final_layer.adaLN_modulation[-1],
                      dit.final_layer.linear]:  # fmt: skip
            layer.weight.normal_(std=0.2)
            layer.bias.normal_(std=0.1)
    return dit.eval()


@pytest.fixture(scope="module")
def dit() -> DiT:
    return toy_dit()


@pytest.fixture(scope="session")
def make_toy_dit():
    """``make_toy_dit(learn_sigma=True, seed=0)``: a fresh toy DiT."""
    return toy_dit


SETTINGS = {
    "ddim": (GaussianDiffusion(learn_sigma=True), "ddim"),
    "ddpm": (GaussianDiffusion(learn_sigma=True), "ddpm"),
    "euler": (FlowMatching(t_scale=1000.0), "euler"),
}


@pytest.fixture(scope="session")
def settings() -> dict:
    """Sampler name -> ``(objective, sampler)``."""
    return SETTINGS


@pytest.fixture(scope="session")
def make_policy():
    """``make_policy(dit, cache, setting="ddim", steps=8, cfg_scale=2.0)``: a policy planned for that sampler."""

    def make(dit: DiT, cache, setting: str = "ddim", steps: int = 8, cfg_scale: float = 2.0):
        objective, sampler = SETTINGS[setting]
        return build_policy(dit, cache, objective, sampler, steps, cfg_scale)

    return make


class Scaled:
    """A third-party model function: the network's output times ``gain`` (``gain: 1`` is the network)."""

    def __init__(self, network: DiT, gain: float) -> None:
        self.network, self.gain, self.config = network, gain, network.config

    def parameters(self):
        return self.network.parameters()

    def __call__(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.network(x, t, y) * self.gain


@pytest.fixture
def scaled_policy():
    """``test-scaled``, a policy registered from outside ditlab with its own options; unregistered afterwards
    (so registry-driven tests elsewhere never meet it)."""
    from dataclasses import dataclass

    from ditlab.diffusion.cache import CACHE_POLICIES, knob, register_cache_policy

    @dataclass
    class ScaledOptions:
        """Scaled's knob.

        Args:
            gain: the factor on the network's output.
        """

        gain: float = knob(1.0, low=0.0, high=2.0)

    register_cache_policy("test-scaled", ScaledOptions, lambda network, objective, options, **sampling:
                          Scaled(network, options.gain))  # fmt: skip
    yield Scaled
    CACHE_POLICIES.pop("test-scaled")
