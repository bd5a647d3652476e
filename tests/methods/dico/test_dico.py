"""DiCo: the conv block follows the block protocol (branch hooks, units, macs), the U-shaped trunk runs its levels,
FLOPs are counted as torch counts them, configs/dico.yaml matches the digits DiT's FLOPs, and a tiny DiCo trains."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from torch.utils.flop_counter import FlopCounterMode

from ditlab.diffusion.gaussian import GaussianDiffusion
from ditlab.methods.dico import DiCoBlock, DiCoTrunk, dico_levels
from ditlab.models.budget import flops_per_image
from ditlab.models.config import DiTConfig
from ditlab.models.taps import run_blocks

ROOT = Path(__file__).resolve().parents[3]
ISOTROPIC = DiTConfig(input_size=8, patch_size=2, in_channels=1, hidden_size=32, depth=3, num_heads=2,
                      num_classes=10, block="dico", mlp_ratio=2.0, positions="none")  # fmt: skip
HOURGLASS = ISOTROPIC.replace(patch_size=1, depth=6, trunk="dico", trunk_options={"stages": [1, 1, 2, 1, 1]})
"""8x8 tokens of width 32, 4x4 of 64, 2x2 of 128 (the middle stage), then back up."""


def randomised(config: DiTConfig, seed: int = 0) -> torch.nn.Module:
    """``config`` built with every parameter random (adaLN and output too), so no branch is the identity."""
    torch.manual_seed(seed)
    network = config.build()
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, parameter in network.named_parameters():
            if name != "pos_embed":
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.2)
    return network.eval()


def inputs(size: int = 3, seed: int = 2):
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(size, 1, 8, 8, generator=generator), torch.randint(0, 1000, (size,), generator=generator).float(),
            torch.randint(0, 10, (size,), generator=generator))  # fmt: skip


@pytest.mark.parametrize("config", [ISOTROPIC, HOURGLASS], ids=["isotropic", "hourglass"])
def test_branch_hooks_see_conv_and_mlp_units_and_compute_is_the_plain_forward(config):
    dit = randomised(config)
    x, t, y = inputs()
    seen = []

    def record(branch):
        seen.append((branch.block, branch.kind, branch.unit))
        return branch.compute()

    with torch.no_grad():
        plain = dit(x, t, y)
        tokens, cond = dit.embed(x, t, y)
        hooked = dit.head(dit.run_trunk(tokens, cond, t, branches=record), cond)
    assert torch.equal(hooked, plain)
    assert DiCoBlock.units() == [("conv", "attention"), ("mlp", "mlp")]
    assert seen == [(unit.block, unit.kind, unit.index) for unit in dit.units()]
    assert len(seen) == 2 * config.depth
    with torch.no_grad():  # a hook that drops the conv mixers changes the output: the branch is real
        blind = dit.head(dit.run_trunk(tokens, cond, t, branches=lambda b: b.compute() * (b.kind != "attention")), cond)
    assert not torch.allclose(blind, plain, atol=1e-4)


def test_the_ffn_is_per_token_so_a_hook_may_run_it_on_some_tokens():
    block = randomised(ISOTROPIC).blocks[0]
    tokens = torch.randn(2, 16, 32)
    chosen = torch.tensor([1, 5, 11])
    torch.testing.assert_close(block.feed(tokens[:, chosen]), block.feed(tokens)[:, chosen])


@pytest.mark.parametrize("config", [ISOTROPIC, HOURGLASS], ids=["isotropic", "hourglass"])
def test_macs_are_positive_and_flops_match_torchs_flop_counter(config):
    dit = randomised(config)
    assert all(block.macs(config.num_tokens, config) > 0 for block in dit.blocks)
    x, t, y = inputs(size=1)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        dit(x, t, y)
    assert flops_per_image(dit) == counter.get_total_flops()


def test_hourglass_levels_widths_and_hidden_taps():
    dit = randomised(HOURGLASS)
    assert dico_levels(HOURGLASS) == [0, 1, 2, 2, 1, 0]
    assert isinstance(dit.trunk, DiCoTrunk) and dit.trunk.stage_ends() == [0, 1, 3, 4, 5]
    assert [block.width for block in dit.blocks] == [32, 64, 128, 128, 64, 32]
    x, t, y = inputs()
    tapped = run_blocks(dit, x, t, y, hidden=range(6))
    assert [tuple(tapped.hidden[i].shape[1:]) for i in range(6)] == [(64, 32), (16, 64), (4, 128), (4, 128),
                                                                     (16, 64), (64, 32)]  # fmt: skip
    with torch.no_grad():
        torch.testing.assert_close(tapped.output, dit(x, t, y))
    # a block-level tool that needs the plain loop is refused in one line, not run on the wrong network
    with pytest.raises(ValueError, match="trunk") as error:
        run_blocks(dit, x, t, y, skip=[2])
    assert "\n" not in str(error.value)


def test_bad_configs_are_refused_in_one_line():
    cases = [
        (ISOTROPIC.replace(attention="kv-compress", attention_options={"ratio": 2}), "no attention or MLP component"),
        (HOURGLASS.replace(trunk_options={"stages": [1, 1, 1, 1, 1]}), "depth is 6"),
        (HOURGLASS.replace(trunk_options={"stages": [3, 3]}), "odd-length"),
        (HOURGLASS.replace(patch_size=4), "cannot be halved"),
        (HOURGLASS.replace(block="dit"), "use block: dit under the plain 'blocks' trunk"),
        (ISOTROPIC.replace(block_options={"kernel": 3}), "unknown dico block_options"),
    ]
    for config, message in cases:
        with pytest.raises(ValueError, match=message) as error:
            config.build()
        assert "\n" not in str(error.value)


def test_a_fresh_dico_starts_as_adaln_zero_and_trains():
    torch.manual_seed(0)
    dit = HOURGLASS.replace(learn_sigma=False).build()
    assert all(not block.adaLN_modulation[-1].weight.any() for block in dit.blocks)  # every block the identity
    from ditlab.data.digits import digits_tensors

    images, labels = digits_tensors(8)
    images, labels = images[:32], labels[:32]
    objective = GaussianDiffusion(learn_sigma=False)
    optimizer = torch.optim.AdamW(dit.parameters(), lr=2e-3)
    losses = []
    dit.train()
    for _ in range(25):
        noised = objective.prepare(images, generator=torch.Generator().manual_seed(0))  # the same draws every step
        loss = objective.losses(dit(noised.xt, noised.model_t, labels), images, noised)["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss))
    assert losses[-1] < 0.7 * losses[0], losses


def test_configs_dico_yaml_matches_the_digits_dit_flops():
    def network(name: str) -> DiTConfig:
        config = yaml.safe_load((ROOT / "configs" / name).read_text())
        fields = dict(config["model"]["init_args"]["network"])
        fields["input_size"] = config["data"]["init_args"]["image_size"]
        return DiTConfig(**fields)

    dico, dit = network("dico.yaml"), network("dit.yaml")
    assert (dico.block, dico.trunk) == ("dico", "dico")
    dico_flops, dit_flops = flops_per_image(dico.build()), flops_per_image(dit.build())
    assert dico_flops == 78_925_824 and dit_flops == 79_790_080  # the numbers configs/dico.yaml states
    assert abs(dico_flops / dit_flops - 1) < 0.02
