"""The text condition slot: positions against diffusers' tables, empty-caption rows, text guidance, one-line refusals."""

import numpy as np
import pytest
import torch
from diffusers.models.embeddings import apply_rotary_emb, get_2d_sincos_pos_embed
from diffusers.models.transformers.transformer_flux import FluxPosEmbed

from ditlab.diffusion.guidance import EMPTY_CAPTION, guidance_rows
from ditlab.models.config import DiTConfig
from ditlab.models.positions import RotaryPositions, sincos_2d
from ditlab.models.text.features import TextFeatures
from ditlab.models.text.prompts import condition_input


def features(batch: int, length: int = 5, dim: int = 6, seed: int = 0) -> TextFeatures:
    generator = torch.Generator().manual_seed(seed)
    null = TextFeatures(torch.randn(1, length, dim, generator=generator), torch.randn(1, 3, generator=generator),
                        torch.tensor([[True, True] + [False] * (length - 2)]))  # fmt: skip
    mask = torch.rand(batch, length, generator=generator) < 0.7
    mask[:, 0] = True
    return TextFeatures(torch.randn(batch, length, dim, generator=generator), torch.randn(batch, 3, generator=generator),
                        mask, null)  # fmt: skip


@pytest.mark.parametrize("grid,base,scale", [(4, 4, 1.0), (8, 4, 2.0), (6, 16, 0.5)])
def test_sincos_table_is_diffusers_table(grid, base, scale):
    ours = sincos_2d(24, grid, base_size=base, interpolation_scale=scale)
    theirs = get_2d_sincos_pos_embed(24, grid, base_size=base, interpolation_scale=scale, output_type="np")
    np.testing.assert_allclose(ours, theirs, atol=1e-6)


def test_default_sincos_table_is_dit_table():
    assert np.array_equal(sincos_2d(16, 4), sincos_2d(16, 4, base_size=4, interpolation_scale=1.0))


def test_cropped_sincos_table_is_the_centre_of_the_large_one():
    full = sincos_2d(16, 8, base_size=2).reshape(8, 8, 16)
    np.testing.assert_array_equal(sincos_2d(16, 4, base_size=2, max_size=8), full[2:6, 2:6].reshape(16, 16))


def test_rotary_positions_are_flux_positions():
    head_dim, grid, text = 16, 3, 4
    rope = RotaryPositions(head_dim, grid, theta=10000.0, axes_dims=(4, 6, 6))
    ids = torch.zeros(text + grid * grid, 3)
    rows, cols = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    ids[text:, 1], ids[text:, 2] = rows.flatten().float(), cols.flatten().float()
    cos, sin = FluxPosEmbed(theta=10000, axes_dim=[4, 6, 6])(ids)
    x = torch.randn(2, 3, text + grid * grid, head_dim)
    torch.testing.assert_close(rope(x), apply_rotary_emb(x, (cos, sin)), atol=1e-6, rtol=1e-6)
    assert torch.equal(rope(x)[:, :, :text], x[:, :, :text])  # text tokens sit at position 0


def test_empty_caption_rows():
    text = features(4)
    dropped = text.where(torch.tensor([True, False, True, False]))
    null = text.null_rows()
    for row, was_dropped in enumerate([True, False, True, False]):
        source = null if was_dropped else text
        assert torch.equal(dropped.tokens[row], source.tokens[row])
        assert torch.equal(dropped.mask[row], source.mask[row])
    assert dropped[1:3].null is text.null and TextFeatures.cat([text, text]).null is text.null


def test_guidance_rows_pair_each_caption_with_the_empty_one():
    text = features(3)
    x, t = torch.randn(3, 2, 4, 4), torch.rand(3)
    both_x, both_t, both = guidance_rows(x, t, text, EMPTY_CAPTION)
    assert both_x.shape[0] == both_t.shape[0] == len(both) == 6
    assert torch.equal(both.tokens[:3], text.tokens)
    assert torch.equal(both.tokens[3:], text.null.tokens.expand(3, -1, -1))


def test_features_without_an_empty_caption_are_refused_in_one_line():
    bare = TextFeatures(torch.zeros(2, 3, 4), torch.zeros(2, 2), torch.ones(2, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="empty-caption"):
        bare.where(torch.tensor([True, False]))


def test_condition_inputs_that_do_not_fit_are_refused():
    labels = DiTConfig(preset="digits")
    with pytest.raises(ValueError, match="class-conditional"):
        condition_input(labels, ["a red 3"])
    text = DiTConfig(preset="digits", condition="text", condition_options={"text_dim": 6})
    with pytest.raises(ValueError, match="text-conditioned"):
        condition_input(text, torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="names no text encoder"):
        condition_input(text, ["a red 3"])
    assert torch.equal(condition_input(labels, torch.tensor([1, 2])), torch.tensor([1, 2]))


def test_text_options_are_checked():
    with pytest.raises(ValueError, match="text_dim"):
        DiTConfig(preset="digits", condition="text", block="dit").build()
    with pytest.raises(ValueError, match="unknown text condition options"):
        DiTConfig(preset="digits", condition="text", condition_options={"text_dim": 4, "txt": 1}).build()
    with pytest.raises(ValueError, match="qk_norm"):
        DiTConfig(preset="digits", qk_norm="batch")
