"""D2iT's dynamic-grain trunk: all-fine is the plain DiT bit for bit, coarse regions cut the counted FLOPs, the grain map
follows the detail, a given map is what runs, a few training steps reduce the loss and sampling runs the router."""

from __future__ import annotations

import pytest
import torch

from ditlab.methods.d2it import D2iTModule, grain_map, plain_flops, region_entropy
from ditlab.methods.d2it.trunk import from_regions, to_regions
from ditlab.models.budget import flops_per_image
from ditlab.models.dit import DiT

CONFIG = {"input_size": 16, "patch_size": 2, "in_channels": 1, "hidden_size": 32, "depth": 2, "num_heads": 2,
          "num_classes": 10}  # fmt: skip


def inputs(size: int = 3):
    generator = torch.Generator().manual_seed(0)
    return (torch.randn(size, 1, 16, 16, generator=generator), torch.tensor([1.0, 500.0, 999.0][:size]),
            torch.tensor([1, 2, 3][:size]))  # fmt: skip


def randomized(dit: DiT) -> DiT:
    """adaLN-Zero layers given values, so every block and the head do something."""
    generator = torch.Generator().manual_seed(1)
    layers = [block.adaLN_modulation[-1] for block in dit.blocks]
    layers += [dit.final_layer.adaLN_modulation[-1], dit.final_layer.linear]
    with torch.no_grad():
        for layer in layers:
            layer.weight.copy_(torch.randn(layer.weight.shape, generator=generator) * 0.1)
    return dit


def test_all_fine_is_the_plain_dit():
    torch.manual_seed(0)
    plain = randomized(DiT(**CONFIG)).eval()
    dynamic = DiT(**CONFIG, trunk="d2it", trunk_options={"fine_ratio": 1.0}).eval()
    result = dynamic.load_state_dict(plain.state_dict(), strict=False)
    assert not result.unexpected_keys and all(key.startswith("trunk.") for key in result.missing_keys)
    x, t, y = inputs()
    assert torch.equal(dynamic(x, t, y), plain(x, t, y))
    assert flops_per_image(dynamic) == flops_per_image(plain) == plain_flops(dynamic)


def test_coarse_regions_cut_the_flops():
    flops = []
    for ratio in (1.0, 0.75, 0.5, 0.25, 0.0):
        dit = DiT(**CONFIG, trunk="d2it", trunk_options={"fine_ratio": ratio})
        assert dit.trunk.sequence_length == 4 * dit.trunk.fine + (16 - dit.trunk.fine)
        flops.append(flops_per_image(dit))
        assert plain_flops(dit) == flops[0]
    assert all(later < earlier for earlier, later in zip(flops, flops[1:]))
    assert flops[2] < 0.7 * flops[0]  # 40 of 64 tokens


def test_region_layout_and_grain_map():
    tokens = torch.arange(64.0).reshape(1, 64, 1)
    regions = to_regions(tokens, 8)
    assert regions[0, 0, :, 0].tolist() == [0, 1, 8, 9] and regions[0, 5, :, 0].tolist() == [18, 19, 26, 27]
    assert torch.equal(from_regions(regions, 8), tokens)
    images = -torch.ones(2, 1, 16, 16)
    images[0, :, 4:8, 8:12] = torch.rand(4, 4) * 2 - 1  # texture in region (1, 2) of image 0
    entropy = region_entropy(images, 4)
    assert entropy[0].argmax() == 6 and entropy[1].max() == entropy[1].min()
    fine = grain_map(images, 4, fine_ratio=0.25)
    assert fine.sum(1).tolist() == [4, 4] and fine[0, 6]


def test_given_map_is_what_runs_and_the_router_otherwise():
    torch.manual_seed(0)
    dit = randomized(DiT(**CONFIG, trunk="d2it", trunk_options={"fine_ratio": 0.25}))
    x, t, y = inputs(2)
    given = torch.zeros(2, 16, dtype=torch.bool)
    given[:, [0, 5, 10, 15]] = True
    dit.trunk.given = given
    first = dit(x, t, y)
    assert torch.equal(dit.trunk.last["fine"], given) and dit.trunk.last["tokens"] == 28 and dit.trunk.given is None
    dit(x, t, y)
    assert dit.trunk.last["fine"].sum(1).tolist() == [4, 4]  # the router's top-4 when no map is given
    dit.trunk.given = given
    assert torch.equal(dit(x, t, y), first)
    dit.trunk.given = torch.ones(2, 16, dtype=torch.bool)
    with pytest.raises(ValueError, match="exactly 4 of 16"):
        dit(x, t, y)


def test_merge_and_restore_start_as_mean_and_copy():
    """With identity blocks (adaLN-Zero at init) a coarse region's four cells all get the mean of their tokens."""
    torch.manual_seed(0)
    dit = DiT(**CONFIG, trunk="d2it", trunk_options={"fine_ratio": 0.0})
    tokens = torch.randn(1, 64, 32)
    out = dit.trunk(dit, tokens, torch.zeros(1, 32), torch.zeros(1))
    regions, restored = to_regions(tokens, 8), to_regions(out, 8)
    expected = regions.mean(2, keepdim=True).expand_as(regions)
    assert torch.allclose(restored, expected, atol=1e-6)


def test_refusals_are_one_line():
    with pytest.raises(ValueError, match="must be even"):
        DiT(**{**CONFIG, "patch_size": 4, "input_size": 12}, trunk="d2it")
    with pytest.raises(ValueError, match="positions: sincos"):
        DiT(**CONFIG, trunk="d2it", positions="rope")
    with pytest.raises(ValueError, match="fine_ratio"):
        DiT(**CONFIG, trunk="d2it", trunk_options={"fine_ratio": 1.5})


def test_training_steps_reduce_the_loss_and_sampling_runs():
    from ditlab.data.digits import digits_tensors
    from ditlab.diffusion.config import ObjectiveConfig, SamplingConfig
    from ditlab.models.config import DiTConfig

    torch.manual_seed(0)
    network = DiTConfig(**{**CONFIG, "hidden_size": 64}, trunk="d2it", trunk_options={"fine_ratio": 0.5})
    module = D2iTModule(network=network, ema_decay=None, objective=ObjectiveConfig(kind="gaussian"),
                        sampling=SamplingConfig(sampler="ddim", steps=3, cfg_scale=2.0))  # fmt: skip
    assert module.summary["d2it"]["tokens"] == 40 and module.summary["d2it"]["dense_tokens"] == 64
    assert module.summary["d2it"]["flops_per_image"] < module.summary["d2it"]["dense_flops_per_image"]
    images, labels = digits_tensors(16)
    images, labels = images[:32], labels[:32]
    optimizer = torch.optim.AdamW(module.trainable_parameters(), lr=2e-3)
    losses, grains = [], []
    for _ in range(15):
        module.seed_training_draws(0)
        terms = module.training_losses(images, labels)
        optimizer.zero_grad()
        terms["loss"].backward()
        optimizer.step()
        losses.append(terms["loss_diffusion"].item())
        grains.append(terms["loss_grain"].item())
    assert losses[-1] < 0.8 * losses[0] and grains[-1] < grains[0]
    assert module.network.trunk.merge.weight.grad is not None and module.network.trunk.router_out.weight.grad is not None
    samples = module.sample(labels[:3])  # guided: the router picks the map of the doubled batch's every row
    assert samples.shape == (3, 1, 16, 16) and torch.isfinite(samples).all()
