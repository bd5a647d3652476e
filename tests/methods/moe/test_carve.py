"""Carving a dense DiT's FFNs into experts (Dense2MoE) and upcycling them: exact decompositions and their inputs."""

from __future__ import annotations

import copy

import pytest
import torch

from ditlab.diffusion.config import ObjectiveConfig
from ditlab.methods.compress.carve import (
    CarveConfig,
    balanced_kmeans,
    calibrate_ffns,
    carve_network,
    partition_units,
)
from ditlab.methods.moe.layer import MoEFeedForward
from ditlab.models.config import DiTConfig

TINY = DiTConfig(input_size=8, patch_size=2, in_channels=1, hidden_size=32, depth=3, num_heads=2, num_classes=10)


@pytest.fixture(scope="module")
def teacher():
    """A tiny dense DiT whose blocks do something (adaLN-Zero would make them the identity)."""
    torch.manual_seed(0)
    dit = TINY.build()
    for block in dit.blocks:
        torch.nn.init.normal_(block.adaLN_modulation[-1].weight, std=0.2)
        torch.nn.init.normal_(block.mlp.fc1.bias, std=0.5)
    torch.nn.init.normal_(dit.final_layer.linear.weight, std=0.2)
    return dit.eval()


@pytest.fixture(scope="module")
def calibration(teacher):
    images, labels = torch.randn(24, 1, 8, 8), torch.arange(24) % 10
    return calibrate_ffns(teacher, ObjectiveConfig().build(True), images, labels, batch_size=8, seed=0)


def inputs(count: int = 6):
    generator = torch.Generator().manual_seed(5)
    x = torch.randn(count, 1, 8, 8, generator=generator)
    return x, torch.linspace(1, 999, count), torch.arange(count) % 10


@pytest.mark.parametrize("assignment", ["contiguous", "strided", "cluster"])
def test_all_experts_on_with_unit_gates_is_the_dense_ffn(teacher, calibration, assignment):
    carved = carve_network(teacher, CarveConfig(num_experts=4, top_k=4, shared_width=16, assignment=assignment,
                                                gate="straight_through"), calibration)  # fmt: skip
    tokens = torch.randn(3, 16, 32)
    for dense_block, moe_block in zip(teacher.blocks, carved.blocks):  # float32: only the summation order differs
        torch.testing.assert_close(moe_block.mlp(tokens), dense_block.mlp(tokens), atol=2e-6, rtol=0)
        exact, dense = copy.deepcopy(moe_block.mlp).double(), copy.deepcopy(dense_block.mlp).double()
        torch.testing.assert_close(exact(tokens.double()), dense(tokens.double()), atol=1e-12, rtol=0)
    torch.testing.assert_close(carved(*inputs()), teacher(*inputs()), atol=1e-5, rtol=0)
    assert sum(p.numel() for p in carved.parameters()) == sum(p.numel() for p in teacher.parameters()) + 3 * 4 * 32


def test_upcycled_experts_with_renormalised_gates_are_the_dense_ffn(teacher):
    upcycled = carve_network(teacher, CarveConfig(mode="upcycle", num_experts=3, top_k=2, router_init="random"))
    assert upcycled.config.mlp_options["gate"] == "normalized"
    torch.testing.assert_close(upcycled(*inputs()), teacher(*inputs()), atol=1e-5, rtol=0)


def test_partition_covers_every_unit_once_and_shares_the_most_important(calibration):
    importance = calibration.importance[1]
    for assignment in ("contiguous", "strided", "cluster"):
        shared, experts = partition_units(importance, 4, 16, assignment, calibration.hidden[1])
        assert experts.shape == (4, 28)
        assert torch.equal(torch.cat([shared, experts.flatten()]).sort().values, torch.arange(128))
        assert set(shared.tolist()) == set(importance.topk(16).indices.tolist())
    shared, experts = partition_units(importance, 4, 16, "contiguous")
    assert importance[experts[0]].min() >= importance[experts[3]].max()  # contiguous in importance rank


def test_balanced_kmeans_recovers_planted_groups():
    centres = torch.eye(4, 8)
    features = torch.cat([c + 0.05 * torch.randn(6, 8, generator=torch.Generator().manual_seed(i))
                          for i, c in enumerate(centres)])  # fmt: skip
    clusters = balanced_kmeans(features, 4, seed=1)
    assert torch.equal(torch.bincount(clusters), torch.full((4,), 6))
    assert all(len(set(clusters[6 * i : 6 * i + 6].tolist())) == 1 for i in range(4))


def test_taylor_importance_is_per_image_and_zero_for_a_dead_unit(teacher):
    images, labels = torch.randn(8, 1, 8, 8), torch.arange(8)
    objective = ObjectiveConfig().build(True)
    with torch.no_grad():
        saved = teacher.blocks[0].mlp.fc2.weight[:, 5].clone()
        teacher.blocks[0].mlp.fc2.weight[:, 5] = 0  # unit 5 of block 0 cannot change the output
    try:
        whole = calibrate_ffns(teacher, objective, images, labels, batch_size=8, seed=3)
        split = calibrate_ffns(teacher, objective, images, labels, batch_size=2, seed=3)
    finally:
        with torch.no_grad():
            teacher.blocks[0].mlp.fc2.weight[:, 5] = saved
    assert whole.importance[0][5] == 0 and whole.importance[0].sum() > 0
    # |sum over tokens| per image, then the mean: a batch-size-independent quantity (the noise draws differ)
    assert all(i.shape == (128,) for i in whole.importance) and whole.inputs[0].shape == (128, 32)
    assert all(not p.requires_grad or p.grad is None for p in teacher.parameters())
    ranks = torch.corrcoef(torch.stack([whole.importance[1], split.importance[1]]))[0, 1]
    assert ranks > 0.5


def test_fitted_router_picks_the_experts_that_contribute_most(teacher, calibration):
    carved = carve_network(teacher, CarveConfig(num_experts=4, top_k=1, shared_width=16, router_init="fit"),
                           calibration)  # fmt: skip
    moe: MoEFeedForward = carved.blocks[1].mlp
    tokens = calibration.inputs[1]
    norms = torch.stack([moe.experts(e, tokens).norm(dim=-1) for e in range(4)], dim=1)
    agreement = ((tokens @ moe.router.t()).argmax(1) == norms.argmax(1)).float().mean()
    assert agreement > 0.5  # chance is 0.25


@pytest.mark.parametrize("carve, message", [
    (CarveConfig(num_experts=5, shared_width=16), r"carve.num_experts=5 does not divide the 112 routed units "
                                                  r"\(MLP width 128 - shared_width 16\); pick one of \[2, 4, 7"),
    (CarveConfig(num_experts=4, top_k=5), r"carve.top_k=5 exceeds carve.num_experts=4"),
    (CarveConfig(num_experts=4, shared_width=128), r"carve.shared_width=128 must be in 0..127"),
])  # fmt: skip
def test_bad_carving_is_one_line(teacher, calibration, carve, message):
    with pytest.raises(ValueError, match=message) as error:
        carve_network(teacher, carve, calibration)
    assert "\n" not in str(error.value)


def test_an_moe_network_is_refused_as_the_dense_teacher(teacher):
    carved = carve_network(teacher, CarveConfig(num_experts=4, shared_width=0, importance="magnitude",
                                                assignment="contiguous", router_init="centroid"))  # fmt: skip
    with pytest.raises(ValueError, match=r"Dense2MoE carves a dense MLP, but the teacher has a 'moe' MLP") as error:
        carve_network(carved, CarveConfig())
    assert "\n" not in str(error.value)
