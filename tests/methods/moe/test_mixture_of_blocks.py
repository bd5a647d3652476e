"""Mixture of Blocks (a trunk kind): k = G is the dense model, k < G runs exactly k blocks per group per image,
and trains."""

from __future__ import annotations

import copy

import pytest
import torch

from ditlab.methods.moe.blocks import block_gates, mixture_of_blocks
from ditlab.models.budget import activated_parameter_count, flops_per_image, parameter_count
from ditlab.models.config import DiTConfig
from ditlab.models.taps import run_blocks

TINY = DiTConfig(input_size=8, patch_size=2, in_channels=1, hidden_size=32, depth=4, num_heads=2, num_classes=10)


@pytest.fixture(scope="module")
def dense():
    torch.manual_seed(0)
    dit = TINY.build()
    for block in dit.blocks:
        torch.nn.init.normal_(block.adaLN_modulation[-1].weight, std=0.2)
    torch.nn.init.normal_(dit.final_layer.linear.weight, std=0.2)
    torch.nn.init.normal_(dit.y_embedder.embedding_table.weight, std=1.0)  # a condition the routers can tell apart
    return dit.eval()


def inputs(count: int = 6):
    generator = torch.Generator().manual_seed(7)
    return torch.randn(count, 1, 8, 8, generator=generator), torch.linspace(1, 999, count), torch.arange(count) % 10


def test_all_blocks_on_is_the_dense_model(dense):
    mixture = mixture_of_blocks(dense, group_size=2, active=2, scores=torch.arange(4.0)).eval()
    torch.testing.assert_close(mixture(*inputs()), dense(*inputs()), atol=1e-6, rtol=0)
    assert mixture.trunk.last_choice.all()
    assert flops_per_image(mixture) == flops_per_image(dense) + 2 * mixture.trunk.router.weight.numel()


def test_k_of_g_runs_exactly_k_blocks_per_group_for_each_image(dense):
    mixture = mixture_of_blocks(dense, group_size=2, active=1).eval()
    with torch.no_grad():
        mixture.trunk.router.weight.normal_(std=1.0)  # routing that depends on the image and timestep
    x, t, y = inputs()
    out = mixture(x, t, y)
    choice = mixture.trunk.last_choice
    assert choice.shape == (6, 4) and torch.equal(choice.reshape(6, 2, 2).sum(-1), torch.ones(6, 2, dtype=torch.long))
    assert len({tuple(row.tolist()) for row in choice}) > 1  # images differ in the blocks they run
    for image in range(6):  # each image equals the dense network with its unchosen blocks skipped
        skipped = [b for b in range(4) if not choice[image, b]]
        alone = run_blocks(dense, x[image : image + 1], t[image : image + 1], y[image : image + 1], skip=skipped)
        torch.testing.assert_close(out[image : image + 1], alone.output, atol=1e-5, rtol=0)


def test_router_learns_through_the_straight_through_gates(dense):
    mixture = mixture_of_blocks(dense, group_size=2, active=1, scores=torch.tensor([1.0, 0, 0, 1])).train()
    gates = block_gates(torch.randn(3, 4, requires_grad=True), 2)
    assert set(gates.detach().unique().tolist()) == {0.0, 1.0}
    out = mixture(*inputs())
    out.square().mean().backward()
    assert mixture.trunk.router.weight.grad.abs().sum() > 0 and mixture.trunk.router.bias.grad.abs().sum() > 0
    assert mixture.trunk.last_choice[:, [0, 3]].all()  # the router bias starts on the important blocks


def test_accounting_counts_the_blocks_an_image_runs(dense):
    mixture = mixture_of_blocks(dense, group_size=2, active=1)
    block = parameter_count(dense.blocks[0])
    router = mixture.trunk.router.weight.numel() + mixture.trunk.router.bias.numel()
    assert parameter_count(mixture) == parameter_count(dense) + router
    assert activated_parameter_count(mixture) == parameter_count(dense) - 2 * block + router
    per_block = dense.blocks[0].macs(16, dense.config)
    assert flops_per_image(mixture) == flops_per_image(dense) - 2 * 2 * per_block + 2 * mixture.trunk.router.weight.numel()


def test_config_round_trips_and_rebuilds_the_mixture(dense):
    mixture = mixture_of_blocks(dense, group_size=2, active=1)
    config = mixture.config
    assert DiTConfig.from_dict(config.to_dict()) == config and config.replace(trunk="blocks", trunk_options={}) == dense.config
    rebuilt = config.build()
    rebuilt.load_state_dict(mixture.state_dict())
    copied = copy.deepcopy(mixture)
    torch.testing.assert_close(rebuilt.eval()(*inputs()), copied.eval()(*inputs()))
    with pytest.raises(ValueError, match="group_size=3 must divide the depth 4"):
        dense.config.replace(trunk="mixture-of-blocks", trunk_options={"group_size": 3, "active": 1}).build()
    with pytest.raises(ValueError, match=r"active=3 blocks per group must be in 1..group_size=2"):
        dense.config.replace(trunk="mixture-of-blocks", trunk_options={"group_size": 2, "active": 3}).build()
