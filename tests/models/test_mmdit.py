"""The ``mmdit`` block kind, joint attention, and the exact conversion of diffusers' ``SD3Transformer2DModel``
(tiny, built offline from its config, every weight random)."""

from __future__ import annotations

import pytest
import torch
from diffusers import SD3Transformer2DModel

import ditlab.models.blocks.mmdit  # noqa: F401 - registers the mmdit block kind
from ditlab.models.blocks.mmdit import MMDiTBlock
from ditlab.models.budget import flops_per_image
from ditlab.models.config import DiTConfig
from ditlab.models.diffusers_t2i.sd3 import (
    config_from_diffusers,
    diffusers_config,
    state_from_diffusers,
    state_to_diffusers,
)
from ditlab.models.dit import DiT
from ditlab.models.joint_attention import JointAttention
from ditlab.models.text.features import TextFeatures

TINY = {"sample_size": 8, "patch_size": 2, "in_channels": 4, "num_layers": 2, "attention_head_dim": 16,
        "num_attention_heads": 2, "joint_attention_dim": 24, "caption_projection_dim": 32,
        "pooled_projection_dim": 20, "out_channels": 4, "pos_embed_max_size": 12}  # fmt: skip
TEXT_LENGTH, TEXT_DIM, POOLED_DIM = 5, 24, 20


def randomise(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Every parameter random (norm scales around 1), so each converted tensor is checked by the outputs."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.2)
        for child in module.modules():
            if isinstance(child, torch.nn.RMSNorm | torch.nn.LayerNorm) and child.weight is not None:
                child.weight.add_(1.0)
            elif type(child).__name__ == "RMSNorm" and getattr(child, "weight", None) is not None:
                child.weight.add_(1.0)
    return module


def random_sd3(qk_norm: str | None = None, seed: int = 0) -> SD3Transformer2DModel:
    torch.manual_seed(seed)
    return randomise(SD3Transformer2DModel(**TINY, qk_norm=qk_norm), seed + 1).eval()


def inputs(batch: int = 3, seed: int = 2, null: bool = False):
    """Latents, timesteps in [0, 1000) (SD3's scheduler scale), text tokens, pooled vectors and their features."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, 8, 8, generator=generator)
    t = torch.rand(batch, generator=generator) * 1000
    tokens = torch.randn(batch, TEXT_LENGTH, TEXT_DIM, generator=generator)
    pooled = torch.randn(batch, POOLED_DIM, generator=generator)
    empty = (TextFeatures(torch.zeros(1, TEXT_LENGTH, TEXT_DIM), torch.zeros(1, POOLED_DIM),
                          torch.ones(1, TEXT_LENGTH, dtype=torch.bool)) if null else None)  # fmt: skip
    return x, t, tokens, pooled, TextFeatures(tokens, pooled, torch.ones(batch, TEXT_LENGTH, dtype=torch.bool), empty)


def converted(model: SD3Transformer2DModel) -> DiT:
    config = config_from_diffusers(dict(model.config))
    dit = DiT(config).eval()
    dit.load_state_dict(state_from_diffusers(model.state_dict(), config))
    return dit


@pytest.mark.parametrize("qk_norm", [None, "rms_norm"])
def test_sd3_forward_equals_diffusers(qk_norm):
    model = random_sd3(qk_norm)
    dit = converted(model)
    x, t, tokens, pooled, text = inputs()
    with torch.no_grad():
        expected = model(x, tokens, pooled, t).sample
        ours = dit(x, t, text)
    diff = (ours - expected).abs().max().item()
    print(f"SD3 qk_norm={qk_norm}: max |ditlab - diffusers| = {diff:.3g} (outputs up to {expected.abs().max():.3g})")
    assert diff < 1e-5
    assert isinstance(dit.blocks[0], MMDiTBlock) and dit.text_stream
    assert dit.blocks[-1].context_pre_only and not dit.blocks[0].context_pre_only


def test_sd3_round_trips_are_bitwise():
    model = random_sd3("rms_norm")
    config = config_from_diffusers(dict(model.config))
    theirs = model.state_dict()
    ours = state_from_diffusers(theirs, config)
    back = state_to_diffusers(ours, config)
    assert sorted(back) == sorted(theirs)
    assert all(torch.equal(back[name], theirs[name]) for name in theirs)  # the full position table too
    again = state_from_diffusers(back, config)
    assert all(torch.equal(again[name], ours[name]) for name in ours)
    # the configs: diffusers -> ditlab -> diffusers keeps every key; a model built from it loads the weights
    values = diffusers_config(config)
    assert {k: v for k, v in values.items() if not k.startswith("_")} == {
        k: (tuple(v) if isinstance(v, list) else v) for k, v in model.config.items() if not k.startswith("_")}
    rebuilt = SD3Transformer2DModel.from_config(values).eval()
    rebuilt.load_state_dict(back)
    assert config_from_diffusers(dict(rebuilt.config)) == config


def test_a_ditlab_mmdit_network_exports_to_diffusers():
    """A network built in ditlab (random weights) runs the same in diffusers and comes back bitwise."""
    config = DiTConfig(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=3, num_heads=2,
                       learn_sigma=False, block="mmdit", block_options={"context_pre_only": True}, condition="text",
                       condition_options={"text_dim": TEXT_DIM, "pooled_dim": POOLED_DIM, "projection": "linear",
                                          "text_length": TEXT_LENGTH},
                       position_options={"base_size": 4, "max_size": 6})  # fmt: skip
    torch.manual_seed(0)
    dit = randomise(DiT(config), 5).eval()
    with torch.no_grad():
        dit.pos_embed.copy_(DiT(config).pos_embed)  # the fixed table stays the table
    model = SD3Transformer2DModel.from_config(diffusers_config(config)).eval()
    model.load_state_dict(state_to_diffusers(dit.state_dict(), config))
    x, t, tokens, pooled, text = inputs(seed=4)
    with torch.no_grad():
        diff = (dit(x, t, text) - model(x, tokens, pooled, t).sample).abs().max().item()
    print(f"ditlab mmdit -> SD3: max |diff| = {diff:.3g}")
    assert diff < 1e-5
    back = state_from_diffusers(model.state_dict(), config)
    assert all(torch.equal(back[name], value) for name, value in dit.state_dict().items())
    assert config_from_diffusers(dict(model.config)) == config  # text_length kept in the private entry


def test_branch_hooks_see_every_unit_and_change_nothing():
    dit = converted(random_sd3("rms_norm"))
    x, t, _, _, text = inputs()
    seen = []

    def hook(branch):
        seen.append((branch.unit, branch.block, branch.kind, branch.gate is None))
        return branch.compute()

    with torch.no_grad():
        plain = dit(x, t, text)
        tokens, cond = dit.embed(x, t, text)
        assert tokens.shape == (3, TEXT_LENGTH + 16, 32)
        hooked = dit.head(dit.run_trunk(tokens, cond, t, branches=hook), cond)
    # block 0 gates per stream (no shared gate); the context-pre-only last block covers the image only (its gate)
    assert seen == [(0, 0, "attention", True), (1, 0, "mlp", True), (2, 1, "attention", False), (3, 1, "mlp", False)]
    assert [(u.index, u.block, u.kind) for u in dit.units()] == [(u, b, k) for u, b, k, _ in seen]
    assert torch.equal(hooked, plain)


def test_joint_attention_map_and_flops():
    dit = converted(random_sd3())
    block = dit.blocks[0]
    assert isinstance(block.attn, JointAttention)
    x, t, _, _, text = inputs(batch=2)
    with torch.no_grad():
        tokens, cond = dit.embed(x, t, text)
        out, weights = block(tokens, cond, return_attention=True)
        assert torch.allclose(out, block(tokens, cond), atol=1e-4)  # the explicit map vs the fused kernel
    assert weights.shape == (2, 2, TEXT_LENGTH + 16, TEXT_LENGTH + 16)
    assert torch.allclose(weights.sum(-1), torch.ones(()), atol=1e-5)
    # the text stream costs FLOPs when the text length is known
    without = flops_per_image(dit)
    longer = DiT(dit.config.replace(condition_options={**dit.config.condition_options, "text_length": TEXT_LENGTH}))
    assert flops_per_image(longer) > without > 0


def fresh_mmdit(**fields) -> DiT:
    config = DiTConfig(**{"input_size": 8, "patch_size": 2, "in_channels": 4, "hidden_size": 32, "depth": 2,
                          "num_heads": 2, "block": "mmdit", "block_options": {"context_pre_only": True},
                          "condition": "text", "condition_options": {"text_dim": TEXT_DIM, "pooled_dim": POOLED_DIM,
                                                                     "projection": "linear"}, **fields})  # fmt: skip
    torch.manual_seed(0)
    return DiT(config)


def test_a_fresh_mmdit_network_trains_one_step():
    dit = fresh_mmdit().train()
    for block in dit.blocks:  # adaLN-Zero on both streams: every block starts as the identity
        assert not block.adaLN_modulation[-1].weight.any() and not block.context_adaLN_modulation[-1].weight.any()
    x, t, _, _, text = inputs(null=True)
    optimizer = torch.optim.AdamW(dit.parameters(), lr=1e-3)
    before = {name: p.detach().clone() for name, p in dit.named_parameters()}
    loss = (dit(x, t, text) - torch.randn_like(dit(x, t, text))).pow(2).mean()
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(p.grad).all() for p in dit.parameters() if p.grad is not None)
    optimizer.step()
    assert not torch.equal(dit.final_layer.linear.weight, before["final_layer.linear.weight"])
    # every weight is wired in: off the zero initialisation, each gets a gradient
    randomise(dit, 3).zero_grad()
    dit(x, t, text).pow(2).mean().backward()
    silent = [name for name, p in dit.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.any())]
    assert silent == []


def test_refusals_are_one_line():
    with pytest.raises(ValueError, match="dual-attention"):
        config_from_diffusers({**TINY, "dual_attention_layers": [0]})
    with pytest.raises(ValueError, match="out_channels"):
        config_from_diffusers({**TINY, "out_channels": 8})
    with pytest.raises(ValueError, match="unknown to ditlab"):
        config_from_diffusers({**TINY, "a_newer_option": 1})
    with pytest.raises(ValueError, match="cannot hold"):
        diffusers_config(fresh_mmdit(learn_sigma=True).config)
    with pytest.raises(ValueError, match="condition: text"):
        fresh_mmdit(condition="class", condition_options={})
    with pytest.raises(ValueError, match="unknown mmdit block_options"):
        fresh_mmdit(block_options={"pre_only": True})
    model = random_sd3()
    config = config_from_diffusers(dict(model.config))
    with pytest.raises(ValueError, match="tensors this config does not hold"):
        state_from_diffusers({**model.state_dict(), "extra.weight": torch.zeros(1)}, config)
