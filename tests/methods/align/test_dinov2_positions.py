"""DINOv2's position table is resampled once per grid as REPA does at load (bicubic, antialiased), recorded from
timm's ``resample_abs_pos_embed`` as REPA calls it (``data/dinov2_positions.json``, its ``source``)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ditlab.methods.align.encoders.dinov2 import DINOv2Encoder, resample_positions

REFERENCE = json.loads((Path(__file__).parent / "data" / "dinov2_positions.json").read_text())


def loaded_table() -> torch.Tensor:
    """A DINOv2-like table: the class position and 37 x 37 patch positions (2 channels)."""
    return torch.randn(1, 1 + 37 * 37, 2, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("grid", [16, 8])
def test_the_table_is_resampled_as_repa_resamples_it(grid):
    expected = torch.tensor(REFERENCE[str(grid)]).reshape(1, 1 + grid * grid, 2)
    torch.testing.assert_close(resample_positions(loaded_table(), grid), expected, atol=1e-6, rtol=1e-6)


class TinyDINOv2(nn.Module):
    """DINOv2's layout where it matters here: ``pos_embed`` added in ``prepare_tokens_with_masks`` through
    DINOv2's own run-time interpolation (returned as it is when the grid already fits)."""

    patch_size, num_register_tokens = 14, 0

    def __init__(self) -> None:
        super().__init__()
        self.patch_embed = nn.Conv2d(3, 2, 14, 14)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, 2))
        self.pos_embed = nn.Parameter(loaded_table())
        self.blocks, self.norm = nn.ModuleList(), nn.Identity()

    def interpolate_pos_encoding(self, tokens: torch.Tensor, side: int) -> torch.Tensor:
        grid, count = side // self.patch_size, self.pos_embed.shape[1] - 1
        if tokens.shape[1] - 1 == count:
            return self.pos_embed
        m, scale = math.isqrt(count), (grid + 0.1) / math.isqrt(count)
        patches = self.pos_embed[:, 1:].reshape(1, m, m, -1).permute(0, 3, 1, 2)
        patches = F.interpolate(patches, mode="bicubic", antialias=False, scale_factor=(scale, scale))
        return torch.cat([self.pos_embed[:, :1], patches.permute(0, 2, 3, 1).reshape(1, grid * grid, -1)], 1)

    def prepare_tokens_with_masks(self, pixels: torch.Tensor) -> torch.Tensor:
        tokens = self.patch_embed(pixels).flatten(2).transpose(1, 2)
        tokens = torch.cat([self.cls_token.expand(len(tokens), -1, -1), tokens], 1)
        return tokens + self.interpolate_pos_encoding(tokens, pixels.shape[-1])


def test_the_encoder_adds_the_resampled_table_and_resamples_from_the_loaded_one():
    model = TinyDINOv2().requires_grad_(False)
    encoder = DINOv2Encoder("dinov2-vits14", model)
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    for grid in (16, 8, 16):
        features = encoder(images, grid).features
        pixels = F.interpolate((((images + 1) / 2) - encoder.mean) / encoder.std, size=(14 * grid,) * 2,
                               mode="bicubic", align_corners=False)  # fmt: skip
        positions = features - model.patch_embed(pixels).flatten(2).transpose(1, 2)
        expected = torch.tensor(REFERENCE[str(grid)]).reshape(1, 1 + grid * grid, 2)[:, 1:]
        torch.testing.assert_close(positions, expected.expand(2, -1, -1), atol=1e-5, rtol=1e-5)
    assert torch.equal(encoder.loaded_positions, loaded_table())  # the loaded table is kept to resample from
