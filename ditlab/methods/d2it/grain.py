"""Granularity maps: which ``2 x 2``-token regions of an image are detailed (fine grain) and which are smooth (coarse).

D2iT's DVAE (Jia et al. 2025, Sec. 3.1, Dynamic Grained Coding) scores each region by the Shannon entropy of its pixel
intensities, estimated with a Gaussian kernel density, and gives high-entropy regions the fine code. Here the same
measure is taken on the training input itself (``region_entropy``: the channel-mean intensity's Gaussian KDE on
``bins`` points of [-1, 1], bandwidth ``bandwidth``), or its variance (``region_variance``, for latent inputs whose
values are not intensities). [interp] The map marks the ``k = round(fine_ratio R)`` highest-scoring regions of each
image fine: a fixed share per image (so every image of a batch has the same token count), where the paper thresholds
the entropy, which varies the share per image.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

MEASURES = ("entropy", "variance")


def regions(images: torch.Tensor, side: int) -> torch.Tensor:
    """``(B, C, H, W) -> (B, R, C, side * side)``: non-overlapping ``side x side`` regions in raster order."""
    batch, channels, height, width = images.shape
    if height % side or width % side:
        raise ValueError(f"a {height}x{width} input does not split into {side}x{side} regions")
    patches = F.unfold(images, kernel_size=side, stride=side)  # (B, C * side^2, R)
    return patches.reshape(batch, channels, side * side, -1).permute(0, 3, 1, 2)


def region_entropy(images: torch.Tensor, side: int, bins: int = 32, bandwidth: float = 0.1) -> torch.Tensor:
    """``(B, R)`` Shannon entropy (nats) of each region's intensity density (Gaussian KDE on ``bins`` points)."""
    values = regions(images.float(), side).mean(2)  # (B, R, P): the channel-mean intensity
    centres = torch.linspace(-1.0, 1.0, bins, device=images.device)
    density = torch.exp(-((values[..., None] - centres) ** 2) / (2 * bandwidth**2)).sum(2)  # (B, R, bins)
    p = density / density.sum(-1, keepdim=True).clamp_min(1e-12)
    return -(p * torch.log(p.clamp_min(1e-12))).sum(-1)


def region_variance(images: torch.Tensor, side: int) -> torch.Tensor:
    """``(B, R)`` mean over channels of each region's variance."""
    return regions(images.float(), side).var(-1, unbiased=False).mean(-1)


def detail(images: torch.Tensor, side: int, measure: str = "entropy", bins: int = 32,
           bandwidth: float = 0.1) -> torch.Tensor:  # fmt: skip
    if measure == "entropy":
        return region_entropy(images, side, bins, bandwidth)
    if measure == "variance":
        return region_variance(images, side)
    raise ValueError(f"unknown detail measure {measure!r}; choices: {list(MEASURES)}")


def fine_count(num_regions: int, fine_ratio: float) -> int:
    if not 0.0 <= fine_ratio <= 1.0:
        raise ValueError(f"fine_ratio={fine_ratio} must lie in [0, 1] (1: every region fine, the plain DiT)")
    return int(round(fine_ratio * num_regions))


def top_regions(scores: torch.Tensor, count: int) -> torch.Tensor:
    """``(B, R)`` bool: the ``count`` highest scores of each row (ties to the earlier region)."""
    fine = torch.zeros_like(scores, dtype=torch.bool)
    if count:
        order = torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :count]
        fine.scatter_(1, order, True)
    return fine


def grain_map(images: torch.Tensor, side: int, fine_ratio: float, measure: str = "entropy", bins: int = 32,
              bandwidth: float = 0.1) -> torch.Tensor:  # fmt: skip
    """``(B, R)`` bool fine-grain map of ``images`` (regions of ``side`` pixels)."""
    scores = detail(images, side, measure, bins, bandwidth)
    return top_regions(scores, fine_count(scores.shape[1], fine_ratio))
