"""The ``pixart`` block kind and the exact conversion of diffusers' ``PixArtTransformer2DModel`` (tiny, offline)."""

from __future__ import annotations

import pytest
import torch
from diffusers import PixArtTransformer2DModel

from ditlab.models.blocks.pixart import PixArtBlock
from ditlab.models.config import DiTConfig
from ditlab.models.cross_attention import CrossAttention
from ditlab.models.diffusers_t2i.pixart import (
    config_from_diffusers,
    diffusers_config,
    state_from_diffusers,
    state_to_diffusers,
)
from ditlab.models.dit import DiT
from ditlab.models.text.features import TextFeatures

TINY = {"num_attention_heads": 2, "attention_head_dim": 8, "in_channels": 4, "out_channels": 8, "num_layers": 2,
        "sample_size": 8, "patch_size": 2, "caption_channels": 12, "cross_attention_dim": 16}  # fmt: skip
VARIANTS = [{}, {"out_channels": None, "interpolation_scale": 3, "norm_eps": 1e-5, "num_layers": 1}]
TEXT_LENGTH, TEXT_DIM = 5, 12


def random_pixart(seed: int = 0, **fields) -> PixArtTransformer2DModel:
    """A tiny diffusers PixArt with every weight random (the tables too, which diffusers builds the same way each
    time, and the zero-free biases), so each converted tensor is checked by the outputs."""
    torch.manual_seed(seed)
    model = PixArtTransformer2DModel(**{**TINY, **fields}).eval()
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.3)
    return model


def text_inputs(batch: int = 4, seed: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """T5-like tokens and a 1/0 mask with padding: partial, none, one token, and a row with no real token."""
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randn(batch, TEXT_LENGTH, TEXT_DIM, generator=generator)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0], [0, 0, 0, 0, 0]])[:batch]
    return tokens, mask


def features(tokens: torch.Tensor, mask: torch.Tensor, null: TextFeatures | None = None) -> TextFeatures:
    return TextFeatures(tokens, torch.zeros(len(tokens), 0), mask.bool(), null)


def converted(model: PixArtTransformer2DModel) -> DiT:
    config = config_from_diffusers(dict(model.config))
    dit = DiT(config).eval()
    dit.load_state_dict(state_from_diffusers({**model.state_dict(), "pos_embed.pos_embed": model.pos_embed.pos_embed},
                                             config))  # fmt: skip
    return dit


def images(batch: int = 4, seed: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, TINY["in_channels"], TINY["sample_size"], TINY["sample_size"], generator=generator)
    return x, torch.tensor([0, 1, 437, 999])[:batch]  # diffusers' DDPM steps, both ends


@pytest.mark.parametrize("variant", VARIANTS)
def test_forward_equals_diffusers(variant):
    model = random_pixart(**variant)
    dit = converted(model)
    x, t = images()
    tokens, mask = text_inputs()
    with torch.no_grad():
        theirs = model(x, encoder_hidden_states=tokens, timestep=t, encoder_attention_mask=mask).sample
        ours = dit(x, t, features(tokens, mask))
    assert ours.shape == theirs.shape == (4, model.out_channels, 8, 8)
    scale = theirs.abs().max().clamp(min=1)
    assert (ours[:3] - theirs[:3]).abs().max() < 1e-5 * scale
    # a caption with no real token attends to all its tokens in both; diffusers computes that softmax from
    # float32 ``score - 10000`` (ulp 1e-3), so that row agrees to its rounding only
    assert (ours[3] - theirs[3]).abs().max() < 1e-3 * scale
    assert dit.learn_sigma == (model.out_channels == 8)
    # the padding matters (the mask is really applied): unmasking the padded caption changes its output
    with torch.no_grad():
        unmasked = dit(x, t, features(tokens, torch.ones_like(mask)))
    assert (unmasked[0] - ours[0]).abs().max() > 1e-3


@pytest.mark.parametrize("variant", VARIANTS)
def test_round_trips_are_bitwise(variant):
    model = random_pixart(seed=4, **variant)
    config = config_from_diffusers(dict(model.config))
    theirs = model.state_dict()
    back = state_to_diffusers(state_from_diffusers(theirs, config), config)
    assert set(back) == set(theirs)
    assert all(torch.equal(back[key], theirs[key]) for key in theirs)
    # the config too: diffusers' model rebuilt from ours has the same config, and it loads the converted weights
    rebuilt = PixArtTransformer2DModel.from_config(diffusers_config(config))
    assert config_from_diffusers(dict(rebuilt.config)) == config
    rebuilt.load_state_dict(back)
    assert torch.equal(rebuilt.pos_embed.pos_embed, model.pos_embed.pos_embed)
    # ditlab -> diffusers -> ditlab, without the buffer (ditlab's own table of the same options stands in)
    dit = converted(model)
    again = state_from_diffusers(state_to_diffusers(dit.state_dict(), config), config)
    assert (again["pos_embed"] - dit.pos_embed).abs().max() < 1e-6
    assert all(
        torch.equal(again[key], value) for key, value in dit.state_dict().items() if key != "pos_embed"
    )


def test_what_the_core_cannot_express_is_refused_in_one_line():
    cases = [({"sample_size": 128}, "additional conditions"), ({"use_additional_conditions": True}, "additional"),
             ({"activation_fn": "geglu"}, "reproduces"), ({"caption_channels": None}, "caption projection"),
             ({"cross_attention_dim": 32}, "cross_attention_dim"), ({"out_channels": 3}, "out_channels"),
             ({"_class_name": "SD3Transformer2DModel"}, "not a PixArt"), ({"new_flag": 1}, "unknown")]  # fmt: skip
    for change, words in cases:
        with pytest.raises(ValueError, match=words) as error:
            config_from_diffusers({**TINY, **change})
        assert "\n" not in str(error.value)
    config = config_from_diffusers(TINY)
    for change in ({"qk_norm": "rms"}, {"mlp_ratio": 2.0}, {"condition_options": {"text_dim": 12, "adaln": "single",
                                                                                   "pooled_dim": 8}}):  # fmt: skip
        with pytest.raises(ValueError, match="cannot express"):
            diffusers_config(config.replace(**change))
    with pytest.raises(ValueError, match="adaln: single"):
        DiT(DiTConfig(input_size=8, patch_size=2, hidden_size=16, depth=1, num_heads=2, block="pixart"))


def test_branch_hooks_see_three_units_per_block_and_compute_is_the_plain_forward():
    dit = converted(random_pixart(seed=5, num_layers=3))
    x, t = images()
    text = features(*text_inputs())
    assert dit.blocks[0].units() == [
        ("attention", "attention"),
        ("cross_attention", "cross_attention"),
        ("mlp", "mlp"),
    ]
    assert [(u.index, u.block, u.kind) for u in dit.units()] == [
        (3 * b + i, b, kind)
        for b in range(3)
        for i, kind in enumerate(["attention", "cross_attention", "mlp"])
    ]
    seen = []

    def record(branch):
        seen.append((branch.block, branch.kind, branch.unit, branch.gate is None))
        return branch.compute()

    with torch.no_grad():
        plain = dit(x, t, text)
        tokens, cond = dit.embed(x, t, text)
        hooked = dit.head(dit.run_trunk(tokens, cond, t, branches=record), cond)
    assert torch.equal(hooked, plain)
    assert seen == [(b, kind, 3 * b + i, kind == "cross_attention") for b in range(3)
                    for i, kind in enumerate(["attention", "cross_attention", "mlp"])]  # fmt: skip
    # a hook that drops the cross-attention changes the output: the text is read there
    with torch.no_grad():
        blind = dit.head(dit.run_trunk(tokens, cond, t, branches=lambda b: b.compute() * (b.kind != "cross_attention")),
                         cond)  # fmt: skip
        out, weights = dit.blocks[0](tokens, cond, return_attention=True)
    assert (blind - plain).abs().max() > 1e-3
    # the map path mixes with the explicit softmax instead of the fused kernel: the same block output to rounding
    torch.testing.assert_close(out, dit.blocks[0](tokens, cond), rtol=1e-4, atol=1e-4)
    assert weights.shape == (4, 2, 16, 16)


def test_macs_count_the_cross_attention_over_the_text_length():
    config = config_from_diffusers(TINY)
    block = DiT(config).blocks[0]
    tokens, hidden = config.num_tokens, config.hidden_size
    without = block.macs(tokens, config)
    with_text = block.macs(
        tokens, config.replace(condition_options={**config.condition_options, "text_length": 120})
    )
    self_attention = tokens * 4 * hidden * hidden + 2 * tokens * tokens * hidden
    mlp = tokens * 8 * hidden * hidden
    assert without == self_attention + mlp + tokens * 2 * hidden * hidden > 0
    assert with_text - without == 120 * 2 * hidden * hidden + 2 * tokens * 120 * hidden
    assert isinstance(block, PixArtBlock) and isinstance(block.cross_attn, CrossAttention)


def fresh_config(**fields) -> DiTConfig:
    options = {
        "text_dim": TEXT_DIM,
        "projection": "mlp",
        "adaln": "single",
        "pooled_dim": 0,
        "text_length": 5,
    }
    return DiTConfig(**{"input_size": 8, "patch_size": 2, "in_channels": 4, "hidden_size": 32, "depth": 2,
                        "num_heads": 2, "block": "pixart", "condition": "text", "condition_options": options,
                        **fields})  # fmt: skip


def test_fresh_pixart_network_initialises_as_pixart_trains_and_drops_captions():
    torch.manual_seed(0)
    dit = DiT(fresh_config())
    block = dit.blocks[0]
    assert (
        torch.count_nonzero(block.cross_attn.proj.weight) == 0
        and torch.count_nonzero(block.cross_attn.proj.bias) == 0
    )
    assert 0.5 < block.scale_shift_table.std().item() * 32**0.5 < 1.5
    # PixArt zeroes no adaLN: the self-attention and MLP run from the start
    assert torch.count_nonzero(block.attn.proj.weight) > 0
    assert 0.01 < dit.y_embedder.t_block[1].weight.std().item() < 0.03
    x, t = images()
    tokens, mask = text_inputs()
    null = features(torch.randn(1, TEXT_LENGTH, TEXT_DIM), torch.tensor([[1, 0, 0, 0, 0]]))
    text = features(tokens, mask, null)
    dit.train()  # caption drop-out (0.1) on: the null features are used
    optimizer = torch.optim.SGD(dit.parameters(), lr=0.1)
    for _ in range(2):  # the zeroed output layer passes no gradient back on the first step, then it does
        optimizer.zero_grad()
        (dit(x, t.float(), text) - x.repeat(1, 2, 1, 1)).square().mean().backward()
        grads = {name: p.grad for name, p in dit.named_parameters() if p.requires_grad}
        assert all(g is not None and torch.isfinite(g).all() for g in grads.values())
        assert grads["final_layer.linear.weight"].abs().sum() > 0
        optimizer.step()
    assert (
        grads["blocks.1.cross_attn.proj.weight"].abs().sum() > 0
        and grads["y_embedder.t_block.1.weight"].abs().sum() > 0
    )
    # with every weight random (a fresh network outputs 0), forced drop-out rows are the empty caption's rows
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for parameter in dit.parameters():
            if parameter.requires_grad:
                parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.2)
    dit.eval()
    drop = torch.tensor([1, 0, 1, 0])
    with torch.no_grad():
        dropped = dit(x, t, text, force_drop_ids=drop)
        kept = dit(x, t, text)
        empty = dit(x, t, text.null_rows())
    assert torch.equal(dropped[drop == 1], empty[drop == 1])
    assert torch.equal(dropped[drop == 0], kept[drop == 0])
    assert (dropped[0] - kept[0]).abs().max() > 1e-3


def test_small_width_initialisation_options_open_the_caption_path():
    """PixArt's N(0, 0.02) caption MLP shrinks 64-wide tokens ~50-fold and its zeroed cross-attention output passes
    no gradient to the cross-attention's maps; ``projection_init: xavier`` and ``cross_attention_init: xavier``
    keep the DiT loop's Xavier there, and bad values are refused in one line."""
    width = 64
    tokens = torch.randn(8, TEXT_LENGTH, width)

    def network(projection_init: str, cross: str) -> DiT:
        torch.manual_seed(0)
        options = {"text_dim": width, "projection": "mlp", "adaln": "single", "text_length": TEXT_LENGTH,
                   "projection_init": projection_init}  # fmt: skip
        return DiT(fresh_config(hidden_size=128, condition_options=options,
                                block_options={"cross_attention_init": cross}))

    pixart, opened = network("normal", "zero"), network("xavier", "xavier")
    with torch.no_grad():
        shrunk, kept = (net.y_embedder.caption_projection(tokens).std().item() for net in (pixart, opened))
    assert shrunk < 0.05 < 0.2 < kept  # measured: about 0.02 and 0.5 of the tokens' unit scale
    assert torch.count_nonzero(pixart.blocks[0].cross_attn.proj.weight) == 0
    assert torch.count_nonzero(opened.blocks[0].cross_attn.proj.weight) > 0
    assert opened.y_embedder.t_block[1].weight.std() < 0.03  # adaLN-single keeps N(0, 0.02)
    x, t = images()
    null = features(torch.randn(1, TEXT_LENGTH, width), torch.tensor([[1, 0, 0, 0, 0]]))
    text = features(torch.randn(4, TEXT_LENGTH, width), torch.ones(4, TEXT_LENGTH, dtype=torch.long), null)
    for net in (pixart, opened):  # as after the first step: the output layer no longer zero
        with torch.no_grad():
            net.final_layer.linear.weight.normal_(generator=torch.Generator().manual_seed(1))
        net(x, t.float(), text).square().mean().backward()
    assert pixart.blocks[0].cross_attn.kv_linear.weight.grad.abs().sum() == 0  # PixArt's stall
    assert opened.blocks[0].cross_attn.kv_linear.weight.grad.abs().sum() > 0  # the text side learns at once
    with pytest.raises(ValueError, match="cross_attention_init='ones' must be 'zero'"):
        network("normal", "ones")
    with pytest.raises(ValueError, match="projection_init='uniform' must be 'normal'"):
        network("uniform", "zero")


def test_a_ditlab_pixart_network_goes_to_diffusers_and_back_through_the_package_glue():
    from ditlab.models.diffusers_t2i import from_model, to_model

    torch.manual_seed(1)
    dit = DiT(
        fresh_config(hidden_size=16)
    ).eval()  # its scene-config options: text_length, no position options
    generator = torch.Generator().manual_seed(8)
    with torch.no_grad():
        for parameter in dit.parameters():
            if parameter.requires_grad:
                parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.2)
    model = to_model(dit)
    back = from_model(model)
    x, t = images()
    tokens, mask = text_inputs(batch=3)
    with torch.no_grad():
        theirs = model(
            x[:3], encoder_hidden_states=tokens, timestep=t[:3], encoder_attention_mask=mask
        ).sample
        ours = dit(x[:3], t[:3], features(tokens, mask))
        again = back(x[:3], t[:3], features(tokens, mask))
    assert (ours - theirs).abs().max() < 1e-5 * theirs.abs().max().clamp(min=1)
    assert torch.equal(again, ours)
