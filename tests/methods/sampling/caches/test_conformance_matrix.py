"""The conformance matrix, driven by the registries: every cache policy x every block kind x every trunk kind
either samples, at the policy's identity setting, bit for bit what the network samples with every branch counted
as computed, or refuses in one line. Plus the two wrong answers the trunk contract removed: a cache on a Mixture
of Blocks ran the dense network, and a parallel-pair network counted its branches twice."""

from __future__ import annotations

import pytest
import torch

import ditlab.models.blocks  # noqa: E402,F401 - the core's text-conditioned block kinds
from ditlab.diffusion.cache import cache_policies
from ditlab.diffusion.gaussian import GaussianDiffusion
from ditlab.diffusion.sample import sample_images
from ditlab.methods.moe.blocks import mixture_of_blocks
from ditlab.methods.sampling.caches import build_policy
from ditlab.models.components import BLOCK, TRUNK
from ditlab.models.config import DiTConfig
from ditlab.models.text.features import TextFeatures
from ditlab.plugins import load_plugins

load_plugins()  # every family's kinds, as a config or checkpoint naming them would find them
TOY = DiTConfig(input_size=8, patch_size=2, in_channels=1, hidden_size=32, depth=4, num_heads=2, num_classes=10)
TRUNK_OPTIONS = {"mixture-of-blocks": {"group_size": 2, "active": 1}}
TEXT = {"text_dim": 12, "text_length": 5}
TEXT_KINDS = {  # text-to-image block kinds: the condition and positions each is built for
    "pixart": {"condition_options": {**TEXT, "adaln": "single"}},
    "mmdit": {"condition_options": {**TEXT, "pooled_dim": 6, "projection": "linear"}, "qk_norm": "rms"},
    "flux": {"condition_options": {**TEXT, "pooled_dim": 6, "projection": "linear"}, "qk_norm": "rms",
             "positions": "rope", "block_options": {"double": 2}},
    "flux-single": {"condition_options": {**TEXT, "pooled_dim": 6, "projection": "linear"}, "qk_norm": "rms",
                    "positions": "rope"},
}  # fmt: skip


def captions(batch: int = 3) -> TextFeatures:
    """Encoded captions with padding, and the empty caption's features (guidance's null rows)."""
    generator = torch.Generator().manual_seed(7)
    mask = torch.tensor([[True] * 5, [True] * 3 + [False] * 2, [True] * 4 + [False]])[:batch]
    null = TextFeatures(torch.randn(1, 5, 12, generator=generator), torch.randn(1, 6, generator=generator),
                        torch.tensor([[True, True, False, False, False]]))  # fmt: skip
    return TextFeatures(torch.randn(batch, 5, 12, generator=generator), torch.randn(batch, 6, generator=generator),
                        mask, null)  # fmt: skip
OBJECTIVE, SAMPLER, STEPS = GaussianDiffusion(learn_sigma=True), "ddim", 5
LABELS = torch.tensor([3, 1, 4])
BUILT_IN = sorted(name for name, entry in cache_policies().items() if entry.options.__module__.startswith("ditlab."))


def randomised(network: torch.nn.Module) -> torch.nn.Module:
    """Every parameter drawn at random, so every block and router matters and routing differs by image."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, parameter in network.named_parameters():
            if name != "pos_embed":
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.2)
    return network.eval()


def network_of(block: str, trunk: str) -> torch.nn.Module:
    """The toy network with ``block`` blocks under the ``trunk`` kind (a one-line ValueError if they do not mix)."""
    text = {"condition": "text", **TEXT_KINDS[block]} if block in TEXT_KINDS else {}
    config = TOY.replace(block=block, depth=TOY.depth // 2 if block == "parallel-pair" else TOY.depth, trunk=trunk,
                         trunk_options=TRUNK_OPTIONS.get(trunk, {}), **text)  # fmt: skip
    return randomised(config.build())


def sample(model) -> torch.Tensor:
    text = getattr(getattr(model, "config", None) or getattr(getattr(model, "network", None), "config", None),
                   "text_conditioned", False)  # fmt: skip
    return sample_images(model, OBJECTIVE, captions() if text else LABELS, seed=5, sampler=SAMPLER, steps=STEPS,
                         cfg_scale=2.0)  # fmt: skip


def test_every_builtin_policy_has_an_identity_setting(cache_identity):
    assert set(BUILT_IN) == set(cache_identity), "declare the identity setting of a new policy in CACHE_IDENTITY"


@pytest.mark.parametrize("trunk", sorted(TRUNK))
@pytest.mark.parametrize("block", sorted(BLOCK))
def test_identity_settings_sample_the_network_or_refuse_in_one_line(block, trunk, tmp_path, identity_cache):
    try:
        network = network_of(block, trunk)
    except ValueError as error:  # a block kind the trunk cannot route
        message = str(error)  # refused before any policy is asked, in one line naming the block kind or trunk
        assert "\n" not in message and len(message) < 400 and (block in message or trunk in message), message
        return
    plain = sample(network)
    outcome = {}
    for policy in BUILT_IN:
        try:
            settings = identity_cache(policy, network, tmp_path, OBJECTIVE, SAMPLER, STEPS)
            model = build_policy(network, settings, OBJECTIVE, SAMPLER, STEPS,
                                 cfg_scale=2.0)  # fmt: skip
        except ValueError as error:
            assert "\n" not in str(error) and len(str(error)) < 400, f"{policy}: {error}"
            outcome[policy] = "refused"
            continue
        assert torch.equal(sample(model), plain), f"{policy} at its identity setting on {block}/{trunk}"
        assert model.computed_share == pytest.approx(1.0), f"{policy} on {block}/{trunk}: {model.computed_share}"
        outcome[policy] = "exact"
    if trunk == "blocks":  # the plain loop serves every policy
        assert set(outcome.values()) == {"exact"}, outcome
    if trunk == "mixture-of-blocks":  # routed blocks: the policies that follow rows do, the others refuse
        assert {p for p, o in outcome.items() if o == "exact"} == {"none", "fora", "teacache", "magcache", "plan"}


@pytest.fixture(scope="module")
def routed_pair():
    dense = randomised(TOY.build())
    return dense, randomised(mixture_of_blocks(dense, group_size=2, active=1))


def test_a_cache_on_a_mixture_of_blocks_runs_the_routed_network_not_the_dense_one(routed_pair):
    """Was: FORA at interval 1 on the MoB stage equalled the dense DiT and differed from the MoB forward."""
    dense, mixture = routed_pair
    routed = sample(mixture)
    assert not torch.allclose(routed, sample(dense), atol=1e-3)
    cached = build_policy(mixture, {"policy": "fora", "options": {"interval": 1}}, OBJECTIVE, SAMPLER, STEPS,
                          cfg_scale=2.0)  # fmt: skip
    assert torch.equal(sample(cached), routed)
    reusing = build_policy(mixture, {"policy": "fora", "options": {"interval": 2}}, OBJECTIVE, SAMPLER, STEPS,
                           cfg_scale=2.0)  # fmt: skip
    approximate = sample(reusing)
    assert torch.isfinite(approximate).all() and not torch.equal(approximate, routed)
    assert 0.5 < reusing.computed_share < 1.0


def test_parallel_pairs_count_work_like_the_same_blocks_run_in_sequence():
    """Was: the parallel network's computed_share read 1.125 where the sequential one read 0.5625."""
    sequential = randomised(TOY.build())
    parallel = randomised(TOY.replace(block="parallel-pair", depth=2).build())
    assert len(parallel.units()) == len(sequential.units()) == 2 * TOY.depth
    shares = []
    for network in (sequential, parallel):
        policy = build_policy(network, {"policy": "fora", "options": {"interval": 3}}, OBJECTIVE, SAMPLER, 8,
                              cfg_scale=2.0)  # fmt: skip
        sample_images(policy, OBJECTIVE, LABELS, seed=5, sampler=SAMPLER, steps=8, cfg_scale=2.0)
        shares.append(policy.computed_share)
    assert shares[0] == shares[1] == pytest.approx(4 / 8)  # FORA's plan over 8 calls: 0, 1, 4 and 7
