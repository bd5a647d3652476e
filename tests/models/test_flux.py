"""The ``flux`` / ``flux-single`` block kinds and the exact conversion of diffusers' ``FluxTransformer2DModel`` (tiny:
2 double + 2 single blocks, 2 heads of 16, built offline from its config, every weight random)."""

from __future__ import annotations

import pytest
import torch
from diffusers import FluxTransformer2DModel

import ditlab.models.blocks.flux  # noqa: F401 - registers the flux and flux-single block kinds
from ditlab.models.blocks.flux import FluxSingleBlock
from ditlab.models.blocks.mmdit import MMDiTBlock
from ditlab.models.budget import flops_per_image
from ditlab.models.config import DiTConfig
from ditlab.models.diffusers_t2i.flux import (
    config_from_diffusers,
    diffusers_config,
    state_from_diffusers,
    state_to_diffusers,
)
from ditlab.models.dit import DiT
from ditlab.models.text.features import TextFeatures

TINY = {"patch_size": 1, "in_channels": 16, "num_layers": 2, "num_single_layers": 2, "attention_head_dim": 16,
        "num_attention_heads": 2, "joint_attention_dim": 24, "pooled_projection_dim": 20,
        "axes_dims_rope": (4, 6, 6)}  # fmt: skip
CHANNELS, SIDE = 4, 8  # unpacked latents: 4 channels of 8 x 8 (FLUX sees 16 packed channels on a 4 x 4 grid)
TEXT_LENGTH, TEXT_DIM, POOLED_DIM = 5, 24, 20


def randomise(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Every parameter random (norm scales around 1), so each converted tensor is checked by the outputs."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.2)
        for child in module.modules():
            if isinstance(child, torch.nn.RMSNorm) and child.weight is not None:
                child.weight.add_(1.0)
    return module


def random_flux(seed: int = 0) -> FluxTransformer2DModel:
    torch.manual_seed(seed)
    return randomise(FluxTransformer2DModel(**TINY), seed + 1).eval()


def inputs(batch: int = 3, seed: int = 2, null: bool = False):
    """Unpacked latents, sigmas in [0, 1], text tokens, pooled vectors and their features."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, CHANNELS, SIDE, SIDE, generator=generator)
    sigma = torch.rand(batch, generator=generator)
    tokens = torch.randn(batch, TEXT_LENGTH, TEXT_DIM, generator=generator)
    pooled = torch.randn(batch, POOLED_DIM, generator=generator)
    empty = (TextFeatures(torch.zeros(1, TEXT_LENGTH, TEXT_DIM), torch.zeros(1, POOLED_DIM),
                          torch.ones(1, TEXT_LENGTH, dtype=torch.bool)) if null else None)  # fmt: skip
    return x, sigma, tokens, pooled, TextFeatures(tokens, pooled, torch.ones(batch, TEXT_LENGTH, dtype=torch.bool),
                                                  empty)  # fmt: skip


def flux_forward(model: FluxTransformer2DModel, x, sigma, tokens, pooled) -> torch.Tensor:
    """diffusers' FLUX as its pipeline calls it (2x2-packed latents, position ids), unpacked again."""
    batch, channels, height, width = x.shape
    h, w = height // 2, width // 2
    packed = x.reshape(batch, channels, h, 2, w, 2).permute(0, 2, 4, 1, 3, 5).reshape(batch, h * w, 4 * channels)
    image_ids = torch.zeros(h, w, 3)
    image_ids[..., 1] += torch.arange(h)[:, None]
    image_ids[..., 2] += torch.arange(w)[None, :]
    out = model(packed, tokens, pooled, sigma, img_ids=image_ids.reshape(h * w, 3),
                txt_ids=torch.zeros(tokens.shape[1], 3)).sample  # fmt: skip
    return out.reshape(batch, h, w, channels, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(batch, channels, height, width)


def converted(model: FluxTransformer2DModel) -> DiT:
    config = config_from_diffusers(dict(model.config), input_size=SIDE)
    dit = DiT(config).eval()
    dit.load_state_dict(state_from_diffusers(model.state_dict(), config))
    return dit


def test_flux_forward_equals_diffusers():
    model = random_flux()
    dit = converted(model)
    assert [type(block) for block in dit.blocks] == [MMDiTBlock, MMDiTBlock, FluxSingleBlock, FluxSingleBlock]
    x, sigma, tokens, pooled, text = inputs()
    with torch.no_grad():
        expected = flux_forward(model, x, sigma, tokens, pooled)
        ours = dit(x, sigma * 1000, text)  # the ditlab network takes t = 1000 sigma
    diff = (ours - expected).abs().max().item()
    print(f"FLUX: max |ditlab - diffusers| = {diff:.3g} (outputs up to {expected.abs().max():.3g})")
    assert diff < 1e-5


def test_flux_round_trips_are_bitwise():
    model = random_flux()
    config = config_from_diffusers(dict(model.config), input_size=SIDE)
    theirs = model.state_dict()
    ours = state_from_diffusers(theirs, config)
    assert not ours["blocks.2.mlp.fc2.bias"].any()  # proj_out's bias went to the attention's proj
    back = state_to_diffusers(ours, config)
    assert sorted(back) == sorted(theirs)
    assert all(torch.equal(back[name], theirs[name]) for name in theirs)
    again = state_from_diffusers(back, config)
    assert all(torch.equal(again[name], ours[name]) for name in ours)
    values = diffusers_config(config)
    assert {k: v for k, v in values.items() if not k.startswith("_")} == {
        **{k: (tuple(v) if isinstance(v, list) else v) for k, v in model.config.items() if not k.startswith("_")},
        "out_channels": 16}  # fmt: skip
    rebuilt = FluxTransformer2DModel.from_config(values)
    rebuilt.load_state_dict(back)
    assert config_from_diffusers(dict(rebuilt.config)) == config  # the latent size rides in the private entry


def test_a_ditlab_flux_network_exports_to_diffusers():
    """A flux network built in ditlab (random weights, the MLP's fc2 bias too) runs the same in diffusers."""
    config = DiTConfig(input_size=SIDE, patch_size=2, in_channels=CHANNELS, hidden_size=32, depth=3, num_heads=2,
                       learn_sigma=False, qk_norm="rms", block="flux", block_options={"double": 1},
                       condition="text", condition_options={"text_dim": TEXT_DIM, "pooled_dim": POOLED_DIM,
                                                            "projection": "linear"},
                       positions="rope", position_options={"axes_dims": [4, 6, 6]})  # fmt: skip
    torch.manual_seed(0)
    dit = randomise(DiT(config), 5).eval()
    model = FluxTransformer2DModel.from_config(diffusers_config(config)).eval()
    model.load_state_dict(state_to_diffusers(dit.state_dict(), config))
    x, sigma, tokens, pooled, text = inputs(seed=4)
    with torch.no_grad():
        diff = (dit(x, sigma * 1000, text) - flux_forward(model, x, sigma, tokens, pooled)).abs().max().item()
    print(f"ditlab flux -> FLUX: max |diff| = {diff:.3g}")
    assert diff < 1e-5
    # back: bitwise but for the single blocks' fc2 bias, which FLUX's one proj_out bias has absorbed
    back = state_from_diffusers(model.state_dict(), config)
    folded = {"blocks.1.attn.proj.bias", "blocks.1.mlp.fc2.bias", "blocks.2.attn.proj.bias", "blocks.2.mlp.fc2.bias"}
    assert all(torch.equal(back[name], value) for name, value in dit.state_dict().items() if name not in folded)
    for index in (1, 2):
        total = dit.state_dict()[f"blocks.{index}.attn.proj.bias"] + dit.state_dict()[f"blocks.{index}.mlp.fc2.bias"]
        assert torch.equal(back[f"blocks.{index}.attn.proj.bias"], total)


def test_branch_hooks_see_every_unit_and_change_nothing():
    dit = converted(random_flux())
    x, sigma, _, _, text = inputs()
    t = sigma * 1000
    seen = []

    def hook(branch):
        seen.append((branch.unit, branch.block, branch.kind))
        return branch.compute()

    with torch.no_grad():
        plain = dit(x, t, text)
        tokens, cond = dit.embed(x, t, text)
        hooked = dit.head(dit.run_trunk(tokens, cond, t, branches=hook), cond)
    assert seen == [(2 * block + i, block, kind) for block in range(4) for i, kind in enumerate(("attention", "mlp"))]
    assert [(u.index, u.block, u.kind) for u in dit.units()] == seen
    assert torch.equal(hooked, plain)


def fresh(block: str, **fields) -> DiT:
    config = DiTConfig(**{"input_size": SIDE, "patch_size": 2, "in_channels": CHANNELS, "hidden_size": 32, "depth": 2,
                          "num_heads": 2, "qk_norm": "rms", "block": block, "condition": "text",
                          "condition_options": {"text_dim": TEXT_DIM, "pooled_dim": POOLED_DIM, "projection": "linear"},
                          "positions": "rope", **fields})  # fmt: skip
    torch.manual_seed(0)
    return DiT(config)


@pytest.mark.parametrize("block, options", [("flux", {"double": 1}), ("flux-single", {})])
def test_a_fresh_flux_network_trains_one_step(block, options):
    dit = fresh(block, block_options=options).train()
    assert not hasattr(dit, "pos_embed")  # rotary positions only
    kinds = [type(b) for b in dit.blocks]
    assert kinds == ([MMDiTBlock, FluxSingleBlock] if options else [FluxSingleBlock, FluxSingleBlock])
    assert not any(b.adaLN_modulation[-1].weight.any() for b in dit.blocks)  # adaLN-Zero
    x, sigma, _, _, text = inputs(null=True)
    optimizer = torch.optim.AdamW(dit.parameters(), lr=1e-3)
    before = dit.final_layer.linear.weight.detach().clone()
    output = dit(x, sigma * 1000, text)
    loss = (output - torch.randn_like(output)).pow(2).mean()
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(p.grad).all() for p in dit.parameters() if p.grad is not None)
    optimizer.step()
    assert not torch.equal(dit.final_layer.linear.weight, before)
    randomise(dit, 3).zero_grad()  # off the zero initialisation every weight gets a gradient
    dit(x, sigma * 1000, text).pow(2).mean().backward()
    silent = [name for name, p in dit.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.any())]
    assert silent == []
    assert flops_per_image(dit) > 0


def test_refusals_are_one_line():
    with pytest.raises(ValueError, match="guidance"):
        config_from_diffusers({**TINY, "guidance_embeds": True})
    with pytest.raises(ValueError, match="patch_size"):
        config_from_diffusers({**TINY, "patch_size": 2})
    with pytest.raises(ValueError, match="block_options"):
        fresh("flux")
    with pytest.raises(ValueError, match="cannot hold"):
        diffusers_config(fresh("flux", block_options={"double": 1}, positions="sincos").config)
    model = random_flux()
    config = config_from_diffusers(dict(model.config), input_size=SIDE)
    state = model.state_dict()
    state.pop("single_transformer_blocks.1.proj_mlp.weight")
    with pytest.raises(ValueError, match="is missing"):
        state_from_diffusers(state, config)
