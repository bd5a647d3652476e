"""The encoder interface, and resampling of patch features and attention maps between token grids."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class EncoderOutput:
    """Patch features ``(B, grid^2, F)``, attention maps ``block -> (B, H, grid^2, grid^2)`` and the class token
    ``(B, F)`` after the final norm (REG's target; None for an encoder without one)."""

    features: torch.Tensor
    attention: dict[int, torch.Tensor]
    grid: int
    class_token: torch.Tensor | None = None


@dataclass(frozen=True)
class EncoderInfo:
    """What alignment heads need to know before the encoder is loaded (or after it is released)."""

    feature_dim: int
    num_heads: int
    depth: int


# ----------------------------------------------------------------------------------------- resampling
def resample_features(features: torch.Tensor, grid: int) -> torch.Tensor:
    """``(B, g0^2, F) -> (B, grid^2, F)``: bilinear on the 2-D patch grid (antialiased when shrinking)."""
    batch, count, channels = features.shape
    source = math.isqrt(count)
    if source * source != count:
        raise ValueError(f"{count} patch tokens do not form a square grid")
    if source == grid:
        return features
    planes = features.transpose(1, 2).reshape(batch, channels, source, source)
    planes = F.interpolate(
        planes, size=(grid, grid), mode="bilinear", align_corners=False, antialias=grid < source
    )
    return planes.flatten(2).transpose(1, 2)


def resample_attention(maps: torch.Tensor, grid: int) -> torch.Tensor:
    """``(B, H, g0^2, g0^2) -> (B, H, grid^2, grid^2)``: bilinear along keys then queries, rows summing to 1."""
    batch, heads, count, _ = maps.shape
    source = math.isqrt(count)
    if source == grid:
        return maps

    def keys(values: torch.Tensor) -> torch.Tensor:  # (B, H, Q, g0^2) -> (B, H, Q, grid^2)
        rows = values.shape[2]
        planes = values.reshape(-1, 1, source, source)
        planes = F.interpolate(planes, size=(grid, grid), mode="bilinear", align_corners=False,
                               antialias=grid < source)  # fmt: skip
        return planes.reshape(batch, heads, rows, grid * grid)

    resampled = keys(keys(maps).transpose(-2, -1)).transpose(-2, -1).clamp_min(0)
    return resampled / resampled.sum(-1, keepdim=True).clamp_min(1e-12)


def patch_attention(logits: torch.Tensor, skip: int) -> torch.Tensor:
    """Pre-softmax logits ``(B, H, 1+R+N, 1+R+N)`` -> softmax over patch keys of patch queries ``(B, H, N, N)``."""
    return torch.softmax(logits[..., skip:, skip:].float(), dim=-1)


# ----------------------------------------------------------------------------------------- base class
class FrozenEncoder(nn.Module):
    """A frozen encoder: ``encoder(images (B, C, H, W) in [-1, 1], grid, attention=blocks) -> EncoderOutput``.

    Inputs are checked before anything runs: an encoder sees clean *pixels* (``channels`` of them, values in
    [-1, 1]); VAE latents or unscaled images are refused with one line instead of giving silent garbage targets.
    """

    name: str = "encoder"
    info: EncoderInfo = EncoderInfo(0, 0, 0)
    channels: tuple[int, ...] = (3,)
    """Channel counts the encoder accepts."""

    def check_pixels(self, images: torch.Tensor) -> None:
        """One-line ``ValueError`` unless ``images`` are ``(B, C, H, W)`` pixels in [-1, 1] with an accepted ``C``."""
        if images.ndim != 4 or images.shape[1] not in self.channels:
            raise ValueError(f"encoder {self.name} takes pixels (B, {' or '.join(map(str, self.channels))}, H, W) in "
                             f"[-1, 1] but got a tensor of shape {tuple(images.shape)}; on VAE latents give it the "
                             "clean images (data.init_args.pixels: true)")  # fmt: skip
        low, high = images.min().item(), images.max().item()
        if low < -1.01 or high > 1.01:
            raise ValueError(f"encoder {self.name} takes pixels in [-1, 1] but got values in [{low:.3g}, {high:.3g}]; "
                             "scale images to [-1, 1] (x / 127.5 - 1), and give it pixels, not latents")  # fmt: skip

    def train(self, mode: bool = True) -> FrozenEncoder:
        return super().train(False)

    def encode(self, images: torch.Tensor, grid: int, attention: set[int]) -> EncoderOutput:
        """Features and maps at the encoder's own grid (it may honour ``grid`` by resizing its input)."""
        raise NotImplementedError

    @torch.no_grad()
    def forward(self, images: torch.Tensor, grid: int, attention: Iterable[int] = ()) -> EncoderOutput:
        attention = set(attention)
        bad = sorted(i for i in attention if not 0 <= i < self.info.depth)
        if bad:
            raise IndexError(f"encoder blocks {[i + 1 for i in bad]} out of range for {self.name} "
                             f"(depth {self.info.depth}; blocks are 1..{self.info.depth})")  # fmt: skip
        self.check_pixels(images)
        output = self.encode(images, grid, attention)
        if output.grid != grid:
            output = EncoderOutput(
                resample_features(output.features, grid),
                {i: resample_attention(maps, grid) for i, maps in output.attention.items()},
                grid,
                output.class_token,
            )
        return output
